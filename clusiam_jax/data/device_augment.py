"""On-device augmentation (option ``data.augment_on_device``): docs/method.md §1 steps 2-5 in JAX.

With the option on, the CPU workers only decode and random-resized-crop (plus the
optional vflip / rot90, see below) to uint8; the colour and blur ops, which are most of
the CPU cost of a pair, run here, inside the jitted train step, with per-sample random
parameters drawn from the same distributions as ``augment.sample_view_params``:

1. with p=0.8 ColorJitter: brightness, contrast, saturation factors U(0.6, 1.4), hue
   shift U(-0.1, 0.1) turns, the four ops in a random per-sample order;
2. with p=0.2 grayscale (ITU-R 601-2 luma, replicated to 3 channels);
3. with p=0.5 Gaussian blur, sigma U(0.1, 2.0), with PIL's own kernel (three
   "extended box" passes convolved into one separable kernel, replicated border);
4. horizontal flip with p=0.5.

Everything is vectorised over the batch (no per-sample control flow): the random
jitter order is applied as blend "slots" before and after one hue rotation, each slot
applying the blend (brightness, contrast or saturation: one formula) that the sample's
permutation puts there; an op a sample does not get is masked out with ``jnp.where``,
so it leaves the pixels exactly as they were. The blur kernel is computed per sample
from sigma on a fixed tap grid (13 taps for sigma <= 2) and applied as 2 x 13 shifted
multiply-adds, which XLA fuses into a few elementwise passes.

Arithmetic is float32 in [0, 1], clamped after each op as PIL's uint8 blends clamp, but
not rounded to 256 levels between ops (PIL rounds after every op). Compared with the CPU
path's ops for the same parameters (tests/test_device_augment.py): brightness, contrast,
saturation, grayscale within 1-2 uint8 levels (PIL truncates, rounds the contrast mean
and the luma); blur within 1 level; flip exact; hue in float HSV like torchvision's
tensor path (the CPU path quantizes hue to 1/256 turn like PIL), a few levels apart.

Orientation: the histology options (vertical flip, 90-degree rotation) stay on the CPU,
applied to the uint8 crop before the device ops; they are memory reorders costing a few
microseconds. Every device op commutes with them (pointwise ops, a blur with the same
kernel on both axes), and the horizontal flip drawn here composes with them to the same
distribution over the 8 (or 4) orientations as the CPU path's order.

Random numbers come from ``jax.random`` (the CPU path uses numpy), so the same seed
does not give the same draws as the CPU path; the distributions are the same.
"""
import math
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from clusiam_jax.data.augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    AugmentConfig,
)

# ITU-R 601-2 luma, as PIL's convert('L') (which uses the 16-bit fixed-point version).
LUMA = (0.299, 0.587, 0.114)


def sample_device_params(key, n: int, cfg: AugmentConfig) -> Dict[str, jax.Array]:
    """Everything random about n views, as arrays of leading size n (jittable)."""
    keys = jax.random.split(key, 10)

    def uniform(k, lo, hi):
        return jax.random.uniform(k, (n,), jnp.float32, lo, hi)

    return {
        'jitter': jax.random.bernoulli(keys[0], cfg.jitter_p, (n,)),
        # A uniformly random permutation of the 4 jitter ops per sample.
        'order': jnp.argsort(jax.random.uniform(keys[1], (n, 4)), axis=1).astype(jnp.int32),
        'brightness': uniform(keys[2], 1 - cfg.brightness, 1 + cfg.brightness),
        'contrast': uniform(keys[3], 1 - cfg.contrast, 1 + cfg.contrast),
        'saturation': uniform(keys[4], 1 - cfg.saturation, 1 + cfg.saturation),
        'hue': uniform(keys[5], -cfg.hue, cfg.hue),
        'gray': jax.random.bernoulli(keys[6], cfg.gray_p, (n,)),
        'blur': jax.random.bernoulli(keys[7], cfg.blur_p, (n,)),
        'sigma': uniform(keys[8], cfg.blur_sigma[0], cfg.blur_sigma[1]),
        'hflip': jax.random.bernoulli(keys[9], cfg.hflip_p, (n,)),
    }


# ---------------------------------------------------------------------------
# The operations: float32 [N, H, W, 3] in [0, 1]; per-sample parameters [N]
# ---------------------------------------------------------------------------

def _per_sample(v):
    return jnp.asarray(v, jnp.float32).reshape(-1, 1, 1, 1)


def _mask(flag):
    return jnp.asarray(flag).reshape(-1, 1, 1, 1)


def luma(x):
    """[N, H, W, 1] ITU-R 601-2 luma."""
    return jnp.sum(x * jnp.asarray(LUMA, x.dtype), axis=-1, keepdims=True)


def _blend(degenerate, x, factor):
    """PIL Image.blend(degenerate, x, factor), clamped like PIL's uint8 result."""
    return jnp.clip(degenerate + _per_sample(factor) * (x - degenerate), 0.0, 1.0)


def adjust_brightness(x, factor):
    return _blend(0.0, x, factor)


def adjust_contrast(x, factor):
    # PIL: blend with a constant image at the mean of the luma (PIL rounds it).
    return _blend(jnp.mean(luma(x), axis=(1, 2, 3), keepdims=True), x, factor)


def adjust_saturation(x, factor):
    return _blend(luma(x), x, factor)


def grayscale(x):
    return jnp.broadcast_to(luma(x), x.shape)


