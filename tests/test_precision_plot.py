"""The bf16 precision check's verdict and its loss-curve picture (bench/plot_curves.py).

The verdict is what makes "bf16 must not diverge" visible in the JSON, so a bf16 run
that is NaN or far outside the seed noise must read as diverged, and one inside it must
not. The picture is checked by its pixels: a line that breaks at NaN and rises where the
values rise, at the axis positions its own tick range implies.
"""
import math

import numpy as np
import pytest
from PIL import Image

from bench import plot_curves
from bench.experiments.precision_check import gaps, verdict


def _runs(ref, bf16, seed_b):
    return {'f32': {'loss': np.asarray(ref, float)}, 'bf16': {'loss': np.asarray(bf16, float)},
            'f32_seed_b': {'loss': np.asarray(seed_b, float)}}


def _verdict(runs, factor=3.0, last=5):
    return verdict(gaps(runs['f32'], runs['bf16'], last),
                   gaps(runs['f32'], runs['f32_seed_b'], last), runs, factor)


def test_verdict_within_seed_noise_is_not_diverged():
    rng = np.random.default_rng(0)
    ref = 1.0 - 0.01 * np.arange(20) + rng.normal(0, 0.01, 20)
    seed_b = ref + rng.normal(0, 0.02, 20)
    bf16 = ref + rng.normal(0, 0.01, 20)
    out = _verdict(_runs(ref, bf16, seed_b))
    assert out['diverged'] is False and out['reasons'] == []


def test_verdict_far_outside_seed_noise_is_diverged():
    ref = 1.0 - 0.01 * np.arange(20)
    seed_b = ref + 0.001 * (-1) ** np.arange(20)
    bf16 = ref + np.linspace(0, 0.5, 20)  # drifts away: both the level and the curve
    out = _verdict(_runs(ref, bf16, seed_b))
    assert out['diverged'] is True and len(out['reasons']) == 2


def test_verdict_nonfinite_bf16_is_diverged_and_nonfinite_reference_unknown():
    ref = np.linspace(1, 0.5, 20)
    bad = ref.copy()
    bad[12] = np.nan
    out = _verdict(_runs(ref, bad, ref + 0.01))
    assert out['diverged'] is True and out['reasons'] == ['non-finite bf16 loss']
    inf_bf16 = ref.copy()
    inf_bf16[-1] = np.inf
    assert _verdict(_runs(ref, inf_bf16, ref + 0.01))['diverged'] is True
    assert _verdict(_runs(bad, ref, ref + 0.01))['diverged'] is None


def test_verdict_near_zero_final_seed_gap_does_not_make_noise_a_divergence():
    # The two seeds end at the same level by chance, but differ step to step: the
    # yardstick must not collapse to zero.
    ref = np.tile([1.0, 1.1], 10)
    seed_b = np.tile([1.1, 1.0], 10)  # final means over 4 steps are equal
    bf16 = ref + 0.02
    out = _verdict(_runs(ref, bf16, seed_b), last=4)
    assert out['diverged'] is False


@pytest.mark.parametrize('low,high', [(0, 199), (-0.0312, -0.0021), (4.1, 4.9),
                                      (0.173, 0.1925), (-2.3, 0.7), (1.0, 1.0)])
def test_nice_ticks_are_round_evenly_spaced_and_cover_the_range(low, high):
    ticks, decimals = plot_curves.nice_ticks(low, high)
    assert ticks[0] <= low and ticks[-1] >= high and 3 <= len(ticks) <= 9
    steps = np.diff(ticks)
    np.testing.assert_allclose(steps, steps[0], rtol=1e-9)
    mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
    assert min(abs(mantissa - m) for m in (1, 2, 2.5, 5)) < 1e-9
    labels = [f'{t:.{decimals}f}' for t in ticks]
    assert len(set(labels)) == len(labels)  # enough decimals to tell ticks apart
    np.testing.assert_allclose([float(s) for s in labels], ticks, atol=1e-12)


def test_running_mean_matches_a_trailing_window_average():
    values = np.random.default_rng(1).normal(size=50)
    got = plot_curves.running_mean(list(values), 7)
    want = [values[max(0, i - 6):i + 1].mean() for i in range(50)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    with_nan = plot_curves.running_mean([1.0, float('nan'), 3.0, 5.0], 3)
    assert with_nan[1] is None and with_nan[2:] == [3.0, 4.0]  # restarts after a gap


def test_curve_pixels_rise_with_the_values_and_break_at_nan(tmp_path):
    values = [float(s) for s in range(101)]
    values[40:61] = [float('nan')] * 21
    path = plot_curves.save_curve_panels(str(tmp_path / 'c.png'), 'title',
                                         [('panel', [('rising', values)])], smooth=1)
    pixels = np.asarray(Image.open(path).convert('RGB'))
    thick = np.all(pixels == plot_curves.COLOURS[0], axis=-1)
    # Where step s lands on the x axis, from the axis' own tick range.
    xticks, _ = plot_curves.nice_ticks(0, 100, count=9)
    x0, x1 = plot_curves.LEFT, plot_curves.WIDTH - plot_curves.RIGHT
    y_top = plot_curves.HEADER_H + plot_curves.TOP
    y_bottom = plot_curves.HEADER_H + plot_curves.PANEL_H - plot_curves.BOTTOM

    def column(step):
        return int(round(x0 + (step - xticks[0]) / (xticks[-1] - xticks[0]) * (x1 - x0)))

    def rows(step):
        return np.nonzero(thick[y_top:y_bottom + 1, column(step)])[0] + y_top

    for s in (45, 50, 55):  # inside the NaN gap: no line (the legend sits in a corner)
        assert rows(s).size == 0, s
    heights = [rows(s).mean() for s in (10, 20, 35, 65, 80, 95)]
    assert all(r.size for r in map(rows, (10, 20, 35, 65, 80, 95)))
    assert heights == sorted(heights, reverse=True)  # larger value, higher (smaller row)
    yticks, _ = plot_curves.nice_ticks(0, 100)
    want = y_bottom - (20 - yticks[0]) / (yticks[-1] - yticks[0]) * (y_bottom - y_top)
    assert abs(rows(20).mean() - want) <= 3
