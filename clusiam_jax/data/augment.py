"""The two-view augmentation of docs/method.md §1 in torchvision's order and distributions,
drawn (`sample_view_params`) then applied (`apply_view`); jitter, gray and blur match PIL.
augment.hed (off by default) adds HED stain jitter (data/stain.py) right after the crop."""
import dataclasses
import math
from typing import Optional, Tuple

import cv2
import numpy as np
from PIL import Image

from clusiam_jax.data import stain

cv2.setNumThreads(1)  # the parallelism is in the worker processes

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    image_size: int = 224
    scale: Tuple[float, float] = (0.2, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    hflip_p: float = 0.5
    vflip: bool = False
    rot90: bool = False
    on_device: bool = False   # crops only here; the rest in the step (train/device_augment)
    hed: float = 0.0          # HED stain jitter strength; 0: off, nothing drawn (the paper)

    @classmethod
    def from_config(cls, config) -> 'AugmentConfig':
        section = config.get('augment')  # configs written before the section existed: off
        return cls(image_size=int(config.data.image_size),
                   vflip=bool(config.data.get('vflip', False)),
                   rot90=bool(config.data.get('rot90', False)),
                   on_device=bool(config.data.augment_on_device),
                   hed=float(section.get('hed', 0.0)) if section is not None else 0.0)


@dataclasses.dataclass(frozen=True)
class ViewParams:
    crop: Tuple[int, int, int, int]          # top, left, height, width
    jitter_order: Optional[Tuple[int, ...]]  # None: ColorJitter not applied
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    gray: bool = False
    blur_sigma: Optional[float] = None       # None: no blur
    hflip: bool = False
    vflip: bool = False
    rot90: int = 0
    hed_alpha: Optional[Tuple[float, float, float]] = None  # None: no HED jitter
    hed_beta: Optional[Tuple[float, float, float]] = None


def sample_crop(rng: np.random.Generator, height: int, width: int, scale=(0.2, 1.0),
                ratio=(3.0 / 4.0, 4.0 / 3.0)):
    """torchvision RandomResizedCrop.get_params: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    # The largest center crop with an aspect ratio inside `ratio`.
    w, h = width, height
    if width / height < min(ratio):
        h = int(round(w / min(ratio)))
    elif width / height > max(ratio):
        w = int(round(h * max(ratio)))
    return (height - h) // 2, (width - w) // 2, h, w


def sample_view_params(rng: np.random.Generator, height: int, width: int,
                       cfg: AugmentConfig) -> ViewParams:
    crop = sample_crop(rng, height, width, cfg.scale, cfg.ratio)
    jitter = {'jitter_order': None}
    if rng.random() < cfg.jitter_p:
        jitter = dict(jitter_order=tuple(int(i) for i in rng.permutation(4)),
                      brightness=float(rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)),
                      contrast=float(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)),
                      saturation=float(rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)),
                      hue=float(rng.uniform(-cfg.hue, cfg.hue)))
    gray = bool(rng.random() < cfg.gray_p)
    blur = float(rng.uniform(*cfg.blur_sigma)) if rng.random() < cfg.blur_p else None
    flips = dict(hflip=bool(rng.random() < cfg.hflip_p),
                 vflip=bool(rng.random() < 0.5) if cfg.vflip else False,
                 rot90=int(rng.integers(0, 4)) if cfg.rot90 else 0)
    hed = {}
    if cfg.hed > 0:  # drawn last and only when on: the paper's draws stay as they were
        alpha, beta = stain.sample_hed(rng, cfg.hed)
        hed = dict(hed_alpha=tuple(float(a) for a in alpha),
                   hed_beta=tuple(float(b) for b in beta))
    return ViewParams(crop=crop, gray=gray, blur_sigma=blur, **jitter, **flips, **hed)


def resized_crop(img: np.ndarray, crop, size: int) -> np.ndarray:
    top, left, h, w = crop
    if h <= size and w <= size:
        patch = img[top:top + h, left:left + w]
        return cv2.resize(patch, (size, size), interpolation=cv2.INTER_LINEAR)
    # crop first: PIL's resize(box=...) would also sample pixels outside the box.
    pil = Image.fromarray(np.ascontiguousarray(img[top:top + h, left:left + w]))
    return np.asarray(pil.resize((size, size), Image.BILINEAR))


_LUMA_WEIGHTS = np.float32([19595, 38470, 7471])
_LEVELS = np.arange(256, dtype=np.float32)


def luma(img: np.ndarray) -> np.ndarray:
    """PIL's RGB->L exactly: the sum stays below 2**24, so float32 does not round."""
    s = img.reshape(-1, 3).astype(np.float32) @ _LUMA_WEIGHTS
    s += np.float32(32768.0)
    s *= np.float32(1.0 / 65536.0)
    return s.astype(np.uint8).reshape(img.shape[:2])  # truncation = >> 16


def _blend_table(degenerate, factor: float) -> np.ndarray:
    """PIL's Image.blend (float32, truncated) for every level: [256], or [d, x] for levels."""
    d = np.asarray(degenerate, np.float32)
    out = d + np.float32(factor) * (_LEVELS - d)
    return np.clip(out, 0, 255).astype(np.uint8)


def adjust_brightness(img: np.ndarray, factor: float) -> np.ndarray:
    return cv2.LUT(img, _blend_table(0.0, factor))


def adjust_contrast(img: np.ndarray, factor: float) -> np.ndarray:
    # PIL: blend with a constant image at the rounded mean of the luma.
    mean = int(float(luma(img).mean()) + 0.5)
    return cv2.LUT(img, _blend_table(float(mean), factor))


def adjust_saturation(img: np.ndarray, factor: float) -> np.ndarray:
    # PIL: blend with the luma image; a (luma, value) table, exact and cheap.
    table = _blend_table(_LEVELS[:, None], factor).ravel()
    index = cv2.cvtColor(luma(img), cv2.COLOR_GRAY2RGB).astype(np.uint16)
    index <<= 8
    index |= img
    return table.take(index)


def adjust_hue(img: np.ndarray, hue_factor: float) -> np.ndarray:
    # torchvision adds uint8(hue_factor * 255) to PIL's uint8 hue, wrapping (int(): C cast).
    shift = int(hue_factor * 255) % 256
    if shift == 0:
        return img
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.uint8(shift)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def grayscale(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(luma(img), cv2.COLOR_GRAY2RGB)


def box_radius(sigma, xp=np):
    """The extended-box radius of PIL's GaussianBlur(radius=sigma) (xp: numpy or jnp)."""
    sigma2 = sigma * sigma / 3.0
    small_l = xp.floor((xp.sqrt(sigma2 * 12.0 + 1.0) - 1.0) / 2.0)
    a = (2 * small_l + 1) * (small_l * (small_l + 1) - 3 * sigma2)
    return small_l + a / (6 * (sigma2 - (small_l + 1) ** 2))


def pil_gaussian_kernel(sigma: float) -> np.ndarray:
    """The 1-D kernel equal to PIL's GaussianBlur(radius=sigma): 3 extended-box passes."""
    radius = float(box_radius(sigma))
    whole = int(math.floor(radius))
    box = np.ones(2 * whole + 3, np.float64)
    box[0] = box[-1] = radius - whole   # the two fractional end taps
    box = box / (2 * radius + 1)
    return np.convolve(np.convolve(box, box), box)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    # Rows first, then columns, as PIL; filter2D is faster than sepFilter2D here.
    k = pil_gaussian_kernel(sigma).astype(np.float32)
    out = cv2.filter2D(img, -1, k[None, :], borderType=cv2.BORDER_REPLICATE)
    return cv2.filter2D(out, -1, k[:, None], borderType=cv2.BORDER_REPLICATE)


_ROTATIONS = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}

_JITTER_OPS = {BRIGHTNESS: lambda img, p: adjust_brightness(img, p.brightness),
               CONTRAST: lambda img, p: adjust_contrast(img, p.contrast),
               SATURATION: lambda img, p: adjust_saturation(img, p.saturation),
               HUE: lambda img, p: adjust_hue(img, p.hue)}


def apply_view(img: np.ndarray, params: ViewParams, size: int, crop_only: bool = False):
    """One augmented view; `crop_only`: data.augment_on_device's CPU share (crop, vflip, rot90)."""
    out = resized_crop(img, params.crop, size)
    if not crop_only:
        # HED first: it models the staining, which happens to the slide before any scanner
        # images it, so it precedes what models the acquisition (jitter, grey, blur). Per
        # pixel, it runs after the crop at the output size, whatever the source size.
        if params.hed_alpha is not None:
            out = stain.apply_hed(out, params.hed_alpha, params.hed_beta)
        for op in params.jitter_order or ():
            out = _JITTER_OPS[op](out, params)
        if params.gray:
            out = grayscale(out)
        if params.blur_sigma is not None:
            out = gaussian_blur(out, params.blur_sigma)
        if params.hflip:
            out = cv2.flip(out, 1)
    if params.vflip:
        out = cv2.flip(out, 0)
    if params.rot90:  # counter-clockwise, as np.rot90
        out = cv2.rotate(out, _ROTATIONS[params.rot90])
    return np.ascontiguousarray(out)


def two_views(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig):
    """(view1, view2): two independent draws on the same image (on_device: their crops)."""
    h, w = img.shape[:2]
    params = [sample_view_params(rng, h, w, cfg) for _ in range(2)]
    return tuple(apply_view(img, p, cfg.image_size, cfg.on_device) for p in params)
