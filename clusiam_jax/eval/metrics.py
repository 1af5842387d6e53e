"""The evaluators' scores, the bootstrap interval over test slides and the small-test-set
caution. Scores a bootstrap repeats are NumPy: scikit-learn checks its input for longer."""
import numpy as np
from sklearn import metrics as skm

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
# Below these a slide-level score comes with a caution (2 test slides: an AUC is 0, 0.5 or 1).
MIN_TEST_SLIDES = 20
MIN_TEST_PER_CLASS = 5


def classification_metrics(y_true, y_pred, labels=None, positive_label=None):
    """{n, accuracy, balanced_accuracy (over y_true's classes), macro_f1, per_class_f1} over
    `labels` (default: all seen), and positive_f1 of `positive_label` (0 if never seen)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f'y_true {y_true.shape} and y_pred {y_pred.shape} must be equal 1-D')
    labels = np.unique(np.concatenate([y_true, y_pred])) if labels is None else np.asarray(labels)
    _, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    out = {'n': int(y_true.size), 'accuracy': float(np.mean(y_true == y_pred)),
           'balanced_accuracy': float(np.mean(recall[support > 0])), 'macro_f1': float(np.mean(f1)),
           'per_class_f1': {c: float(v) for c, v in zip(labels.tolist(), f1)}}
    if positive_label is not None:
        out['positive_f1'] = out['per_class_f1'].get(np.asarray(positive_label).item(), 0.0)
    return out


def roc_auc(y_true, scores):
    """ROC AUC (truthy y_true = positive, ties half); NaN, not an error, with a class absent."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, np.float64).ravel()
    positive, negative = s[y], np.sort(s[~y])
    if not positive.size or not negative.size:
        return float('nan')
    below = (np.searchsorted(negative, positive, 'left')
             + np.searchsorted(negative, positive, 'right'))
    return float(below.sum() / (2 * positive.size * negative.size))


def per_class_auc(labels, scores):
    """AUC of scores[:, c] for "label == c", for every class c (NaN if undefined)."""
    labels = np.asarray(labels)
    return [roc_auc(labels == c, scores[:, c]) for c in range(scores.shape[1])]


