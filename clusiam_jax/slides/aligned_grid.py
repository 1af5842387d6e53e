"""`tile.align`: a patch grid laid on the scanner's own tiles, so that reading a patch
decodes as few tiles as it can (a patch on the regular grid straddles tile borders), at the
level reader.read_patch reads it from: patches no larger than a tile packed into each tile
from its corner, a larger one starting on a tile corner.
"""
import dataclasses
import math
from typing import Tuple, Union

import numpy as np

from clusiam_jax.slides import reader

# The least fraction of a tile's area the packed patches must cover.
MIN_COVERAGE = 0.7


@dataclasses.dataclass(frozen=True)
class AlignedGrid:
    xs: np.ndarray               # int64 level-0 starts of the columns
    ys: np.ndarray               # and of the rows (every pair is a patch)
    tile: Tuple[int, int]        # the scanner's tile (width, height) at `level`
    level: int                   # the pyramid level the patches are read from


def _axis(extent0: int, size0: int, side: int, tile: int, ds: float
          ) -> Tuple[np.ndarray, float]:
    if side <= tile:
        offsets, period = np.arange(tile // side) * side, tile
    else:
        offsets, period = np.zeros(1, np.int64), math.ceil(side / tile) * tile
    periods = np.arange(int(extent0 / ds // period) + 1) * period
    level_starts = (periods[:, None] + offsets[None, :]).ravel()
    starts = np.ceil(level_starts * ds).astype(np.int64)
    # The smallest level-0 start whose floor(start / ds), in OpenSlide's floating point,
    # is the level start, as OpenSlide finds a region's first tile: for a fractional ds the
    # product above can fall a pixel short of the tile corner.
    starts += np.floor(starts / ds) < level_starts
    starts -= np.floor((starts - 1) / ds) >= level_starts
    return starts[starts + size0 <= extent0], len(offsets) * side / period


def aligned_grid(slide: reader.Slide, size0: int, patch_size: int
                 ) -> Union[AlignedGrid, str]:
    """The aligned grid of patches of `size0` level-0 px read at `patch_size` px, or why
    there is none for this slide (a sentence)."""
    level = slide.best_level(size0 / patch_size)
    tile = slide.tile_size(level)
    if tile is None:
        return (f'the slide does not report its tile size at level {level} '
                f'(openslide.level[{level}].tile-width)')
    ds = slide.levels[level].downsample
    side = max(1, int(round(size0 / ds)))
    width, height = slide.dimensions
    xs, cover_x = _axis(width, size0, side, tile[0], ds)
    ys, cover_y = _axis(height, size0, side, tile[1], ds)
    coverage = cover_x * cover_y
    if coverage < MIN_COVERAGE:
        return (f'{side}-px patches on its {tile[0]}x{tile[1]}-px tiles (level {level}) '
                f'would cover {coverage:.0%} of the area (less than {MIN_COVERAGE:.0%})')
    return AlignedGrid(xs, ys, tuple(tile), level)
