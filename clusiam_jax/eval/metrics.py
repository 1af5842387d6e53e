"""Classification metrics for the evaluation protocols, in plain NumPy.

Written here rather than imported from scikit-learn so that evaluation needs no
extra runtime dependency; tests check every function against scikit-learn on the
same inputs. Conventions follow scikit-learn's defaults:

- the label set is the sorted union of the true and predicted labels unless
  ``labels`` is given;
- F1 of a class is 2TP / (2TP + FP + FN), and 0 when that denominator is 0;
- balanced accuracy is the mean recall over the classes present in ``y_true``.
"""

import numpy as np


def confusion_matrix(y_true, y_pred, labels):
    """Counts [i, j] = number of samples with true labels[i] predicted as labels[j].

    Samples whose true or predicted label is not in ``labels`` are ignored.
    """
    labels = np.asarray(labels)
    index = {label: i for i, label in enumerate(labels.tolist())}
    n = len(labels)
    t = np.array([index.get(v, -1) for v in np.asarray(y_true).tolist()], dtype=np.int64)
    p = np.array([index.get(v, -1) for v in np.asarray(y_pred).tolist()], dtype=np.int64)
    keep = (t >= 0) & (p >= 0)
    counts = np.bincount(t[keep] * n + p[keep], minlength=n * n)
    return counts.reshape(n, n)


def _python_scalar(value):
    # Keeps dictionaries JSON-serializable (np.int64 keys are not).
    return value.item() if isinstance(value, np.generic) else value


def classification_metrics(y_true, y_pred, labels=None, positive_label=None):
    """Accuracy, balanced accuracy, macro F1, per-class F1 and the F1 of a positive class.

    Args:
      y_true, y_pred: 1-D arrays of labels (ints or strings), same length.
      labels: the label set over which macro F1 averages; defaults to the
        sorted union of ``y_true`` and ``y_pred`` (scikit-learn's default).
      positive_label: if given, ``positive_f1`` reports that class's F1 (the
        paper's "tumor F1"); it is 0 when the class never occurs.

    Returns:
      dict with ``accuracy``, ``balanced_accuracy``, ``macro_f1``,
      ``per_class_f1`` ({label: f1}), ``n`` and, if asked, ``positive_f1``.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be equal 1-D")
    if labels is None:
        labels = np.unique(np.concatenate([y_true, y_pred]))
    labels = np.asarray(labels)
    cm = confusion_matrix(y_true, y_pred, labels)
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    support = cm.sum(axis=1)
    present = support > 0
    recall = tp[present] / support[present]
    out = {
        "n": int(y_true.size),
        "accuracy": float(np.mean(y_true == y_pred)) if y_true.size else float("nan"),
        "balanced_accuracy": float(recall.mean()) if recall.size else float("nan"),
        "macro_f1": float(f1.mean()) if f1.size else float("nan"),
        "per_class_f1": {_python_scalar(c): float(v) for c, v in zip(labels, f1)},
    }
    if positive_label is not None:
        positive = _python_scalar(np.asarray(positive_label)[()])
        out["positive_f1"] = out["per_class_f1"].get(positive, 0.0)
    return out


def _binary_inputs(y_true, scores):
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true {y.shape} and scores {s.shape} differ")
    return y, s


def roc_auc(y_true, scores):
    """Area under the ROC curve of binary ``y_true`` (truthy = positive) vs ``scores``.

    Uses the Mann-Whitney statistic with average ranks for ties, which equals the
    trapezoidal area under the ROC curve. NaN when only one class is present
    (scikit-learn raises instead; a per-class AUC over a split that lacks a class
    is undefined, and NaN keeps a multi-seed summary going).
    """
    y, s = _binary_inputs(y_true, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # Average rank (1-based) over each run of tied scores.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = 0.5 * (a + 1 + b)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(y_true, scores):
    """(fpr, tpr, thresholds) at every distinct score, thresholds descending.

    Predicting positive when ``score >= threshold``. Starts with threshold +inf
    (nothing positive), like scikit-learn with ``drop_intermediate=False``.
    """
    y, s = _binary_inputs(y_true, scores)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_run = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tps = np.cumsum(y_sorted)[last_of_run].astype(np.float64)
    fps = np.cumsum(~y_sorted)[last_of_run].astype(np.float64)
    thresholds = np.r_[np.inf, s_sorted[last_of_run]]
    tps = np.r_[0.0, tps]
    fps = np.r_[0.0, fps]
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full_like(tps, np.nan)
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full_like(fps, np.nan)
    return fpr, tpr, thresholds


def youden_threshold(y_true, scores):
    """The score threshold maximizing Youden's J = TPR - FPR (first maximum).

    When the curve is undefined (one class only) returns 0.5, the natural cut
    for a sigmoid score.
    """
    fpr, tpr, thresholds = roc_curve(y_true, scores)
    j = tpr - fpr
    if not np.isfinite(j).any():
        return 0.5
    best = int(np.nanargmax(j))
    threshold = thresholds[best]
    # +inf would mean "never positive"; J there is 0, so it is only chosen when
    # no threshold separates at all. Use the largest score then instead.
    return float(threshold if np.isfinite(threshold) else thresholds[1])