def nanmean(values):
    """The mean of the finite values; NaN (without NumPy's warning) when none is."""
    values = np.asarray(values, np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float('nan')


def roc_curve(y_true, scores):
    """(fpr, tpr, thresholds) at every distinct score, thresholds descending from +inf."""
    return skm.roc_curve(y_true, scores, drop_intermediate=False)


def youden_threshold(y_true, scores):
    """The first threshold maximizing Youden's J = TPR - FPR; 0.5 with one class absent."""
    y = np.asarray(y_true).astype(bool).ravel()
    if y.all() or not y.any():
        return 0.5
    fpr, tpr, thresholds = roc_curve(y, np.asarray(scores, np.float64).ravel())
    best = int(np.argmax(tpr - fpr))
    # +inf (never positive) wins only when no threshold separates at all.
    return float(thresholds[best] if np.isfinite(thresholds[best]) else thresholds[1])


def log_softmax(logits):  # float64
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def argmax_accuracy(labels, scores):
    return float(np.mean(np.argmax(scores, axis=1) == np.asarray(labels)))


def argmax_balanced_accuracy(labels, scores):
    """The mean recall, over the classes present, of the highest-scoring class."""
    labels, c = np.asarray(labels), scores.shape[1]
    support = np.bincount(labels, minlength=c)
    hits = np.bincount(labels[np.argmax(scores, axis=1) == labels], minlength=c)
    present = support > 0
    return float(np.mean(hits[present] / support[present])) if present.any() else float('nan')


def slide_auc(labels, probs):
    """AUC of class 1 for two classes; the mean one-vs-rest AUC over classes for more."""
    probs = np.asarray(probs)
    if probs.shape[1] == 2:
        return roc_auc(np.asarray(labels) == 1, probs[:, 1])
    return nanmean(per_class_auc(labels, probs))


# name: (score(labels, probs), needs every class); the scores of slide_metrics.
SLIDE_SCORES = {'accuracy': (argmax_accuracy, False),
                'balanced_accuracy': (argmax_balanced_accuracy, True), 'auc': (slide_auc, True)}


def slide_metrics(labels, logits):
    """{n, SLIDE_SCORES, loss (mean cross-entropy)} of slide logits [n, C]."""
    labels = np.asarray(labels)
    log_probs = log_softmax(logits)
    probs = np.exp(log_probs)
    return {'n': int(labels.size),
            **{name: score(labels, probs) for name, (score, _) in SLIDE_SCORES.items()},
            'loss': float(-np.mean(log_probs[np.arange(labels.size), labels]))}


def seed_stats(values):
    """{mean, std (population), values} over seeds, NaN ignored."""
    values = np.asarray(values, np.float64)
    std = float(np.nanstd(values)) if np.isfinite(values).any() else float('nan')
    return {'mean': nanmean(values), 'std': std, 'values': values.tolist()}


def bootstrap_ci(statistic, labels, per_class=False, n_resamples=BOOTSTRAP_RESAMPLES,
                 seed=BOOTSTRAP_SEED):
    """Percentile bootstrap interval of `statistic(idx)`, a score on test samples `idx`, over
    resamples drawn from `seed` (the same for every score); one scored NaN, or (`per_class`)
    lacking a class, is skipped and counted. low and high are None when nothing was scored."""
    labels = np.asarray(labels).ravel()
    n = labels.size
    estimate = float(statistic(np.arange(n))) if n else float('nan')
    out = {'estimate': estimate, 'low': None, 'high': None, 'confidence': CONFIDENCE,
           'n_resamples': int(n_resamples) if n else 0, 'n_skipped': 0}
    if not n:
        return out
    classes, codes = np.unique(labels, return_inverse=True)
    values = []
    for idx in np.random.default_rng(seed).integers(0, n, size=(n_resamples, n)):
        if per_class and np.bincount(codes[idx], minlength=classes.size).min() == 0:
            continue
        value = float(statistic(idx))
        if np.isfinite(value):
            values.append(value)
    out['n_skipped'] = int(n_resamples) - len(values)
    if values:
        tail = 100.0 * (1.0 - CONFIDENCE) / 2.0
        low, high = np.percentile(values, [tail, 100.0 - tail])
        out['low'], out['high'] = float(low), float(high)
    return out


def count_test_slides(labels, class_names):
    """{n_test_slides, n_test_per_class, caution (a line when too few slides, else None)}."""
    labels = np.asarray(labels, np.int64).ravel()
    counts = np.bincount(labels, minlength=len(class_names))
    per_class = {str(name): int(c) for name, c in zip(class_names, counts)}
    n = int(labels.size)
    caution = None
    if n < MIN_TEST_SLIDES or min(per_class.values()) < MIN_TEST_PER_CLASS:
        listed = ', '.join(f'{c} {name}' for name, c in per_class.items())
        caution = (f'{n} test slides: scores are not measurable at this size ({listed}; '
                   f'a score needs at least {MIN_TEST_SLIDES} test slides and '
                   f'{MIN_TEST_PER_CLASS} of each class, and below that the bootstrap '
                   f'interval understates the uncertainty too)')
    return {'n_test_slides': n, 'n_test_per_class': per_class, 'caution': caution}


def slide_scores_report(labels, class_names, scores, n_seeds=1):
    """count_test_slides + {name: bootstrap_ci} of `scores` {name: (statistic, per_class)}."""
    labels = np.asarray(labels, np.int64).ravel()
    out = count_test_slides(labels, class_names)
    out['confidence_intervals'] = {name: bootstrap_ci(statistic, labels, per_class)
                                   for name, (statistic, per_class) in scores.items()}
    skipping = [name for name, (_, per_class) in scores.items() if per_class]
    line = (f'{CONFIDENCE:.0%} percentile bootstrap over the {labels.size} test slides '
            f'({BOOTSTRAP_RESAMPLES} resamples drawn with replacement, seed {BOOTSTRAP_SEED})')
    if n_seeds > 1:
        line += (f'; each resample scores all {n_seeds} seeds on the same slides and '
                 f'averages them: the interval of the seed mean, for other test slides '
                 f"(the seeds' spread is the std)")
    if skipping:
        line += (f'; {", ".join(skipping)}: resamples lacking a class are skipped and '
                 f'counted in n_skipped')
    out['bootstrap'] = line
    return out


def seed_mean_intervals(labels, class_names, scores, per_seed):
    """slide_scores_report of the seed mean of `scores` {name: (score(labels, data, *rest),
    per_class)} over `per_seed` [(data [n, ...], *rest)], every seed on the same resample."""
    labels = np.asarray(labels, np.int64)

    def seed_mean(score):
        def statistic(idx):  # np.nanmean of a few floats without its overhead
            finite = [v for v in (float(score(labels[idx], data[idx], *rest))
                                  for data, *rest in per_seed) if np.isfinite(v)]
            return sum(finite) / len(finite) if finite else float('nan')
        return statistic
    means = {name: (seed_mean(score), per_class) for name, (score, per_class) in scores.items()}
    return slide_scores_report(labels, class_names, means, n_seeds=len(per_seed))


def format_interval(ci, digits=3):
    """'0.875 [0.775, 0.950]' from a bootstrap_ci result ('[n/a]' for no interval)."""
    estimate = f'{ci["estimate"]:.{digits}f}'
    if ci['low'] is None:
        return f'{estimate} [n/a]'
    return f'{estimate} [{ci["low"]:.{digits}f}, {ci["high"]:.{digits}f}]'
