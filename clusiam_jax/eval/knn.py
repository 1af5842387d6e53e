"""k-nearest-neighbour evaluation by cosine similarity (docs/method.md §7, patch level).

References and queries are L2-normalized, so cosine similarity is a dot product.
Millions of references do not fit one similarity matrix, so the search is
chunked both ways: references are streamed to the device one chunk at a time,
and for each chunk a single jitted call scans over fixed-size query chunks,
merging the chunk's best k into a running top-k per query. Chunks are padded to
fixed shapes so the function compiles once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from clusiam_jax.eval.metrics import classification_metrics


def l2_normalize(x, eps=1e-12):
    """Row-wise x / max(|x|, eps); an all-zero row stays zero."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, eps)


@functools.partial(jax.jit, static_argnames=('k',), donate_argnums=(0, 1))
def _merge_reference_chunk(best_sims, best_idx, queries, refs, ref_offset, n_refs, k):
    """Merges one reference chunk into the running top-k of every query chunk.

    best_sims, best_idx: [n_qchunks, q_chunk, k] running results.
    queries: [n_qchunks, q_chunk, D]; refs: [r_chunk, D] (zero-padded at the end).
    ref_offset: global index of refs[0]; n_refs: total number of real references.
    """
    r_chunk = refs.shape[0]
    global_idx = ref_offset + jnp.arange(r_chunk, dtype=jnp.int32)
    # Padded reference rows must never win, whatever the query.
    pad_penalty = jnp.where(global_idx < n_refs, 0.0, -jnp.inf)

    def one_query_chunk(args):
        sims_run, idx_run, q = args
        # HIGHEST keeps float32 accuracy on GPUs/TPUs (TF32/bf16 passes could
        # swap near-tied neighbours and make results device-dependent).
        sims = jnp.matmul(q, refs.T, precision=jax.lax.Precision.HIGHEST) + pad_penalty
        cand_sims = jnp.concatenate([sims_run, sims], axis=1)
        cand_idx = jnp.concatenate(
            [idx_run, jnp.broadcast_to(global_idx, sims.shape)], axis=1)
        # top_k is stable: among equal similarities the earlier candidate wins,
        # and earlier candidates have smaller reference indices.
        top_sims, pos = jax.lax.top_k(cand_sims, k)
        return top_sims, jnp.take_along_axis(cand_idx, pos, axis=1)

    return jax.lax.map(one_query_chunk, (best_sims, best_idx, queries))


def _pad_rows(x, rows):
    if x.shape[0] == rows:
        return x
    return np.concatenate([x, np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)])


def knn_search(queries, references, k=1, query_chunk=1024, ref_chunk=32768,
               normalize=True):
    """Top-k references by cosine similarity for every query.

    Args:
      queries: [Q, D] array; references: [R, D] array (host memory is fine).
      k: neighbours per query (k <= R).
      query_chunk, ref_chunk: chunk sizes; the device holds all queries
        ([Q, D] float32: 2 GB per million at D=512), one reference chunk and a
        [query_chunk, ref_chunk] similarity block (128 MB at the defaults).
      normalize: L2-normalize both sets first (pass False if already done).

    Returns:
      (similarities [Q, k] float32, indices [Q, k] int64), best first; ties go
      to the smaller reference index.
    """
    queries = np.asarray(queries, dtype=np.float32)
    references = np.asarray(references, dtype=np.float32)
    n_q, dim = queries.shape
    n_r = references.shape[0]
    if references.shape[1] != dim:
        raise ValueError(f'dimension mismatch: queries {dim}, references {references.shape[1]}')
    if not 1 <= k <= n_r:
        raise ValueError(f'k={k} must be in [1, {n_r}]')
    if normalize:
        queries = l2_normalize(queries)
        references = l2_normalize(references)
    # Chunks never larger than needed, so tiny sets do not pay for big blocks.
    query_chunk = max(1, min(query_chunk, n_q))
    ref_chunk = max(1, min(ref_chunk, n_r))
    n_qchunks = -(-n_q // query_chunk)
    q_dev = jnp.asarray(_pad_rows(queries, n_qchunks * query_chunk).reshape(
        n_qchunks, query_chunk, dim))
    best_sims = jnp.full((n_qchunks, query_chunk, k), -jnp.inf, jnp.float32)
    best_idx = jnp.full((n_qchunks, query_chunk, k), -1, jnp.int32)
    for start in range(0, n_r, ref_chunk):
        chunk = _pad_rows(references[start:start + ref_chunk], ref_chunk)
        best_sims, best_idx = _merge_reference_chunk(
            best_sims, best_idx, q_dev, jnp.asarray(chunk),
            jnp.int32(start), jnp.int32(n_r), k=k)
    sims = np.asarray(best_sims).reshape(-1, k)[:n_q]
    idx = np.asarray(best_idx).reshape(-1, k)[:n_q].astype(np.int64)
    return sims, idx


def majority_vote(neighbour_labels):
    """Most frequent label per row of [Q, k] neighbour labels (nearest first).

    Ties go to the tied label whose nearest occurrence ranks first, so k=1 and
    any tie reduce to the nearest neighbour's label.
    """
    neighbour_labels = np.asarray(neighbour_labels)
    classes, codes = np.unique(neighbour_labels, return_inverse=True)
    codes = codes.reshape(neighbour_labels.shape)
    n_q, k = codes.shape
    rows = np.repeat(np.arange(n_q), k)
    votes = np.zeros((n_q, classes.size), np.int64)
    np.add.at(votes, (rows, codes.ravel()), 1)
    first_rank = np.full((n_q, classes.size), k, np.int64)
    ranks = np.tile(np.arange(k), n_q)
    np.minimum.at(first_rank, (rows, codes.ravel()), ranks)
    # More votes first; among equal votes, the smaller first rank.
    score = votes * (k + 1) + (k - first_rank)
    return classes[np.argmax(score, axis=1)]


def knn_predict(ref_embeddings, ref_labels, query_embeddings, ks=(1,), **search_kwargs):
    """Majority-vote kNN predictions for each k in ``ks`` from one search.

    Returns {k: predicted labels [Q]}.
    """
    ks = tuple(sorted(set(int(k) for k in ks)))
    ref_labels = np.asarray(ref_labels)
    if ref_labels.shape[0] != np.shape(ref_embeddings)[0]:
        raise ValueError('ref_labels and ref_embeddings differ in length')
    _, idx = knn_search(query_embeddings, ref_embeddings, k=ks[-1], **search_kwargs)
    neighbour_labels = ref_labels[idx]
    return {k: majority_vote(neighbour_labels[:, :k]) for k in ks}


def knn_evaluate(ref_embeddings, ref_labels, query_embeddings, query_labels, ks=(1,),
                 positive_label=None, labels=None, **search_kwargs):
    """kNN classification metrics of queries against references, per k.

    The reference and query sets must come from disjoint slides/images (the
    caller chooses them by split; patch-level splits leak).

    Returns {"k=1": metrics dict, ...} with the keys of
    ``metrics.classification_metrics`` (accuracy, balanced_accuracy, macro_f1,
    per_class_f1, positive_f1 if ``positive_label`` is given).
    """
    query_labels = np.asarray(query_labels)
    predictions = knn_predict(ref_embeddings, ref_labels, query_embeddings, ks=ks,
                              **search_kwargs)
    return {f'k={k}': classification_metrics(query_labels, pred, labels=labels,
                                             positive_label=positive_label)
            for k, pred in predictions.items()}