def adjust_hue(x, shift):
    """Rotate the hue by `shift` turns: RGB -> HSV -> RGB in float (torchvision tensor)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc = jnp.max(x, axis=-1)
    minc = jnp.min(x, axis=-1)
    chroma = maxc - minc
    flat = chroma == 0
    sat = chroma / jnp.where(flat, 1.0, maxc)
    div = jnp.where(flat, 1.0, chroma)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    h = jnp.where(maxc == r, bc - gc,
                  jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = jnp.where(flat, 0.0, h) / 6.0
    h = jnp.mod(h + shift.reshape(-1, 1, 1), 1.0)
    # HSV -> RGB: channel n in (R, G, B) = (5, 3, 1) is v - v s max(0, min(k, 4 - k, 1)),
    # k = (n + 6 h) mod 6.
    out = []
    for n in (5.0, 3.0, 1.0):
        k = jnp.mod(n + 6.0 * h, 6.0)
        out.append(maxc - maxc * sat * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
    return jnp.clip(jnp.stack(out, axis=-1), 0.0, 1.0)


def _blend_slot(x, op, active, brightness, contrast, saturation):
    """Where `active`, the blend op `op` ([N, 1, 1, 1] op ids, never HUE) on x."""
    factor = jnp.where(op == BRIGHTNESS, _per_sample(brightness),
                       jnp.where(op == CONTRAST, _per_sample(contrast),
                                 _per_sample(saturation)))
    y = luma(x)
    degenerate = jnp.where(op == BRIGHTNESS, 0.0,
                           jnp.where(op == CONTRAST,
                                     jnp.mean(y, axis=(1, 2, 3), keepdims=True), y))
    return jnp.where(active, _blend(degenerate, x, factor), x)


def color_jitter(x, order, brightness, contrast, saturation, hue):
    """The four jitter ops in each sample's order (`order` [N, 4] of op ids).

    Hue (the costly op) is computed once, not once per slot: the slots before each
    sample's hue slot, then hue, then the slots after it. Slot 3 can only precede the
    hue and slot 0 only follow it, so 3 + 3 blend passes cover every order.
    """
    hue_slot = jnp.argmax(order == HUE, axis=1).reshape(-1, 1, 1, 1)
    blends = (brightness, contrast, saturation)
    for slot in range(3):
        x = _blend_slot(x, order[:, slot].reshape(-1, 1, 1, 1), slot < hue_slot, *blends)
    x = adjust_hue(x, hue)
    for slot in range(1, 4):
        x = _blend_slot(x, order[:, slot].reshape(-1, 1, 1, 1), slot > hue_slot, *blends)
    return x


def blur_support(cfg: AugmentConfig) -> int:
    """Half-width of the box filter for the largest sigma (static): 2 for sigma <= 2."""
    return int(math.floor(_box_radius(cfg.blur_sigma[1]))) + 1


def _box_radius(sigma):
    """PIL's extended-box radius for 3 passes (augment.pil_gaussian_kernel); numpy or jnp."""
    lib = jnp if isinstance(sigma, jax.Array) else np
    sigma2 = sigma * sigma / 3.0
    big_l = lib.sqrt(sigma2 * 12.0 + 1.0)
    small_l = lib.floor((big_l - 1.0) / 2.0)
    a = (2 * small_l + 1) * (small_l * (small_l + 1) - 3 * sigma2)
    a = a / (6 * (sigma2 - (small_l + 1) ** 2))
    return small_l + a


def blur_kernels(sigma, support: int):
    """[N, 6 * support + 1] PIL GaussianBlur kernels (3 box passes), one per sigma."""
    radius = _box_radius(jnp.asarray(sigma, jnp.float32))[:, None]
    whole = jnp.floor(radius)
    taps = jnp.abs(jnp.arange(-support, support + 1, dtype=jnp.float32))[None, :]
    box = jnp.where(taps <= whole, 1.0, jnp.where(taps == whole + 1, radius - whole, 0.0))
    box = box / (2.0 * radius + 1.0)
    conv = jax.vmap(lambda a, b: jnp.convolve(a, b, precision=jax.lax.Precision.HIGHEST))
    return conv(conv(box, box), box)


def _filter_axis(x, kernels, axis):
    """Per-sample 1-D filter along `axis` (1: rows of H, 2: columns of W), edge padding."""
    r = (kernels.shape[1] - 1) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    xp = jnp.pad(x, pad, mode='edge')
    size = x.shape[axis]
    out = 0.0
    for t in range(2 * r + 1):
        tap = jax.lax.slice_in_dim(xp, t, t + size, axis=axis)
        out = out + kernels[:, t].reshape(-1, 1, 1, 1) * tap
    return out


def gaussian_blur(x, sigma, support: int = 2):
    k = blur_kernels(sigma, support)
    return jnp.clip(_filter_axis(_filter_axis(x, k, 2), k, 1), 0.0, 1.0)


def hflip(x):
    return x[:, :, ::-1, :]


def apply_device_params(images, params, cfg: AugmentConfig):
    """uint8 (or float in [0, 1]) [N, H, W, 3] -> float32 [N, H, W, 3] in [0, 1]."""
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / 255.0
    jittered = color_jitter(x, params['order'], params['brightness'], params['contrast'],
                            params['saturation'], params['hue'])
    x = jnp.where(_mask(params['jitter']), jittered, x)
    x = jnp.where(_mask(params['gray']), grayscale(x), x)
    x = jnp.where(_mask(params['blur']),
                  gaussian_blur(x, params['sigma'], blur_support(cfg)), x)
    return jnp.where(_mask(params['hflip']), hflip(x), x)


def augment_views(key, images, cfg: AugmentConfig):
    """docs/method.md §1 steps 2-5 on a batch of crops: uint8 [N, H, W, 3] -> float32 in [0, 1].

    Pure and jittable (`cfg` is static); each sample draws its own parameters.
    """
    return apply_device_params(images, sample_device_params(key, images.shape[0], cfg), cfg)
