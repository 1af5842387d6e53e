"""Bootstrap intervals over test slides and the small-test-set caution (eval/metrics.py)."""
import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, roc_auc_score

from clusiam_jax.eval.metrics import (
    bootstrap_ci,
    count_test_slides,
    format_interval,
    roc_auc,
    slide_scores_report,
)


def _percentile(values, q):
    """NumPy's default ('linear') percentile, by hand."""
    v = sorted(values)
    pos = q / 100 * (len(v) - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def _pairwise_auc(labels, scores):
    """AUC by its definition: P(positive scores above negative), ties counting half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    return np.mean((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None]))


def _accuracy(labels, predicted):
    return np.mean(labels == predicted)


def _brute_force(score, labels, predictions, per_class, n_resamples=1000, seed=0):
    """One resample at a time (rng.integers(0, n, n) each), scored by ``score``;
    resamples lacking a class (per_class) are skipped and counted."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    values, skipped = [], 0
    for _ in range(n_resamples):
        idx = rng.integers(0, n, n)
        if per_class and len(set(labels[idx])) < len(set(labels)):
            skipped += 1
            continue
        values.append(score(labels[idx], predictions[idx]))
    return _percentile(values, 2.5), _percentile(values, 97.5), skipped


def test_accuracy_interval_equals_a_brute_force_resampling_loop():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 13)
    predicted = np.where(rng.random(13) < 0.7, labels, 1 - labels)
    ci = bootstrap_ci(lambda idx: np.mean(labels[idx] == predicted[idx]), labels)
    low, high, skipped = _brute_force(_accuracy, labels, predicted, per_class=False)
    assert ci['estimate'] == pytest.approx(accuracy_score(labels, predicted))
    assert (ci['low'], ci['high']) == (pytest.approx(low), pytest.approx(high))
    assert ci['n_skipped'] == skipped == 0 and ci['n_resamples'] == 1000
    assert ci['confidence'] == 0.95
    assert ci['low'] <= ci['estimate'] <= ci['high']


def test_auc_interval_skips_one_class_resamples_like_a_brute_force_loop():
    # 2 positives of 9: about (7/9)^9 + (2/9)^9 = 10% of the resamples have no positive.
    labels = np.array([0, 0, 1, 0, 0, 0, 1, 0, 0])
    scores = np.array([0.1, 0.4, 0.35, 0.2, 0.8, 0.3, 0.9, 0.05, 0.5])
    ci = bootstrap_ci(lambda idx: roc_auc(labels[idx] == 1, scores[idx]), labels,
                      per_class=True)
    low, high, skipped = _brute_force(_pairwise_auc, labels, scores, per_class=True)
    assert ci['n_skipped'] == skipped
    assert 50 < skipped < 150            # expected 1000 * 0.1044
    assert (ci['low'], ci['high']) == (pytest.approx(low), pytest.approx(high))
    assert ci['estimate'] == pytest.approx(roc_auc_score(labels, scores))
    assert ci['low'] <= ci['estimate'] <= ci['high']
    # Undefined everywhere (one class only): every resample skipped, no interval.
    none = bootstrap_ci(lambda idx: roc_auc(labels[idx] == 2, scores[idx]), labels)
    assert none['n_skipped'] == 1000 and none['low'] is None and none['high'] is None
    assert format_interval(none) == 'nan [n/a]'


def test_accuracy_interval_matches_binomial_quantiles():
    # Resampling n slides of which k are right: the bootstrap accuracy is Binomial(n, k/n)
    # / n, so its percentiles are the binomial quantiles (up to resampling noise).
    n, k = 200, 160
    right = np.r_[np.ones(k, bool), np.zeros(n - k, bool)]
    ci = bootstrap_ci(lambda idx: right[idx].mean(), right.astype(int))
    dist = stats.binom(n, k / n)
    assert ci['low'] == pytest.approx(dist.ppf(0.025) / n, abs=0.012)
    assert ci['high'] == pytest.approx(dist.ppf(0.975) / n, abs=0.012)


def test_intervals_cover_the_true_accuracy_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    covered = 0
    for _ in range(200):
        right = rng.random(60) < 0.7     # a classifier right 70% of the time
        ci = bootstrap_ci(lambda idx, right=right: right[idx].mean(), right.astype(int),
                          n_resamples=500)
        covered += ci['low'] <= 0.7 <= ci['high']
    # The percentile bootstrap of a proportion undercovers a little at n=60 (~93%).
    assert 0.86 <= covered / 200 <= 0.99, covered


def test_fewer_slides_give_a_wider_interval_and_the_seed_is_fixed():
    def interval(n):
        right = np.arange(n) % 4 != 0    # accuracy 0.75 at every size
        return bootstrap_ci(lambda idx: right[idx].mean(), right.astype(int))
    small, large = interval(8), interval(80)
    assert small['estimate'] == large['estimate'] == 0.75
    assert small['high'] - small['low'] > 1.8 * (large['high'] - large['low'])
    assert interval(8) == small          # a fixed seed: the same interval every time
    values = np.random.default_rng(0).normal(size=25)
    seeds = [bootstrap_ci(lambda idx: values[idx].mean(), np.zeros(25), seed=seed)
             for seed in (0, 0, 1)]
    assert seeds[0] == seeds[1] and seeds[0]['low'] != seeds[2]['low']


def test_caution_for_small_test_sets_only():
    two = count_test_slides([0, 1], ['normal', 'tumour'])
    assert two['n_test_slides'] == 2
    assert two['n_test_per_class'] == {'normal': 1, 'tumour': 1}
    assert two['caution'].startswith('2 test slides: scores are not measurable at this size')
    large = count_test_slides(np.arange(40) % 2, ['normal', 'tumour'])
    assert large['n_test_slides'] == 40 and large['caution'] is None
    few_positive = count_test_slides([0] * 37 + [1] * 3, ['normal', 'tumour'])
    assert few_positive['caution'].startswith('40 test slides: scores are not measurable')
    assert '3 tumour' in few_positive['caution']
    assert count_test_slides([], ['a', 'b'])['caution'].startswith('0 test slides')


def test_report_shares_resamples_and_says_how():
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 2
    scores = rng.normal(size=30) + labels
    report = slide_scores_report(labels, ['a', 'b'], {
        'accuracy': (lambda idx: np.mean((scores[idx] > 0.5) == labels[idx]), False),
        'auc': (lambda idx: roc_auc(labels[idx] == 1, scores[idx]), True)}, n_seeds=3)
    assert report['n_test_slides'] == 30 and report['caution'] is None
    assert set(report['confidence_intervals']) == {'accuracy', 'auc'}
    for ci in report['confidence_intervals'].values():
        assert ci['low'] <= ci['estimate'] <= ci['high']
    assert '30 test slides' in report['bootstrap'] and '1000 resamples' in report['bootstrap']
    assert 'seed mean' in report['bootstrap'] and 'auc: resamples lacking a class' in \
        report['bootstrap']
    assert format_interval(report['confidence_intervals']['auc']).count('[') == 1
