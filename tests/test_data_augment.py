"""The two-view augmentation: parameter distributions, and each op against PIL.

PIL (what the original's torchvision transforms call) is the independent
reference for the pixel ops; the parameter draws are checked against the
distributions of docs/method.md §1 with tolerances of several standard errors.
"""
import itertools
import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from clusiam_jax.data import augment
from clusiam_jax.models.preprocess import normalize_input
from tests.helpers import tissue_like, within

N_DRAWS = 4000


@pytest.fixture(scope='module')
def draws():
    rng = np.random.default_rng(123)
    cfg = augment.AugmentConfig(image_size=32)
    return [augment.sample_view_params(rng, 60, 80, cfg) for _ in range(N_DRAWS)]


# ---------------------------------------------------------------------------
# parameter distributions
# ---------------------------------------------------------------------------

def test_crop_area_and_aspect_within_bounds(draws):
    height, width = 60, 80
    areas, aspects = [], []
    for p in draws:
        top, left, h, w = p.crop
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        areas.append(h * w / (height * width))
        aspects.append(w / h)
    areas, aspects = np.array(areas), np.array(aspects)
    # w and h are rounded to whole pixels: allow a pixel's worth of slack.
    assert areas.min() >= 0.2 * (1 - 2 / 60) and areas.max() <= 1.0
    assert aspects.min() >= 0.75 * (1 - 1 / 10) and aspects.max() <= (4 / 3) * (1 + 1 / 10)
    # Accepted draws are (scale, log-ratio) uniform, conditioned on fitting: the
    # mean area fraction must then lie strictly inside (0.2, 1).
    assert 0.45 < areas.mean() < 0.65
    assert abs(np.log(aspects).mean()) < 0.05


def test_crop_falls_back_to_center_crop_for_extreme_shapes():
    # 4 x 200: no crop with aspect in [3/4, 4/3] and area >= 20% fits, so after
    # 10 tries torchvision takes the widest allowed center crop: h=4, w=round(4*4/3).
    rng = np.random.default_rng(0)
    top, left, h, w = augment.sample_crop(rng, 4, 200)
    assert (h, w) == (4, 5)
    assert top == 0 and left == (200 - 5) // 2


def test_op_probabilities_match_spec(draws):
    n = len(draws)
    jitter = np.mean([p.jitter_order is not None for p in draws])
    gray = np.mean([p.gray for p in draws])
    blur = np.mean([p.blur_sigma is not None for p in draws])
    hflip = np.mean([p.hflip for p in draws])
    assert within(jitter, 0.8, n) and within(gray, 0.2, n)
    assert within(blur, 0.5, n) and within(hflip, 0.5, n)
    # Off by default (histology options).
    assert not any(p.vflip or p.rot90 for p in draws)


def test_jitter_factors_and_order(draws):
    applied = [p for p in draws if p.jitter_order is not None]
    for name, lo, hi in [('brightness', 0.6, 1.4), ('contrast', 0.6, 1.4),
                         ('saturation', 0.6, 1.4), ('hue', -0.1, 0.1)]:
        values = np.array([getattr(p, name) for p in applied])
        assert values.min() >= lo and values.max() <= hi
        # uniform: mean at the centre, std = width / sqrt(12)
        width = hi - lo
        assert abs(values.mean() - (lo + hi) / 2) < 5 * width / math.sqrt(12 * len(values))
        assert abs(values.std() - width / math.sqrt(12)) < 0.05 * width
    orders = [p.jitter_order for p in applied]
    counts = {o: orders.count(o) for o in itertools.permutations(range(4))}
    assert len(counts) == 24 and all(c > 0 for c in counts.values())
    expected = len(orders) / 24
    assert max(abs(c - expected) for c in counts.values()) < 5 * math.sqrt(expected)
    not_applied = [p for p in draws if p.jitter_order is None]
    assert all(p.brightness == p.contrast == p.saturation == 1.0 and p.hue == 0.0
               for p in not_applied)


def test_blur_sigma_uniform(draws):
    sigmas = np.array([p.blur_sigma for p in draws if p.blur_sigma is not None])
    assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0
    assert abs(sigmas.mean() - 1.05) < 5 * 1.9 / math.sqrt(12 * len(sigmas))


def test_histology_options_draw_vflip_and_rotations():
    rng = np.random.default_rng(5)
    cfg = augment.AugmentConfig(image_size=16, vflip=True, rot90=True)
    params = [augment.sample_view_params(rng, 32, 32, cfg) for _ in range(2000)]
    assert within(np.mean([p.vflip for p in params]), 0.5, 2000)
    ks = np.bincount([p.rot90 for p in params], minlength=4) / 2000
    assert all(within(k, 0.25, 2000) for k in ks)


# ---------------------------------------------------------------------------
# each op against PIL
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('factor', [0.6, 0.83, 1.0, 1.17, 1.4])
def test_brightness_contrast_saturation_are_bit_exact(factor):
    img = tissue_like()
    pil = Image.fromarray(img)
    np.testing.assert_array_equal(augment.adjust_brightness(img, factor),
                                  np.asarray(ImageEnhance.Brightness(pil).enhance(factor)))
    np.testing.assert_array_equal(augment.adjust_contrast(img, factor),
                                  np.asarray(ImageEnhance.Contrast(pil).enhance(factor)))
    np.testing.assert_array_equal(augment.adjust_saturation(img, factor),
                                  np.asarray(ImageEnhance.Color(pil).enhance(factor)))


