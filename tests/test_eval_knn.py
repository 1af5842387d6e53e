"""Chunked cosine kNN against constructed neighbours and a brute-force reference."""

import numpy as np
import pytest

from clusiam_jax.eval.knn import knn_evaluate
from clusiam_jax.knn import knn_predict, knn_search, majority_vote


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_known_nearest_neighbour_with_uneven_chunks():
    rng = np.random.default_rng(0)
    refs = rng.normal(size=(101, 24)).astype(np.float32)
    owner = rng.integers(0, 101, 37)
    # Each query is a scaled, slightly perturbed copy of one reference: cosine
    # ignores the scale, so that reference must come first.
    queries = 3.0 * refs[owner] + 0.01 * rng.normal(size=(37, 24)).astype(np.float32)
    for q_chunk, r_chunk in [(8, 13), (37, 101), (5, 1000), (1, 7)]:
        sims, idx = knn_search(queries, refs, k=5, query_chunk=q_chunk, ref_chunk=r_chunk)
        np.testing.assert_array_equal(idx[:, 0], owner)
        brute = _unit(queries) @ _unit(refs).T
        expect = np.argsort(-brute, axis=1, kind='stable')[:, :5]
        np.testing.assert_array_equal(idx, expect)
        np.testing.assert_allclose(sims, np.take_along_axis(brute, expect, 1), atol=1e-5)


def test_duplicate_references_tie_to_smaller_index():
    refs = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], np.float32)
    _, idx = knn_search(np.array([[2, 0.0], [0, 5.0]], np.float32), refs, k=2, ref_chunk=3)
    np.testing.assert_array_equal(idx, [[0, 2], [1, 3]])


def test_k_larger_than_references_is_rejected():
    with pytest.raises(ValueError):
        knn_search(np.ones((2, 3)), np.ones((2, 3)), k=3)


def test_majority_vote_counts_then_nearest_breaks_ties():
    labels = np.array([
        [1, 2, 2],        # 2 has more votes
        [3, 1, 1, 3],     # 1 and 3 tie; 3 is nearer
        [0, 1, 2, 1],     # 1 wins on votes although 0 is nearest
    ], dtype=object)
    assert majority_vote(np.array([labels[0]])).tolist() == [2]
    assert majority_vote(np.array([labels[1]])).tolist() == [3]
    assert majority_vote(np.array([labels[2]])).tolist() == [1]
    assert majority_vote(np.array([['b', 'a']])).tolist() == ['b']


def test_top1_and_topk_predictions_on_clusters():
    rng = np.random.default_rng(1)
    centers = _unit(rng.normal(size=(3, 16)))
    ref_y = np.repeat([0, 1, 2], 30)
    refs = centers[ref_y] + 0.05 * rng.normal(size=(90, 16))
    # One mislabelled reference sits exactly on a query's direction: top-1
    # copies its wrong label, top-5 majority outvotes it.
    query_y = np.array([0, 1, 2, 0])
    queries = centers[query_y] + 0.05 * rng.normal(size=(4, 16))
    refs[0] = 10 * queries[1]
    preds = knn_predict(refs, ref_y, queries, ks=(1, 5), query_chunk=3, ref_chunk=17)
    assert preds[1].tolist() == [0, 0, 2, 0]
    assert preds[5].tolist() == [0, 1, 2, 0]
    result = knn_evaluate(refs, ref_y, queries, query_y, ks=(1, 5), positive_label=1)
    assert result['k=5']['accuracy'] == 1.0
    assert result['k=1']['accuracy'] == 0.75
    assert result['k=1']['positive_f1'] == 0.0
