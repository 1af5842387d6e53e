"""HED stain jitter (augment.hed): the deconvolution against Beer-Lambert's forward model,
the jitter's parameters recovered from the jittered pixels against the configured uniform
distributions, the CPU and device paths against each other, its place in the order, the off
path's draws, and the refusal of grayscale data."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from clusiam_jax.data import augment, stain
from clusiam_jax.errors import DataError
from clusiam_jax.train import device_augment as da
from tests.helpers import data_config, tissue_like

# Ruifrok & Johnston (2001): OD per unit of haematoxylin, eosin, DAB in R, G, B (typed here
# from the paper, not taken from the module under test).
PUBLISHED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])


def _stained(h=32, w=32, seed=5, high=(0.6, 0.5, 0.4)):
    """uint8 pixels made by Beer-Lambert from random stain amounts in [0.05, high]."""
    amounts = np.random.default_rng(seed).uniform(0.05, high, (h, w, 3))
    return np.rint(np.power(10.0, -amounts @ PUBLISHED) * 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# the deconvolution
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('dtype', [np.float64, np.float32])
def test_round_trip_without_jitter_is_the_identity(dtype):
    x = np.random.default_rng(0).random((64, 64, 3)).astype(dtype)
    x[0, 0], x[0, 1], x[0, 2] = 0.0, 1.0, [0.0, 0.5, 1.0]
    back = stain.hed_to_rgb(stain.rgb_to_hed(x))
    assert back.shape == x.shape
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-5)


def test_deconvolution_recovers_the_stain_amounts_of_the_forward_model():
    """Pixels made from known amounts by Beer-Lambert (OD = -log10 I = amounts @ PUBLISHED)
    give those amounts back, also per pixel through np.linalg.solve."""
    rng = np.random.default_rng(1)
    amounts = rng.uniform(0.0, 1.0, (200, 3))
    pixels = np.power(10.0, -amounts @ PUBLISHED)
    np.testing.assert_allclose(stain.rgb_to_hed(pixels), amounts, rtol=0, atol=1e-9)
    for p, want in zip(pixels[:5], amounts[:5]):
        np.testing.assert_allclose(np.linalg.solve(PUBLISHED.T, -np.log10(p)), want, atol=1e-9)
    # A pure-haematoxylin pixel: no eosin, no DAB.
    hed = stain.rgb_to_hed(np.power(10.0, -0.4 * PUBLISHED[0]))
    np.testing.assert_allclose(hed, [0.4, 0.0, 0.0], atol=1e-12)


def test_amounts_are_six_times_scikit_images_where_it_does_not_clip():
    """scikit-image (a test requirement, not a package dependency) divides the natural-log OD by
    ln(1e6) and clips negative amounts to 0; ours are decadic OD, 6x its units."""
    from skimage import color as skcolor
    img = tissue_like(40, 40)
    ours, theirs = stain.rgb_to_hed(img), skcolor.rgb2hed(img)
    np.testing.assert_allclose(np.maximum(ours, 0.0), 6.0 * theirs, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stain.hed_to_rgb(6.0 * theirs), skcolor.hed2rgb(theirs),
                               atol=1e-9)


# ---------------------------------------------------------------------------
# the jitter
# ---------------------------------------------------------------------------

def test_apply_hed_is_the_float_formula_rounded():
    img = tissue_like(48, 56, seed=3)
    rng = np.random.default_rng(2)
    for _ in range(5):
        alpha, beta = stain.sample_hed(rng, 0.2)
        want = np.rint(stain.hed_to_rgb(stain.rgb_to_hed(img) * alpha + beta) * 255)
        got = stain.apply_hed(img, alpha, beta)
        assert got.dtype == np.uint8 and got.shape == img.shape
        diff = np.abs(got.astype(np.int16) - want)
        # float32 against float64: only a value within rounding error of a half level may
        # round the other way.
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    np.testing.assert_array_equal(stain.apply_hed(img, np.ones(3), np.zeros(3)), img)


def _recover(img, jittered):
    """Per draw and stain: (alpha, beta) by least squares of hed_out on hed_in over the
    pixels that no channel clips (a clipped pixel has lost its stain amounts). Images:
    uint8, or float in [0, 1]."""
    hed_in = stain.rgb_to_hed(img).reshape(-1, 3)
    out = []
    for j in jittered:
        flat = np.asarray(j).reshape(-1, 3)
        unit = flat / 255.0 if flat.dtype == np.uint8 else flat
        ok = ((unit > 0) & (unit < 1)).all(axis=1)
        hed_out = stain.rgb_to_hed(unit[ok])
        out.append([np.polyfit(hed_in[ok, c], hed_out[:, c], 1) for c in range(3)])
    return np.asarray(out)  # [draws, 3, (alpha, beta)]


def _check_uniform(v, lo, hi, noise=0.0):
    """v (recovered up to an rms error `noise`) against U(lo, hi): its mean and variance
    within 5 standard errors (s/sqrt(3m) and s^2 sqrt(4/45)/sqrt(m), s the half-width)
    plus what the noise can add, and both ends reached."""
    s, centre, m = (hi - lo) / 2, (hi + lo) / 2, v.size
    assert abs(v.mean() - centre) < 5 * s / math.sqrt(3 * m) + noise
    var_slack = 5 * s * s * math.sqrt(4 / 45 / m) + 2 * noise * s / math.sqrt(3) + noise ** 2
    assert abs(v.var() - s * s / 3) < var_slack, (v.var(), s * s / 3)
    # P(no draw in an outer 2 % of the range) = 0.98^m: below 1e-13 for m >= 1500.
    assert v.min() < lo + 0.04 * s + 5 * noise and v.max() > hi - 0.04 * s - 5 * noise


@pytest.mark.parametrize('strength', [0.05, 0.2])
def test_jitter_statistics_match_the_configured_distribution(strength):
    """alpha_c ~ U(1 - s, 1 + s), beta_c ~ U(-s, s), c = H, E, D, independent: the draws,
    and the same recovered from the jittered uint8 pixels alone."""
    n, s = 1500, strength
    img = _stained()
    drawn = np.stack([np.stack(stain.sample_hed(np.random.default_rng([7, k]), s), axis=-1)
                      for k in range(n)])                                  # [n, 3, 2]
    got = _recover(img, [stain.hed_jitter(img, np.random.default_rng([7, k]), s)
                         for k in range(n)])
    for j, (lo, hi) in enumerate(((1 - s, 1 + s), (-s, s))):
        assert drawn[..., j].min() >= lo and drawn[..., j].max() <= hi
        _check_uniform(drawn[..., j].ravel(), lo, hi)
        # Each image carries its own draw: uint8 rounding (half a level, up to 0.01 OD in
        # the darkest pixels) leaves an error of about 0.001, larger than 0.01 nowhere.
        err = got[..., j] - drawn[..., j]
        assert np.median(np.abs(err)) < 0.002 and np.abs(err).max() < 0.03
        _check_uniform(got[..., j].ravel(), lo, hi, noise=math.sqrt((err ** 2).mean()))
    # Independent across stains and of each other: small correlations only.
    corr = np.corrcoef(got.reshape(n, 6).T)
    assert np.abs(corr - np.eye(6)).max() < 5 / math.sqrt(n)


def test_device_parameters_and_jitter_match_the_cpu_ones():
    """The device path draws the same uniforms, and its float jitter is the CPU path's
    before rounding (same alpha, beta: within half a level plus float error)."""
    n, s = 20000, 0.05
    p = jax.device_get(da.sample_hed(jax.random.PRNGKey(3), n, s))
    for name, lo in (('hed_alpha', 1 - s), ('hed_beta', -s)):
        v = p[name]
        assert v.shape == (n, 3) and v.min() >= lo and v.max() <= lo + 2 * s
        assert np.abs(v.mean(axis=0) - (lo + s)).max() < 5 * s / math.sqrt(3 * n)
        assert np.abs(v.std(axis=0) - s / math.sqrt(3)).max() < 0.02 * s
    img = np.stack([_stained(seed=i) for i in range(4)])
    alpha, beta = p['hed_alpha'][:4], p['hed_beta'][:4]
    dev = np.asarray(da.apply_hed(jnp.asarray(img, jnp.float32) / 255.0, jnp.asarray(alpha),
                                  jnp.asarray(beta))) * 255
    for i in range(4):
        cpu = stain.apply_hed(img[i], alpha[i], beta[i])
        assert np.abs(dev[i] - cpu).max() <= 0.5 + 1e-3


def test_cpu_and_device_paths_agree_in_distribution():
    """Many draws on one image through each path (independent random streams): every
    channel's per-draw mean and standard deviation have the same distribution, and so
    have the stain parameters recovered from the pixels of each."""
    n, s = 3000, 0.2
    img = _stained(24, 24, seed=9)
    rng = np.random.default_rng(11)
    cpu = np.stack([stain.hed_jitter(img, rng, s) for _ in range(n)])
    batch = jnp.broadcast_to(jnp.asarray(img, jnp.float32) / 255.0, (n,) + img.shape)
    p = da.sample_hed(jax.random.PRNGKey(12), n, s)
    dev = np.asarray(jax.jit(da.apply_hed)(batch, p['hed_alpha'], p['hed_beta']), np.float64)
    for stat in (lambda x: x.mean(axis=(1, 2)), lambda x: x.std(axis=(1, 2))):
        a, b = stat(cpu.astype(np.float64)), stat(dev * 255)          # [n, 3] in levels
        for c in range(3):
            se = math.sqrt(a[:, c].var() / n + b[:, c].var() / n)
            assert abs(a[:, c].mean() - b[:, c].mean()) < 5 * se
            # Relative standard error of a std: about 1/sqrt(2n) each, two of them.
            assert abs(a[:, c].std() / b[:, c].std() - 1) < 5 / math.sqrt(n)
            assert stats.ks_2samp(a[:, c], b[:, c]).pvalue > 1e-4
    # The parameters behind the pixels: far more sensitive than the pixel statistics.
    got_cpu, got_dev = _recover(img, cpu), _recover(img, dev)
    for j in range(2):
        a, b = got_cpu[..., j].ravel(), got_dev[..., j].ravel()
        m = a.size
        assert abs(a.mean() - b.mean()) < 5 * s * math.sqrt(2 / (3 * m)) + 0.002
        # Uniform: var s^2/3 with relative standard error sqrt(4/45) * 3 / sqrt(m).
        assert abs(a.var() / b.var() - 1) < 5 * math.sqrt(2) * 3 * math.sqrt(4 / 45 / m)
        assert stats.ks_2samp(a, b).pvalue > 1e-4


# ---------------------------------------------------------------------------
# in the augmentation: order, off path, config
# ---------------------------------------------------------------------------

def test_hed_runs_after_the_crop_and_before_colour_jitter():
    img = tissue_like(48, 56, seed=4)
    params = augment.ViewParams(crop=(4, 6, 30, 40), jitter_order=(3, 0, 2, 1),
                                brightness=1.2, contrast=0.8, saturation=1.3, hue=0.05,
                                hed_alpha=(1.15, 0.9, 1.05), hed_beta=(0.1, -0.12, 0.05))
    crop = augment.resized_crop(img, params.crop, 32)
    want = stain.apply_hed(crop, params.hed_alpha, params.hed_beta)
    for op in params.jitter_order:
        want = augment._JITTER_OPS[op](want, params)
    got = augment.apply_view(img, params, 32)
    np.testing.assert_array_equal(got, want)
    # Crop-only (data.augment_on_device): the device does it, not the worker.
    np.testing.assert_array_equal(augment.apply_view(img, params, 32, crop_only=True), crop)


def test_device_chain_puts_hed_where_the_cpu_path_does():
    cfg = augment.AugmentConfig(image_size=32, hed=0.2)
    n = 12
    images = np.stack([_stained(32, 32, seed=s) for s in range(n)])
    p = jax.device_get(da.sample_device_params(jax.random.PRNGKey(5), n, cfg))
    p = dict(p, hue=np.zeros(n, np.float32), gray=np.zeros(n, bool))  # isolate the order
    out = np.asarray(da.apply_device_params(jnp.asarray(images), p, cfg), np.float64) * 255
    assert p['jitter'].any() and p['blur'].any()
    for i in range(n):
        view = augment.ViewParams(
            crop=(0, 0, 32, 32),
            jitter_order=tuple(int(o) for o in p['order'][i]) if p['jitter'][i] else None,
            brightness=float(p['brightness'][i]), contrast=float(p['contrast'][i]),
            saturation=float(p['saturation'][i]), hue=0.0,
            blur_sigma=float(p['sigma'][i]) if p['blur'][i] else None,
            hflip=bool(p['hflip'][i]),
            hed_alpha=tuple(p['hed_alpha'][i]), hed_beta=tuple(p['hed_beta'][i]))
        diff = np.abs(out[i] - augment.apply_view(images[i], view, 32))
        # As for the paper's ops (tests/test_device_augment.py): PIL's truncations make the
        # CPU path a level or two darker; HED after the jitter differs by far more.
        assert diff.mean() < 2.5 and np.percentile(diff, 99) <= 8, (i, diff.mean())


def test_off_draws_nothing_and_on_draws_hed_last():
    """hed=0 consumes exactly the paper's random numbers; hed>0 draws the same view and
    then the HED parameters, which are the generator's next six uniforms."""
    off, on = augment.AugmentConfig(image_size=32), augment.AugmentConfig(image_size=32,
                                                                          hed=0.1)
    for seed in range(20):
        r_off, r_on = np.random.default_rng(seed), np.random.default_rng(seed)
        p_off = augment.sample_view_params(r_off, 48, 56, off)
        p_on = augment.sample_view_params(r_on, 48, 56, on)
        assert p_off.hed_alpha is None and p_off.hed_beta is None
        assert dataclasses.replace(p_on, hed_alpha=None, hed_beta=None) == p_off
        alpha, beta = stain.sample_hed(r_off, 0.1)
        assert p_on.hed_alpha == tuple(alpha) and p_on.hed_beta == tuple(beta)
        assert r_off.random() == r_on.random()  # both generators in the same state now
    img = tissue_like(48, 56)
    a = augment.two_views(img, np.random.default_rng(1), off)
    b = augment.two_views(img, np.random.default_rng(1), augment.AugmentConfig(image_size=32))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_device_off_keeps_the_keys_and_on_splits_one_off():
    key = jax.random.PRNGKey(21)
    off = da.sample_device_params(key, 16, augment.AugmentConfig(image_size=32))
    assert 'hed_alpha' not in off
    on = da.sample_device_params(key, 16, augment.AugmentConfig(image_size=32, hed=0.1))
    rest, hed_key = jax.random.split(key)
    want = da.sample_device_params(rest, 16, augment.AugmentConfig(image_size=32))
    for name, value in want.items():
        np.testing.assert_array_equal(on[name], value)
    for name, value in da.sample_hed(hed_key, 16, 0.1).items():
        np.testing.assert_array_equal(on[name], value)
    # Off, the images pass the paper's ops only: the same as applying them without HED keys.
    images = jnp.asarray(np.stack([tissue_like(32, 32, seed=s) for s in range(16)]))
    np.testing.assert_array_equal(
        da.augment_views(key, images, augment.AugmentConfig(image_size=32)),
        da.apply_device_params(images, off, augment.AugmentConfig(image_size=32)))


