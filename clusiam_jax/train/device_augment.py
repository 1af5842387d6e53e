"""On-device augmentation (data.augment_on_device, docs/method.md §1 steps 2-5): no per-sample
control flow (jitter as blend slots around one hue rotation, jnp.where masks), PIL-like clamps.
augment.hed's stain jitter runs first, as on the CPU path (data/augment.apply_view)."""
import math
from typing import Dict

import jax
import jax.numpy as jnp

from clusiam_jax.data import stain
from clusiam_jax.data.augment import BRIGHTNESS, CONTRAST, HUE, AugmentConfig, box_radius

# ITU-R 601-2 luma, as PIL's convert('L') (which uses the 16-bit fixed-point version).
LUMA = (0.299, 0.587, 0.114)


def sample_device_params(key, n: int, cfg: AugmentConfig) -> Dict[str, jax.Array]:
    """Everything random about n views, as arrays of leading size n (jittable)."""
    hed = {}
    if cfg.hed > 0:  # only when on, so that off the paper path's keys are what they were
        key, hed_key = jax.random.split(key)
        hed = sample_hed(hed_key, n, cfg.hed)
    keys = jax.random.split(key, 10)
    uniform = lambda k, lo, hi: jax.random.uniform(k, (n,), jnp.float32, lo, hi)
    return hed | {
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


def sample_hed(key, n: int, strength: float) -> Dict[str, jax.Array]:
    """Per view alpha [n, 3] ~ U(1 - s, 1 + s) and beta [n, 3] ~ U(-s, s) (stain.sample_hed)."""
    ka, kb = jax.random.split(key)
    return {'hed_alpha': jax.random.uniform(ka, (n, 3), jnp.float32, 1 - strength, 1 + strength),
            'hed_beta': jax.random.uniform(kb, (n, 3), jnp.float32, -strength, strength)}


def _mix(x, matrix):
    """x [..., 3] @ matrix [..., 3, 3] as multiply-adds: exact float32 where a matmul on a
    GPU could round through TF32, and cheap at a contraction of 3."""
    return sum(x[..., k, None] * matrix[..., k, :] for k in range(3))


def apply_hed(x, alpha, beta):
    """stain.apply_hed in float (x [N, H, W, 3] in [0, 1], alpha/beta [N, 3]), unrounded."""
    od = -jnp.log10(jnp.maximum(x, stain.MIN_INTENSITY))
    hed = _mix(od, jnp.asarray(stain.HED_FROM_RGB, jnp.float32))
    hed = hed * alpha[:, None, None, :] + beta[:, None, None, :]
    od = _mix(hed, jnp.asarray(stain.RGB_FROM_HED, jnp.float32))
    return jnp.clip(jnp.power(10.0, -od), 0.0, 1.0)


def _per_sample(v):  # [N] -> [N, 1, 1, 1]
    return jnp.asarray(v, jnp.float32).reshape(-1, 1, 1, 1)


def _mask(flag):
    return jnp.asarray(flag).reshape(-1, 1, 1, 1)


def luma(x):
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
    """Rotate the hue by `shift` turns through float HSV (torchvision's tensor path)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc = jnp.max(x, axis=-1)
    chroma = maxc - jnp.min(x, axis=-1)
    flat = chroma == 0
    sat = chroma / jnp.where(flat, 1.0, maxc)
    div = jnp.where(flat, 1.0, chroma)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = jnp.where(flat, 0.0, h) / 6.0
    h = jnp.mod(h + shift.reshape(-1, 1, 1), 1.0)
    # Channel n of (R, G, B) = (5, 3, 1): v - v s clip(min(k, 4 - k), 0, 1), k = n + 6h mod 6.
    k = jnp.mod(jnp.asarray([5.0, 3.0, 1.0]) + 6.0 * h[..., None], 6.0)
    v = maxc[..., None]
    return jnp.clip(v - v * sat[..., None] * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0), 0.0, 1.0)


def _blend_slot(x, op, active, brightness, contrast, saturation):
    """Where `active`, the blend op `op` ([N, 1, 1, 1] op ids, never HUE) on x."""
    factor = jnp.where(op == BRIGHTNESS, _per_sample(brightness),
                       jnp.where(op == CONTRAST, _per_sample(contrast),
                                 _per_sample(saturation)))
    y = luma(x)
    mean = jnp.mean(y, axis=(1, 2, 3), keepdims=True)
    degenerate = jnp.where(op == BRIGHTNESS, 0.0, jnp.where(op == CONTRAST, mean, y))
    return jnp.where(active, _blend(degenerate, x, factor), x)


def color_jitter(x, order, brightness, contrast, saturation, hue):
    """The four jitter ops in each sample's order (`order` [N, 4] of op ids). The costly
    hue runs once: slots 0-2 before it where they precede it, slots 1-3 after it."""
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
    return int(math.floor(box_radius(cfg.blur_sigma[1]))) + 1


def blur_kernels(sigma, support: int):
    """PIL GaussianBlur kernels (3 box passes), one per sigma."""
    radius = box_radius(jnp.asarray(sigma, jnp.float32), jnp)[:, None]
    whole = jnp.floor(radius)
    taps = jnp.abs(jnp.arange(-support, support + 1, dtype=jnp.float32))[None, :]
    box = jnp.where(taps <= whole, 1.0, jnp.where(taps == whole + 1, radius - whole, 0.0))
    box = box / (2.0 * radius + 1.0)
    conv = jax.vmap(lambda a, b: jnp.convolve(a, b, precision=jax.lax.Precision.HIGHEST))
    return conv(conv(box, box), box)


def _filter_axis(x, kernels, axis):
    """Per-sample 1-D filter along `axis` (1: rows of H, 2: columns of W), edge padding."""
    r, size = (kernels.shape[1] - 1) // 2, x.shape[axis]
    xp = jnp.pad(x, [(r, r) if a == axis else (0, 0) for a in range(x.ndim)], mode='edge')
    out = 0.0
    for t in range(2 * r + 1):
        out = out + _per_sample(kernels[:, t]) * jax.lax.slice_in_dim(xp, t, t + size, axis=axis)
    return out


def gaussian_blur(x, sigma, support: int = 2):
    k = blur_kernels(sigma, support)
    return jnp.clip(_filter_axis(_filter_axis(x, k, 2), k, 1), 0.0, 1.0)


def hflip(x):
    return x[:, :, ::-1, :]


def apply_device_params(images, params, cfg: AugmentConfig):
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / 255.0
    if 'hed_alpha' in params:
        x = apply_hed(x, params['hed_alpha'], params['hed_beta'])
    jittered = color_jitter(x, params['order'], params['brightness'], params['contrast'],
                            params['saturation'], params['hue'])
    x = jnp.where(_mask(params['jitter']), jittered, x)
    x = jnp.where(_mask(params['gray']), grayscale(x), x)
    x = jnp.where(_mask(params['blur']), gaussian_blur(x, params['sigma'], blur_support(cfg)), x)
    return jnp.where(_mask(params['hflip']), hflip(x), x)


def augment_views(key, images, cfg: AugmentConfig):
    """Steps 2-5 on a batch of crops, each sample its own draws (jittable, `cfg` static)."""
    return apply_device_params(images, sample_device_params(key, images.shape[0], cfg), cfg)
