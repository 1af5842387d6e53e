"""The two-view augmentation of docs/method.md §1, on uint8 RGB numpy arrays.

Each view is drawn independently (``sample_view_params``) and then applied
(``apply_view``); splitting the two makes the parameter distributions testable.
The order and distributions are torchvision's (as used by the original):

1. RandomResizedCrop(size, scale=(0.2, 1), ratio=(3/4, 4/3)), bilinear, with
   torchvision's 10 tries and center-crop fallback;
2. with p=0.8 ColorJitter(0.4, 0.4, 0.4, 0.1): brightness, contrast,
   saturation factors U(0.6, 1.4), hue shift U(-0.1, 0.1), in a random order;
3. with p=0.2 grayscale (ITU-R 601-2 luma, replicated to 3 channels);
4. with p=0.5 Gaussian blur, sigma U(0.1, 2) (PIL ``GaussianBlur(radius=sigma)``);
5. horizontal flip with p=0.5;
6. optional (off by default, histology has no orientation): vertical flip with
   p=0.5 and a rotation by k*90 degrees, k uniform in {0, 1, 2, 3}.

The views stay uint8 (everything before ToTensor); ``normalize`` is the
ToTensor+Normalize reference that the train step reproduces on the device.

Fidelity to the original's PIL operations (tests compare against PIL itself):
  * brightness, contrast, saturation, grayscale: bit-exact (same float32
    blend with truncation as PIL's ``Image.blend``, same fixed-point luma);
  * crop + resize: when no axis is downscaled (always the case for 224 px
    patches cropped to 224 px) OpenCV's bilinear is used, which equals PIL's
    bilinear up to fixed-point rounding (at most 1 level); when an axis
    shrinks, PIL's antialiased resize itself is used (exact);
  * blur: PIL's GaussianBlur is three passes of an "extended" box filter; the
    same three box kernels are convolved into one separable kernel and applied
    with OpenCV (replicated border as PIL). PIL rounds to uint8 after each of
    its 6 passes (3 per axis), we round once: unbiased differences of at most
    2 levels (mean |diff| under 0.8); within the outermost few pixels, where
    PIL re-clamps at each pass, a few levels more;
  * hue: OpenCV's 8-bit HSV (hue in 256 steps, like PIL's) instead of PIL's;
    both quantize hue to 1/256 turn but round differently, so a shifted pixel
    differs by about 1 level on average (a few levels, rarely up to ~12, on
    highly saturated pixels). This is the one op not made exact: PIL's HSV
    round trip alone costs more than the whole rest of a view.
Random numbers come from numpy, not torch, so the same seed does not give the
original's draws; the distributions are the same.
"""
import dataclasses
import math
from typing import Optional, Tuple

import cv2
import numpy as np
from PIL import Image