def test_from_config_reads_augment_hed_and_defaults_without_the_section(tmp_path):
    config = data_config(tmp_path)
    assert 'augment' not in config
    assert augment.AugmentConfig.from_config(config).hed == 0.0
    config.augment = ml_collections.ConfigDict({'hed': 0.05})
    assert augment.AugmentConfig.from_config(config).hed == 0.05


# ---------------------------------------------------------------------------
# grayscale input
# ---------------------------------------------------------------------------

def test_require_colour_refuses_a_grayscale_sample_in_one_line():
    grey = [np.repeat(tissue_like(16, 16, seed=s)[..., :1], 3, axis=2) for s in range(4)]
    with pytest.raises(DataError) as err:
        stain.require_colour(grey, 'data.path=/x/gray')
    assert str(err.value) == 'augment.hed jitters H&E stains; data.path=/x/gray is grayscale'
    # A white background patch is grey too: only a sample of nothing but grey refuses.
    white = np.full((16, 16, 3), 255, np.uint8)
    stain.require_colour([white, tissue_like(16, 16)], 'slides')
    stain.require_colour([tissue_like(16, 16)], 'slides')


def test_grayscale_image_under_hed_gets_tinted():
    """Decided behaviour: the same maths on grey input. Grey deconvolves into haematoxylin
    and DAB with negative eosin, so any jitter tints it: why require_colour refuses grey
    data at the start rather than the jitter passing grey through unnoticed."""
    grey = np.repeat(tissue_like(24, 24)[..., :1], 3, axis=2)
    hed = stain.rgb_to_hed(grey)
    assert (hed[..., 1] <= 1e-12).all() and (hed[..., 0] >= 0).all()
    np.testing.assert_array_equal(stain.apply_hed(grey, np.ones(3), np.zeros(3)), grey)
    out = stain.hed_jitter(grey, np.random.default_rng(0), 0.05)
    assert not stain.is_grayscale(out)