def test_grayscale_is_pil_L_replicated():
    img = np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(img).convert('L').convert('RGB'))
    np.testing.assert_array_equal(augment.grayscale(img), ref)


def _pil_hue(img, hue_factor):
    """torchvision's PIL adjust_hue."""
    h, s, v = Image.fromarray(img).convert('HSV').split()
    shifted = np.asarray(h).copy()
    shifted += np.uint8(int(hue_factor * 255) % 256)
    return np.asarray(Image.merge('HSV', (Image.fromarray(shifted, 'L'), s, v)).convert('RGB'))


@pytest.mark.parametrize('hue_factor', [-0.1, -0.04, 0.03, 0.1])
def test_hue_close_to_pil(hue_factor):
    img = tissue_like(seed=3)
    got = augment.adjust_hue(img, hue_factor).astype(int)
    ref = _pil_hue(img, hue_factor).astype(int)
    diff = np.abs(got - ref)
    assert diff.mean() < 1.5, diff.mean()
    assert np.percentile(diff, 99) <= 8
    # and it really is a hue rotation: far from the input for a 0.1 turn
    if abs(hue_factor) >= 0.1:
        assert np.abs(got - img.astype(int)).mean() > 5 * diff.mean()


@pytest.mark.parametrize('sigma', [0.1, 0.4, 0.9, 1.5, 2.0])
def test_blur_close_to_pil_gaussian_blur(sigma):
    img = tissue_like(64, 64, seed=2)
    got = augment.gaussian_blur(img, sigma).astype(int)
    blurred = Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=sigma))
    ref = np.asarray(blurred).astype(int)
    diff = got - ref
    inner = np.abs(diff)[6:-6, 6:-6]  # PIL re-clamps the border at each pass
    # PIL rounds to uint8 after each of its 6 passes, we round once: unbiased
    # noise of at most 2 levels.
    assert inner.max() <= 2 and inner.mean() < 1.0
    assert abs(diff.mean()) < 0.1


@pytest.mark.parametrize('crop', [(0, 0, 48, 56), (5, 9, 20, 27), (10, 3, 31, 40)])
def test_resized_crop_upscale_matches_pil_bilinear(crop):
    img = tissue_like()
    top, left, h, w = crop
    ref = np.asarray(Image.fromarray(img).crop((left, top, left + w, top + h))
                     .resize((64, 64), Image.BILINEAR)).astype(int)
    got = augment.resized_crop(img, crop, 64).astype(int)
    assert np.abs(got - ref).max() <= 1


def test_resized_crop_downscale_is_pil_exactly():
    img = tissue_like(120, 100)
    crop = (7, 4, 90, 80)
    ref = np.asarray(Image.fromarray(img).crop((4, 7, 84, 97)).resize((32, 32), Image.BILINEAR))
    np.testing.assert_array_equal(augment.resized_crop(img, crop, 32), ref)


def test_apply_view_flip_and_gray_follow_params():
    img = tissue_like()
    base = augment.ViewParams(crop=(0, 0, 48, 56), jitter_order=None)
    plain = augment.apply_view(img, base, 32)
    flipped = augment.apply_view(img, augment.ViewParams(**{**base.__dict__, 'hflip': True}), 32)
    np.testing.assert_array_equal(flipped, plain[:, ::-1])
    gray = augment.apply_view(img, augment.ViewParams(**{**base.__dict__, 'gray': True}), 32)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    rot = augment.apply_view(img, augment.ViewParams(**{**base.__dict__, 'rot90': 1}), 32)
    np.testing.assert_array_equal(rot, np.rot90(plain, 1))
    vf = augment.apply_view(img, augment.ViewParams(**{**base.__dict__, 'vflip': True}), 32)
    np.testing.assert_array_equal(vf, plain[::-1])


def test_two_views_shape_dtype_and_differ():
    img = tissue_like(80, 80)
    cfg = augment.AugmentConfig(image_size=40)
    rng = np.random.default_rng(0)
    differing = 0
    for _ in range(20):
        v1, v2 = augment.two_views(img, rng, cfg)
        assert v1.shape == v2.shape == (40, 40, 3) and v1.dtype == v2.dtype == np.uint8
        assert v1.flags['C_CONTIGUOUS'] and v2.flags['C_CONTIGUOUS']
        differing += not np.array_equal(v1, v2)
    assert differing == 20


def test_normalize_input_matches_totensor_normalize():
    """The network's one input function (train step, export, on-device augmentation):
    uint8 views as ToTensor + Normalize, float views in [0, 1] the same without /255."""
    x = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    mean, std = (0.6684, 0.5115, 0.6791), (0.2521, 0.2875, 0.2100)
    got = np.asarray(normalize_input(x, mean, std))
    np.testing.assert_allclose(
        np.asarray(normalize_input(x.astype(np.float32) / 255.0, mean, std)), got, atol=1e-6)
    assert got.dtype == np.float32 and got.shape == x.shape
    # ToTensor: CHW float in [0, 1]; Normalize: per channel (t - m) / s
    for n in range(2):
        chw = x[n].transpose(2, 0, 1).astype(np.float64) / 255.0
        for c in range(3):
            ref = (chw[c] - mean[c]) / std[c]
            np.testing.assert_allclose(got[n, :, :, c], ref, rtol=0, atol=2e-6)
