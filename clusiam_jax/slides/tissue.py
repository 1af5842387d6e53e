"""Tissue detection on a low-resolution image of a slide (docs/method.md §9), as CLAM,
TRIDENT's classic path and histolab do, every step a key of the `tile` config section:
the slide at `tile.tissue_mpp`; HSV saturation, median-blurred; a threshold (Otsu's, never
below `tile.min_saturation`, or fixed), pixels darker than `tile.black_value` excluded;
closing then opening; small holes filled and small components dropped (µm²). Supplied
polygons (`polygon_mask`) replace it.
"""
import dataclasses

import cv2
import numpy as np


@dataclasses.dataclass(frozen=True)
class TissueParams:
    """The `tile` config keys of the detection (config.py has the defaults)."""
    tissue_mpp: float = 8.0
    median_blur: int = 7
    saturation_threshold: int = 0     # 0: Otsu
    min_saturation: int = 15
    black_value: int = 30
    morph_kernel: int = 5
    max_hole_um2: float = 50000.0
    min_area_um2: float = 10000.0

    @classmethod
    def from_config(cls, tile):
        return cls(**{f.name: type(f.default)(tile[f.name]) for f in dataclasses.fields(cls)})


def _odd(n: int) -> int:
    return max(1, int(n) | 1)


def saturation_threshold(saturation: np.ndarray, params: TissueParams) -> int:
    """The threshold used on the blurred saturation (see module docstring)."""
    if params.saturation_threshold > 0:
        return int(params.saturation_threshold)
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return max(int(otsu), int(params.min_saturation))


def _fill_small_holes(mask: np.ndarray, max_hole_px: float) -> np.ndarray:
    """Background components not touching the border and below `max_hole_px` -> tissue."""
    background = (~mask).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(background, connectivity=4)
    h, w = mask.shape
    out = mask.copy()
    for i in range(1, n):
        x, y, bw, bh, area = stats[i]
        touches_border = x == 0 or y == 0 or x + bw == w or y + bh == h
        if not touches_border and area <= max_hole_px:
            out[labels == i] = True
    return out


def _drop_small_components(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8),
                                                           connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area_px
    return keep[labels]


def tissue_mask(rgb: np.ndarray, mpp: float, params: TissueParams) -> np.ndarray:
    """bool [H, W]: the tissue of an RGB image at `mpp` µm/px."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    saturation = cv2.medianBlur(hsv[..., 1], _odd(params.median_blur))
    value = cv2.medianBlur(hsv[..., 2], _odd(params.median_blur))
    mask = (saturation > saturation_threshold(saturation, params)) & (
        value > params.black_value)
    if params.morph_kernel > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (params.morph_kernel,) * 2)
        m = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel)
        mask = cv2.morphologyEx(m, cv2.MORPH_OPEN, kernel).astype(bool)
    px_area = mpp * mpp
    if params.max_hole_um2 > 0:
        mask = _fill_small_holes(mask, params.max_hole_um2 / px_area)
    if params.min_area_um2 > 0:
        mask = _drop_small_components(mask, params.min_area_um2 / px_area)
    return mask


def polygon_mask(annotations, shape, downsample: float) -> np.ndarray:
    """bool [H, W]: the union of the annotations' polygons (level-0 px) on a grid of
    `downsample` level-0 px per pixel; holes stay holes."""
    canvas = np.zeros(shape, np.uint8)
    for annotation in annotations:
        geometry = annotation.geometry
        polygons = getattr(geometry, 'geoms', [geometry])
        for polygon in polygons:
            outer = np.round(np.asarray(polygon.exterior.coords) / downsample).astype(np.int32)
            cv2.fillPoly(canvas, [outer], 1)
            for hole in polygon.interiors:
                inner = np.round(np.asarray(hole.coords) / downsample).astype(np.int32)
                cv2.fillPoly(canvas, [inner], 0)
    return canvas.astype(bool)


def patch_tissue_fraction(rgb: np.ndarray, min_saturation: int = 15,
                          black_value: int = 30, median_blur: int = 5) -> float:
    """Fraction of a patch's pixels that are tissue: `data.min_tissue` for patch
    folders, with a fixed saturation threshold (Otsu on one patch of glass splits noise)."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    saturation = cv2.medianBlur(hsv[..., 1], _odd(median_blur))
    tissue = (saturation > min_saturation) & (hsv[..., 2] > black_value)
    return float(tissue.mean())
