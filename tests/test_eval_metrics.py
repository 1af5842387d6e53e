"""The NumPy metrics equal scikit-learn's on the same predictions."""

import numpy as np
import pytest
from sklearn import metrics as skm

from clusiam_jax.eval.metrics import classification_metrics, roc_auc, roc_curve, youden_threshold


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 4, 200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 5, 200))  # 4: predicted only
    m = classification_metrics(y_true, y_pred, positive_label=2)
    labels = np.unique(np.concatenate([y_true, y_pred]))
    assert m['accuracy'] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert m['macro_f1'] == pytest.approx(skm.f1_score(y_true, y_pred, average='macro'))
    with pytest.warns(UserWarning):  # sklearn warns about the predicted-only class
        assert m['balanced_accuracy'] == pytest.approx(
            skm.balanced_accuracy_score(y_true, y_pred))
    per_class = skm.f1_score(y_true, y_pred, average=None, labels=labels)
    assert list(m['per_class_f1']) == labels.tolist()
    np.testing.assert_allclose(list(m['per_class_f1'].values()), per_class)
    binary = skm.f1_score(y_true == 2, y_pred == 2)
    assert m['positive_f1'] == pytest.approx(binary)


def test_string_labels_and_explicit_label_set():
    y_true = np.array(['normal', 'tumor', 'tumor', 'normal', 'tumor'])
    y_pred = np.array(['normal', 'normal', 'tumor', 'normal', 'tumor'])
    m = classification_metrics(y_true, y_pred, positive_label='tumor')
    assert m['positive_f1'] == pytest.approx(skm.f1_score(y_true, y_pred, pos_label='tumor'))
    # A label that never occurs counts as F1 0 in the macro average, as in sklearn.
    labels = ['normal', 'other', 'tumor']
    m = classification_metrics(y_true, y_pred, labels=labels)
    assert m['macro_f1'] == pytest.approx(
        skm.f1_score(y_true, y_pred, labels=labels, average='macro', zero_division=0))


def test_roc_auc_with_ties_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300) + 0.3 * y, 1)  # rounding makes many ties
    assert roc_auc(y, scores) == pytest.approx(skm.roc_auc_score(y, scores))
    assert np.isnan(roc_auc(np.ones(5), np.arange(5)))


def test_roc_curve_and_youden_match_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 120)
    scores = np.round(rng.random(120) + 0.5 * y, 2)
    fpr, tpr, thr = roc_curve(y, scores)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert youden_threshold(y, scores) == pytest.approx(sk_thr[np.argmax(sk_tpr - sk_fpr)])
