"""The collapse warnings of the training log (docs/method.md §6): mode 2 (near-uniform
logits) only when the Gumbel agreement is below 1.5/K by more than its sampling noise,
against scipy's exact binomial test as the reference; mode 1 from the active clusters."""
import pytest
from scipy import stats

from clusiam_jax.train.metrics import collapse_warnings

K = 10


def flags_mode_2(agreement, samples):
    return any('mode 2' in w for w in collapse_warnings(
        {'gumbel_agreement': agreement, 'active_clusters_gumbel': K}, K, samples))


@pytest.mark.parametrize('agreement, samples', [
    (0.125, 64),        # the demo: 64 assignments an epoch, agreement just under 1.5/K
    (0.09, 64),
    (0.06, 64),         # a demo-sized epoch whose logits really are uniform
    (0.14, 5_000),
    (0.12, 2_000),
    (0.10, 200),
    (0.10, 100_000),    # a real epoch whose logits are uniform
    (0.60, 100_000),    # a healthy one
])
def test_mode_2_follows_a_one_sided_binomial_test(agreement, samples):
    """Flagged exactly when the exact test rejects 'agreement >= 1.5/K' at 5%, on cases
    on both sides of the line (a bound with the observed variance instead flagged
    0.09 of 64, which the exact test does not reject)."""
    exact = stats.binomtest(round(agreement * samples), samples, 1.5 / K,
                            alternative='less').pvalue < 0.05
    assert flags_mode_2(agreement, samples) == exact


def test_the_demo_epoch_no_longer_warns_but_a_large_uniform_one_does():
    assert 0.125 < 1.5 / K  # the old rule (agreement < 1.5/K) flagged the demo
    assert not flags_mode_2(0.125, 64)
    assert flags_mode_2(0.10, 100_000)


def test_mode_1_when_gumbel_noise_cannot_spread_the_assignments():
    warnings = collapse_warnings({'active_clusters_gumbel': 2.0, 'gumbel_agreement': 0.99},
                                 100, 10_000)
    assert len(warnings) == 1 and 'mode 1' in warnings[0]
    assert not collapse_warnings({'active_clusters_gumbel': 40.0, 'gumbel_agreement': 0.7},
                                 100, 10_000)
