"""Classification metrics for the evaluation protocols, in plain NumPy.

Written in NumPy rather than called from scikit-learn: the bootstrap below scores
thousands of resamples, and scikit-learn's per-call input validation would dominate;
tests check every function against scikit-learn on the same inputs. Conventions
follow scikit-learn's defaults:

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
        raise ValueError(f'y_true {y_true.shape} and y_pred {y_pred.shape} must be equal 1-D')
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
        'n': int(y_true.size),
        'accuracy': float(np.mean(y_true == y_pred)) if y_true.size else float('nan'),
        'balanced_accuracy': float(recall.mean()) if recall.size else float('nan'),
        'macro_f1': float(f1.mean()) if f1.size else float('nan'),
        'per_class_f1': {_python_scalar(c): float(v) for c, v in zip(labels, f1)},
    }
    if positive_label is not None:
        positive = _python_scalar(np.asarray(positive_label)[()])
        out['positive_f1'] = out['per_class_f1'].get(positive, 0.0)
    return out


def _binary_inputs(y_true, scores):
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f'y_true {y.shape} and scores {s.shape} differ')
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
        return float('nan')
    order = np.argsort(s, kind='mergesort')
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # Average rank (1-based) over each run of tied scores [a, b): (a + 1 + b) / 2.
    new_run = np.empty(s.size, bool)
    new_run[0] = True
    np.not_equal(sorted_s[1:], sorted_s[:-1], out=new_run[1:])
    starts = np.flatnonzero(new_run)
    ends = np.append(starts[1:], s.size)
    ranks[order] = (0.5 * (starts + 1 + ends))[np.cumsum(new_run) - 1]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(y_true, scores):
    """(fpr, tpr, thresholds) at every distinct score, thresholds descending.

    Predicting positive when ``score >= threshold``. Starts with threshold +inf
    (nothing positive), like scikit-learn with ``drop_intermediate=False``.
    """
    y, s = _binary_inputs(y_true, scores)
    order = np.argsort(-s, kind='mergesort')
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


# ------------------------------------------------------ test-set size and intervals

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
# Below these a slide-level score is reported with a caution: with 2 test slides an
# AUC is 0, 0.5 or 1, and even 20 slides give a 95% interval about +-0.2 wide.
MIN_TEST_SLIDES = 20
MIN_TEST_PER_CLASS = 5


def bootstrap_indices(n, n_resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED):
    """[n_resamples, n] sample indices, row b the b-th resample (drawn with replacement):
    ``np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))``, the same
    stream as n_resamples successive ``integers(0, n, n)`` draws."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def mean_over_seeds(values):
    """The mean of the finite values (NaN when none): np.nanmean of a few floats, without
    its overhead (a bootstrap takes thousands)."""
    finite = [float(v) for v in values if np.isfinite(v)]
    return sum(finite) / len(finite) if finite else float('nan')


def bootstrap_ci(statistic, labels, per_class=False, n_resamples=BOOTSTRAP_RESAMPLES,
                 confidence=CONFIDENCE, seed=BOOTSTRAP_SEED):
    """Percentile bootstrap confidence interval of a score over samples (test slides).

    Args:
      statistic: callable(idx) -> float, the score on the samples ``idx`` (an index
        array into the test set, with repeats); ``statistic(arange(n))`` is the estimate.
        A multi-seed score averages its seeds inside (each resample scores every seed
        on the same slides).
      labels: the samples' class indices [n], for ``per_class``.
      per_class: the score needs every class (AUC, balanced accuracy): a resample that
        lacks a class of ``labels`` is skipped, and counted.
      n_resamples, confidence, seed: resamples are ``bootstrap_indices(n, n_resamples,
        seed)``: the same for every score of one test set, so intervals are
        reproducible.

    A resample whose score is NaN is skipped and counted too. The interval is the
    (1 - confidence) / 2 and (1 + confidence) / 2 percentiles (NumPy's linear
    interpolation) of the scores of the resamples kept.

    Returns:
      {estimate, low, high, confidence, n_resamples, n_skipped}; low and high are None
      when no resample could be scored (no test sample, or a class never drawn).
    """
    labels = np.asarray(labels).ravel()
    n = labels.size
    estimate = float(statistic(np.arange(n))) if n else float('nan')
    out = {'estimate': estimate, 'low': None, 'high': None, 'confidence': confidence,
           'n_resamples': int(n_resamples) if n else 0, 'n_skipped': 0}
    if not n:
        return out
    classes, codes = np.unique(labels, return_inverse=True)
    values = []
    for idx in bootstrap_indices(n, n_resamples, seed):
        if per_class and np.bincount(codes[idx], minlength=classes.size).min() == 0:
            continue
        value = float(statistic(idx))
        if np.isfinite(value):
            values.append(value)
    out['n_skipped'] = int(n_resamples) - len(values)
    if values:
        tail = 100.0 * (1.0 - confidence) / 2.0
        low, high = np.percentile(values, [tail, 100.0 - tail])
        out['low'], out['high'] = float(low), float(high)
    return out


