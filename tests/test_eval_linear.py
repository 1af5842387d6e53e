"""Linear probe: the optimum equals scikit-learn's, selection uses validation only."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from clusiam_jax.eval.linear import fit_logistic_regression, linear_probe, validation_split


def _blobs(rng, n, means, noise=1.0):
    y = rng.integers(0, len(means), n)
    return (means[y] + noise * rng.normal(size=(n, means.shape[1]))).astype(np.float32), y


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_lbfgs_reaches_sklearn_optimum():
    rng = np.random.default_rng(0)
    x, y = _blobs(rng, 300, rng.normal(size=(3, 8)))
    wd = 1e-2
    params = fit_logistic_regression(x, y, 3, wd, max_iter=500, tol=1e-6)
    # sklearn minimizes C * sum(CE) + |W|^2 / 2, i.e. ours with wd = 1 / (C N).
    ref = LogisticRegression(C=1.0 / (wd * len(y)), tol=1e-10, max_iter=10000).fit(x, y)
    np.testing.assert_allclose(_softmax(x @ params['w'] + params['b']),
                               ref.predict_proba(x), atol=2e-3)
    np.testing.assert_allclose(params['w'], ref.coef_.T, atol=5e-3)


def test_probe_beats_chance_and_picks_wd_on_validation():
    rng = np.random.default_rng(1)
    means = 0.7 * rng.normal(size=(4, 32))
    x, y = _blobs(rng, 700, means)
    tx, ty = _blobs(rng, 300, means)
    # A constant offset and per-feature scale must not matter: standardization.
    scale = rng.uniform(0.1, 50, 32).astype(np.float32)
    shifted = linear_probe(x * scale + 100, y, tx * scale + 100, ty, seed=3)
    result = linear_probe(x, y, tx, ty, seed=3)
    assert result['test']['accuracy'] > 0.8            # chance is 0.25
    assert shifted['weight_decay'] == result['weight_decay']
    assert shifted['test']['accuracy'] == pytest.approx(result['test']['accuracy'], abs=0.01)
    scores = result['val_scores']
    best = max(scores.values())
    assert result['weight_decay'] == max(wd for wd, s in scores.items() if s == best)
    # The test split plays no part in selection: scrambled test labels change
    # nothing but the test metrics.
    scrambled = linear_probe(x, y, tx, rng.permutation(ty), seed=3)
    assert scrambled['weight_decay'] == result['weight_decay']
    assert scrambled['val_scores'] == result['val_scores']


def test_explicit_validation_set_and_string_labels():
    rng = np.random.default_rng(2)
    means = 2.0 * rng.normal(size=(2, 6))
    names = np.array(['normal', 'tumor'])
    x, y = _blobs(rng, 200, means)
    vx, vy = _blobs(rng, 100, means)
    tx, ty = _blobs(rng, 100, means)
    result = linear_probe(x, names[y], tx, names[ty], val_x=vx, val_y=names[vy],
                          weight_decays=(1e-3, 1e-1), positive_label='tumor')
    assert result['classes'] == ['normal', 'tumor']
    assert set(result['val_scores']) == {1e-3, 1e-1}
    assert result['test']['positive_f1'] > 0.9


def test_validation_split_keeps_groups_whole_and_classes_in_train():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 500)
    groups = rng.integers(0, 25, 500)
    tr, va = validation_split(labels, 0.2, seed=0, groups=groups)
    assert not set(groups[tr]) & set(groups[va])
    assert len(tr) + len(va) == 500 and len(set(groups[va])) == 5
    tr, va = validation_split(np.array([0, 0, 0, 0, 0, 1]), 0.5, seed=0)
    assert 5 in tr and len(va) == 2