cv2.setNumThreads(1)  # see image_io: parallelism comes from worker processes

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Parameters of the augmentation; the defaults are docs/method.md §1."""
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
    # data.augment_on_device: the CPU makes only the crops (two_crops); steps 2-5 run
    # in the train step (device_augment).
    on_device: bool = False

    @classmethod
    def from_config(cls, config) -> 'AugmentConfig':
        return cls(image_size=int(config.data.image_size),
                   vflip=bool(config.data.get('vflip', False)),
                   rot90=bool(config.data.get('rot90', False)),
                   on_device=bool(config.data.augment_on_device))


@dataclasses.dataclass(frozen=True)
class ViewParams:
    """Everything random about one view."""
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


def sample_crop(rng: np.random.Generator, height: int, width: int,
                scale=(0.2, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
    """torchvision RandomResizedCrop.get_params: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the largest center crop with an aspect ratio inside `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_view_params(rng: np.random.Generator, height: int, width: int,
                       cfg: AugmentConfig) -> ViewParams:
    """Draws one view's parameters in the original's order of operations."""
    crop = sample_crop(rng, height, width, cfg.scale, cfg.ratio)
    jitter = {}
    if rng.random() < cfg.jitter_p:
        order = tuple(int(i) for i in rng.permutation(4))
        jitter = dict(
            jitter_order=order,
            brightness=float(rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)),
            contrast=float(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)),
            saturation=float(rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)),
            hue=float(rng.uniform(-cfg.hue, cfg.hue)))
    gray = bool(rng.random() < cfg.gray_p)
    blur_sigma = None
    if rng.random() < cfg.blur_p:
        blur_sigma = float(rng.uniform(cfg.blur_sigma[0], cfg.blur_sigma[1]))
    hflip = bool(rng.random() < cfg.hflip_p)
    vflip = bool(rng.random() < 0.5) if cfg.vflip else False
    rot90 = int(rng.integers(0, 4)) if cfg.rot90 else 0
    return ViewParams(crop=crop, jitter_order=jitter.pop('jitter_order', None),
                      gray=gray, blur_sigma=blur_sigma, hflip=hflip, vflip=vflip,
                      rot90=rot90, **jitter)


# ---------------------------------------------------------------------------
# The operations (uint8 HxWx3 in, uint8 HxWx3 out)
# ---------------------------------------------------------------------------

def resized_crop(img: np.ndarray, crop, size: int) -> np.ndarray:
    """Crop (top, left, h, w) and bilinear resize to size x size (see docstring)."""
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
    """PIL's RGB->L: ITU-R 601-2 with its 16-bit fixed-point rounding, exactly.

    (r*19595 + g*38470 + b*7471 + 2**15) >> 16 stays below 2**24, so float32
    (a fast BLAS dot product) computes it without any rounding.
    """
    s = img.reshape(-1, 3).astype(np.float32) @ _LUMA_WEIGHTS
    s += np.float32(32768.0)
    s *= np.float32(1.0 / 65536.0)
    return s.astype(np.uint8).reshape(img.shape[:2])  # truncation = >> 16


def _blend_table(degenerate, factor: float) -> np.ndarray:
    """PIL Image.blend(degenerate, img, factor) for every pair of levels.

    PIL computes ``d + factor * (x - d)`` in float32 and truncates to uint8;
    ``degenerate`` is a scalar (-> 256-entry table) or the levels 0..255
    (-> 256x256 table indexed [d, x]).
    """
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
    # PIL: blend with the luma image; a 256x256 table indexed by (luma, value)
    # is exact and cheaper than per-pixel float arithmetic.
    table = _blend_table(_LEVELS[:, None], factor).ravel()
    index = cv2.cvtColor(luma(img), cv2.COLOR_GRAY2RGB).astype(np.uint16)
    index <<= 8
    index |= img
    return table.take(index)


def adjust_hue(img: np.ndarray, hue_factor: float) -> np.ndarray:
    # torchvision adds uint8(hue_factor * 255) to PIL's uint8 hue (wrapping);
    # int() truncates toward zero like the C cast it relies on.
    shift = int(hue_factor * 255) % 256
    if shift == 0:
        return img
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.uint8(shift)  # uint8 wrap-around = rotation of the hue circle
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def grayscale(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(luma(img), cv2.COLOR_GRAY2RGB)


def _box_kernel(radius: float) -> np.ndarray:
    """PIL's extended box: 2*floor(r)+1 full taps and two fractional end taps."""
    whole = int(math.floor(radius))
    k = np.ones(2 * whole + 3, np.float64)
    k[0] = k[-1] = radius - whole
    return k / (2 * radius + 1)


def pil_gaussian_kernel(sigma: float, passes: int = 3) -> np.ndarray:
    """The 1-D kernel equal to PIL's GaussianBlur(radius=sigma) (3 box passes)."""
    sigma2 = sigma * sigma / passes
    big_l = math.sqrt(sigma2 * 12 + 1)
    small_l = math.floor((big_l - 1) / 2)
    a = (2 * small_l + 1) * (small_l * (small_l + 1) - 3 * sigma2)
    a /= 6 * (sigma2 - (small_l + 1) ** 2)
    box = _box_kernel(small_l + a)
    kernel = box
    for _ in range(passes - 1):
        kernel = np.convolve(kernel, box)
    return kernel


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    # Rows first, then columns, as PIL; filter2D is faster than sepFilter2D here.
    k = pil_gaussian_kernel(sigma).astype(np.float32)
    out = cv2.filter2D(img, -1, k[None, :], borderType=cv2.BORDER_REPLICATE)
    return cv2.filter2D(out, -1, k[:, None], borderType=cv2.BORDER_REPLICATE)


_ROTATIONS = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180,
              3: cv2.ROTATE_90_CLOCKWISE}

_JITTER_OPS = {
    BRIGHTNESS: lambda img, p: adjust_brightness(img, p.brightness),
    CONTRAST: lambda img, p: adjust_contrast(img, p.contrast),
    SATURATION: lambda img, p: adjust_saturation(img, p.saturation),
    HUE: lambda img, p: adjust_hue(img, p.hue),
}


def apply_view(img: np.ndarray, params: ViewParams, size: int) -> np.ndarray:
    """One augmented view (uint8 size x size x 3) of an RGB uint8 image."""
    out = resized_crop(img, params.crop, size)
    if params.jitter_order is not None:
        for op in params.jitter_order:
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
    """(view1, view2): two independent draws applied to the same image."""
    h, w = img.shape[:2]
    p1 = sample_view_params(rng, h, w, cfg)
    p2 = sample_view_params(rng, h, w, cfg)
    return apply_view(img, p1, cfg.image_size), apply_view(img, p2, cfg.image_size)


def crop_view(img: np.ndarray, params: ViewParams, size: int) -> np.ndarray:
    """The CPU share of a view with data.augment_on_device: crop + resize, then the
    histology options vflip / rot90 (the rest of `params` is left to device_augment)."""
    out = resized_crop(img, params.crop, size)
    if params.vflip:
        out = cv2.flip(out, 0)
    if params.rot90:
        out = cv2.rotate(out, _ROTATIONS[params.rot90])
    return np.ascontiguousarray(out)


def two_crops(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig):
    """(crop1, crop2) for on-device augmentation.

    The parameters are drawn exactly as in `two_views` (same generator calls), so the
    crops, flips and rotations equal those the CPU path would make from the same rng.
    """
    h, w = img.shape[:2]
    p1 = sample_view_params(rng, h, w, cfg)
    p2 = sample_view_params(rng, h, w, cfg)
    return crop_view(img, p1, cfg.image_size), crop_view(img, p2, cfg.image_size)