def count_test_slides(labels, class_names, min_slides=MIN_TEST_SLIDES,
                  min_per_class=MIN_TEST_PER_CLASS):
    """{n_test_slides, n_test_per_class ({class name: count}), caution}: ``caution`` is
    None, or one line when the test set has fewer than ``min_slides`` slides or a class
    fewer than ``min_per_class`` ("2 test slides: scores are not measurable at this
    size (...)")."""
    labels = np.asarray(labels, np.int64).ravel()
    counts = np.bincount(labels, minlength=len(class_names)) if labels.size else \
        np.zeros(len(class_names), np.int64)
    per_class = {str(name): int(c) for name, c in zip(class_names, counts)}
    n = int(labels.size)
    small = [name for name, c in per_class.items() if c < min_per_class]
    caution = None
    if n < min_slides or small:
        listed = ', '.join(f'{c} {name}' for name, c in per_class.items())
        caution = (f'{n} test slides: scores are not measurable at this size ({listed}; '
                   f'a score needs at least {min_slides} test slides and {min_per_class} '
                   f'of each class, and below that the bootstrap interval understates '
                   f'the uncertainty too)')
    return {'n_test_slides': n, 'n_test_per_class': per_class, 'caution': caution}


def slide_scores_report(labels, class_names, scores, n_seeds=1,
                        n_resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED):
    """The test-set block of a slide-level result: ``count_test_slides`` (n_test_slides,
    n_test_per_class, caution), ``confidence_intervals`` ({name: ``bootstrap_ci``} for
    ``scores`` {name: (statistic(idx), per_class)}, all on the same resamples) and
    ``bootstrap``, one line saying how they were computed."""
    labels = np.asarray(labels, np.int64).ravel()
    out = count_test_slides(labels, class_names)
    out['confidence_intervals'] = {
        name: bootstrap_ci(statistic, labels, per_class, n_resamples, CONFIDENCE, seed)
        for name, (statistic, per_class) in scores.items()}
    skipping = [name for name, (_, per_class) in scores.items() if per_class]
    line = (f'{CONFIDENCE:.0%} percentile bootstrap over the {labels.size} test slides '
            f'({n_resamples} resamples drawn with replacement, seed {seed})')
    if n_seeds > 1:
        line += (f'; each resample scores all {n_seeds} seeds on the same slides and '
                 f'averages them: the interval of the seed mean, for other test slides '
                 f"(the seeds' spread is the std)")
    if skipping:
        line += (f'; {", ".join(skipping)}: resamples lacking a class are skipped and '
                 f'counted in n_skipped')
    out['bootstrap'] = line
    return out


def format_interval(ci, digits=3):
    """'0.875 [0.775, 0.950]' from a ``bootstrap_ci`` result ('[n/a]' for no interval)."""
    estimate = f'{ci["estimate"]:.{digits}f}'
    if ci['low'] is None:
        return f'{estimate} [n/a]'
    return f'{estimate} [{ci["low"]:.{digits}f}, {ci["high"]:.{digits}f}]'
