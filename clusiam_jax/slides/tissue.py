"""Tissue detection on a low-resolution image of a slide (docs/method.md §9), as CLAM,
TRIDENT's classic path and histolab do, every step a key of the `tile` config section.
Supplied polygons (`polygon_mask`) replace it.
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


def tissue_mask(rgb: np.ndarray, mpp: float, params: TissueParams) -> np.ndarray:
    """bool [H, W]: the tissue of an RGB image at `mpp` µm/px: saturation over the fixed
    threshold or Otsu's (never below `min_saturation`) and value over `black_value`, closed
    then opened; holes not touching the border under `max_hole_um2` filled, components
    under `min_area_um2` dropped."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    blur = max(1, int(params.median_blur) | 1)   # odd
    saturation, value = cv2.medianBlur(hsv[..., 1], blur), cv2.medianBlur(hsv[..., 2], blur)
    threshold = params.saturation_threshold if params.saturation_threshold > 0 else max(int(
        cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0]),
        params.min_saturation)
    mask = (saturation > threshold) & (value > params.black_value)
    if params.morph_kernel > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (params.morph_kernel,) * 2)
        m = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel)
        mask = cv2.morphologyEx(m, cv2.MORPH_OPEN, kernel).astype(bool)
    if params.max_hole_um2 > 0:
        _, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8),
                                                               connectivity=4)
        x, y, bw, bh, area = stats.T
        h, w = mask.shape
        fill = (x > 0) & (y > 0) & (x + bw < w) & (y + bh < h) & (
            area <= params.max_hole_um2 / (mpp * mpp))
        fill[0] = False
        mask = mask | fill[labels]
    if params.min_area_um2 > 0:
        _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8),
                                                               connectivity=8)
        keep = stats[:, cv2.CC_STAT_AREA] >= params.min_area_um2 / (mpp * mpp)
        keep[0] = False
        mask = keep[labels]
    return mask


def polygon_mask(annotations, shape, downsample: float) -> np.ndarray:
    """bool [H, W]: the annotations' polygons, holes kept, at `downsample` level-0 px/px."""
    canvas = np.zeros(shape, np.uint8)
    for annotation in annotations:
        for polygon in getattr(annotation.geometry, 'geoms', [annotation.geometry]):
            for ring, value in [(polygon.exterior, 1), *((h, 0) for h in polygon.interiors)]:
                points = np.round(np.asarray(ring.coords) / downsample).astype(np.int32)
                cv2.fillPoly(canvas, [points], value)   # holes cut back out
    return canvas.astype(bool)


def patch_tissue_fraction(rgb: np.ndarray) -> float:
    """Fraction of a patch's pixels that are tissue (`data.min_tissue`), with a fixed
    threshold: Otsu on one patch of glass splits noise."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    return float(((cv2.medianBlur(hsv[..., 1], 5) > 15) & (hsv[..., 2] > 30)).mean())
