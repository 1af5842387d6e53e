"""Cosine k-nearest neighbours (evaluation and monitor): references stream to the device in
padded chunks, merged into a running top-k by one jitted call compiled once."""
import functools

import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(x, eps=1e-12, dtype=np.float32):
    x = np.asarray(x, dtype=dtype)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames=('k',), donate_argnums=(0, 1))
def _merge_reference_chunk(best_sims, best_idx, queries, refs, ref_offset, n_refs, k):
    """Merges refs (zero-padded past n_refs) into the running top-k of each query chunk."""
    global_idx = ref_offset + jnp.arange(refs.shape[0], dtype=jnp.int32)
    pad_penalty = jnp.where(global_idx < n_refs, 0.0, -jnp.inf)

    def one_query_chunk(args):
        sims_run, idx_run, q = args
        # HIGHEST: TF32/bf16 passes could swap near-tied neighbours between devices.
        sims = jnp.matmul(q, refs.T, precision=jax.lax.Precision.HIGHEST) + pad_penalty
        cand_sims = jnp.concatenate([sims_run, sims], axis=1)
        cand_idx = jnp.concatenate([idx_run, jnp.broadcast_to(global_idx, sims.shape)], axis=1)
        # top_k is stable and earlier candidates have smaller indices: ties go to them.
        top_sims, pos = jax.lax.top_k(cand_sims, k)
        return top_sims, jnp.take_along_axis(cand_idx, pos, axis=1)

    return jax.lax.map(one_query_chunk, (best_sims, best_idx, queries))


def knn_search(queries, references, k=1, query_chunk=1024, ref_chunk=32768):
    """(cosine similarities, int64 indices) [Q, k] of the top-k references, ties to the first."""
    queries, references = l2_normalize(queries), l2_normalize(references)
    (n_q, dim), n_r = queries.shape, references.shape[0]
    if references.shape[1] != dim:
        raise ValueError(f'dimension mismatch: queries {dim}, references {references.shape[1]}')
    if not 1 <= k <= n_r:
        raise ValueError(f'k={k} must be in [1, {n_r}]')
    query_chunk, ref_chunk = max(1, min(query_chunk, n_q)), max(1, min(ref_chunk, n_r))
    n_qchunks = -(-n_q // query_chunk)
    q_dev = jnp.asarray(np.pad(queries, ((0, n_qchunks * query_chunk - n_q), (0, 0))).reshape(
        n_qchunks, query_chunk, dim))
    best_sims = jnp.full((n_qchunks, query_chunk, k), -jnp.inf, jnp.float32)
    best_idx = jnp.full((n_qchunks, query_chunk, k), -1, jnp.int32)
    for start in range(0, n_r, ref_chunk):
        chunk = references[start:start + ref_chunk]
        chunk = np.pad(chunk, ((0, ref_chunk - len(chunk)), (0, 0)))
        best_sims, best_idx = _merge_reference_chunk(best_sims, best_idx, q_dev, jnp.asarray(chunk),
                                                     jnp.int32(start), jnp.int32(n_r), k=k)
    sims = np.asarray(best_sims).reshape(-1, k)[:n_q]
    return sims, np.asarray(best_idx).reshape(-1, k)[:n_q].astype(np.int64)


def majority_vote(neighbour_labels):
    """The most frequent label of each row of [Q, k] labels; ties go to the nearest."""
    classes, codes = np.unique(np.asarray(neighbour_labels), return_inverse=True)
    codes = codes.reshape(np.shape(neighbour_labels))
    n_q, k = codes.shape
    rows = np.repeat(np.arange(n_q), k)
    votes = np.zeros((n_q, classes.size), np.int64)
    np.add.at(votes, (rows, codes.ravel()), 1)
    first_rank = np.full((n_q, classes.size), k, np.int64)
    np.minimum.at(first_rank, (rows, codes.ravel()), np.tile(np.arange(k), n_q))
    return classes[np.argmax(votes * (k + 1) + (k - first_rank), axis=1)]


def knn_predict(ref_embeddings, ref_labels, query_embeddings, ks=(1,), **search_kwargs):
    """{k: majority-vote predictions [Q]} for each k in `ks`, from one search."""
    ks = tuple(sorted(set(int(k) for k in ks)))
    ref_labels = np.asarray(ref_labels)
    if ref_labels.shape[0] != np.shape(ref_embeddings)[0]:
        raise ValueError('ref_labels and ref_embeddings differ in length')
    _, idx = knn_search(query_embeddings, ref_embeddings, k=ks[-1], **search_kwargs)
    return {k: majority_vote(ref_labels[idx][:, :k]) for k in ks}
