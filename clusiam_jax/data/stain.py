"""HED stain jitter (augment.hed, docs/method.md §1): colour deconvolution of RGB into
haematoxylin, eosin and DAB amounts (Ruifrok & Johnston 2001), a random per-stain scale and
shift (Tellez et al. 2018), and back. NumPy and OpenCV only: it runs in the grain workers.

Units. Beer-Lambert: a pixel's optical density OD_c = -log10(I_c) (I in [0, 1]) is linear in
the stain amounts, OD = hed @ RGB_FROM_HED. The matrix is Ruifrok & Johnston's, as
scikit-image's `rgb2hed` uses it; the amounts here are in Ruifrok's own decadic OD units,
which are 6x scikit-image's (it divides the natural-log OD by ln(1e6), and log10(1e6) = 6) and,
unlike its `rgb2hed`, never clipped at 0, so that `hed_to_rgb(rgb_to_hed(x))` is x. The jitter
strength is in these units: one stain shifted by 0.05 darkens white by at most 11 % in a
channel, close to the 15 % of Tellez's own code (a +2-offset natural-log space); in
scikit-image's units the same number would be a 6x stronger shift.
"""
from typing import Iterable, Tuple

import cv2
import numpy as np

from clusiam_jax.errors import DataError

# Rows: the OD of one unit of haematoxylin, eosin, DAB in (R, G, B) (Ruifrok & Johnston 2001).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],
                         [0.07, 0.99, 0.11],
                         [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

# Intensities below this count as this (log of 0): an OD of 6, far darker than any scanner.
MIN_INTENSITY = 1e-6

# The OD of each uint8 level, so a uint8 image's logarithms are one table lookup.
_OD_LEVELS = -np.log10(np.maximum(np.arange(256) / 255.0, MIN_INTENSITY)).astype(np.float32)
_LN10 = float(np.log(10.0))


def _as_unit(img) -> np.ndarray:
    """Intensities in [0, 1]: uint8 scaled by 1/255, floats taken as they are."""
    img = np.asarray(img)
    if img.dtype == np.uint8:
        return img / 255.0
    return img.astype(np.float64)


def rgb_to_hed(img) -> np.ndarray:
    """[..., 3] RGB (uint8, or float in [0, 1]) -> [..., 3] float64 stain amounts (H, E, D)."""
    od = -np.log10(np.maximum(_as_unit(img), MIN_INTENSITY))
    return od @ HED_FROM_RGB


def hed_to_rgb(hed) -> np.ndarray:
    """[..., 3] stain amounts -> float64 RGB in [0, 1] (the inverse of rgb_to_hed)."""
    od = np.asarray(hed, np.float64) @ RGB_FROM_HED
    return np.clip(np.power(10.0, -od), 0.0, 1.0)


def sample_hed(rng: np.random.Generator, strength: float) -> Tuple[np.ndarray, np.ndarray]:
    """(alpha[3], beta[3]): alpha_c ~ U(1 - s, 1 + s), beta_c ~ U(-s, s), c = H, E, D."""
    alpha = rng.uniform(1.0 - strength, 1.0 + strength, 3)
    beta = rng.uniform(-strength, strength, 3)
    return alpha, beta


def od_map(alpha, beta) -> Tuple[np.ndarray, np.ndarray]:
    """The jitter as one affine map of OD, OD' = OD @ a + b: deconvolution, scale and
    shift, and reconvolution are all linear, so a 3x3 matrix and an offset do all three."""
    alpha, beta = np.asarray(alpha, np.float64), np.asarray(beta, np.float64)
    return (HED_FROM_RGB * alpha) @ RGB_FROM_HED, beta @ RGB_FROM_HED


def apply_hed(img: np.ndarray, alpha, beta) -> np.ndarray:
    """uint8 HxWx3 with every pixel's stain amounts hed_c -> alpha_c hed_c + beta_c, rounded."""
    a, b = od_map(alpha, beta)
    # cv2.transform: dst = m @ [src, 1] per pixel; the -ln 10 turns OD into log-intensity.
    m = (-_LN10 * np.concatenate([a.T, b[:, None]], axis=1)).astype(np.float32)
    log_intensity = cv2.transform(_OD_LEVELS.take(img), m)
    # cv2.exp of a large negative is 0; convertScaleAbs scales, rounds and saturates to uint8.
    return cv2.convertScaleAbs(cv2.exp(log_intensity), alpha=255.0)


def hed_jitter(img: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """One HED-jittered copy of a uint8 HxWx3 image (Tellez et al. 2018; 0.05: 'HED-light')."""
    return apply_hed(img, *sample_hed(rng, strength))


def is_grayscale(img: np.ndarray) -> bool:
    """All three channels equal (grey input is replicated to three channels on decode)."""
    img = np.asarray(img)
    return bool(np.array_equal(img[..., 0], img[..., 1])
                and np.array_equal(img[..., 0], img[..., 2]))


def require_colour_of(source, where: str, count: int = 16) -> None:
    """require_colour over a fixed sample of `source` (unreadable patches left to training)."""
    from clusiam_jax.data import image_io, stats
    images = []
    for i in stats.sample_indices(len(source), count):
        try:
            images.append(source.load(int(i)))
        except (image_io.BadImageError, DataError, OSError):
            continue
    require_colour(images, where)


def require_colour(images: Iterable[np.ndarray], where: str) -> None:
    """Refuse HED jitter on grayscale data: it would invent stains (grey deconvolves into
    haematoxylin plus DAB with a negative eosin). A sample refuses only when every image is
    grey, since a patch of white background is grey in any stained slide."""
    images = list(images)
    if images and all(is_grayscale(img) for img in images):
        raise DataError(f'augment.hed jitters H&E stains; {where} is grayscale')
