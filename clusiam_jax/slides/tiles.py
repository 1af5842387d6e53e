"""The direct backend of TIFF-based slides: tiles read with one `pread` each and decoded by
tifffile's codecs, without OpenSlide's per-read machinery (training reads each patch once
per epoch in random order). Level 0 only where a tile reads exactly as OpenSlide reads it;
an OME-TIFF's SubIFD levels, which OpenSlide does not list, numbered after OpenSlide's.
"""
import dataclasses
import logging
import os
from typing import Dict, Optional

import numpy as np

log = logging.getLogger('clusiam_jax')

WHITE = 255


@dataclasses.dataclass
class _Level:
    page: object
    width: int
    height: int
    tile_w: int
    tile_h: int
    tiles_across: int
    offsets: np.ndarray
    counts: np.ndarray


class TiffTiles:
    """Direct reads of the levels of one slide that passed the check against OpenSlide."""

    def __init__(self, tiff, levels: Dict[int, _Level], width0: int):
        self._tiff = tiff          # keeps the pages' parent (and its file) open
        self._fd = tiff.filehandle._fh.fileno()
        self.levels = levels
        self.width0 = width0

    @classmethod
    def open(cls, path: str, slide) -> Optional['TiffTiles']:
        """The reader of `path` (`slide`: its OpenSlide handle), or None when tifffile does
        not read level 0 as OpenSlide does."""
        if not path.lower().endswith(('.svs', '.tif', '.tiff')):
            return None
        try:
            import tifffile
            tiff = tifffile.TiffFile(path)
        except Exception:  # not a TIFF tifffile understands: OpenSlide reads it all
            return None
        # Not OpenSlide's coarser levels: their sub-pixel placement is no whole tile's.
        kept = None
        try:   # closes `tiff` unless kept, also when OpenSlide's check read raises
            size = tuple(slide.level_dimensions[0])
            candidate = next((_level_from_page(page) for page in tiff.pages
                              if (page.imagewidth, page.imagelength) == size), None)
            reader = cls(tiff, {0: candidate}, slide.dimensions[0])
            if candidate is not None and reader._agrees(slide):
                reader._add_hidden_levels(slide)
                kept = reader
        finally:
            if kept is None:
                tiff.close()
        return kept

    def _add_hidden_levels(self, slide):
        """The reduced levels of tifffile's first series past OpenSlide's own, down to the
        first that is not an RGB tiled page or whose middle tile does not decode."""
        try:
            series = self._tiff.series[0]
            levels = series.levels if (series.levels[0].keyframe.imagewidth,
                                       series.levels[0].keyframe.imagelength) == tuple(
                                           slide.dimensions) else []
        except Exception:   # an unusual layout: OpenSlide's levels only
            return
        for index in range(slide.level_count, len(levels)):
            level = _level_from_page(levels[index].keyframe)
            if level is None:
                return
            try:
                self._tile(level, (level.height // 2 // level.tile_h) * level.tiles_across
                           + level.width // 2 // level.tile_w)
            except Exception as e:  # a codec tifffile lacks, a damaged tile
                log.debug('hidden level %d: not readable by tifffile (%s)', index, e)
                return
            self.levels[index] = level

    def close(self):
        self._tiff.close()

    def _tile(self, level: _Level, index: int) -> np.ndarray:
        data = os.pread(self._fd, int(level.counts[index]), int(level.offsets[index]))
        try:
            decoded = level.page.decode(data, index, jpegtables=level.page.jpegtables)[0]
            return decoded.reshape(level.tile_h, level.tile_w, 3)
        except Exception as e:  # the codec's own error type: a damaged tile, as OpenSlide
            # reports one, is a ValueError the slide source skips
            raise ValueError(f'tile {index} does not decode '
                             f'({type(e).__name__}: {" ".join(str(e).split())})') from None

    def read(self, level_index: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """uint8 [h, w, 3] of the level from level-0 (x0, y0) (rounded to the level's
        pixel); white outside the image, as OpenSlide's transparent over white."""
        level = self.levels[level_index]
        ds = self.width0 / level.width
        x, y = int(round(x0 / ds)), int(round(y0 / ds))
        out = np.full((h, w, 3), WHITE, np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, level.width), min(y + h, level.height)
        if x0 >= x1 or y0 >= y1:
            return out
        for ty in range(y0 // level.tile_h, (y1 - 1) // level.tile_h + 1):
            for tx in range(x0 // level.tile_w, (x1 - 1) // level.tile_w + 1):
                tile = self._tile(level, ty * level.tiles_across + tx)
                # The part of this tile inside both the region and the image.
                ax0, ay0 = max(x0, tx * level.tile_w), max(y0, ty * level.tile_h)
                ax1 = min(x1, (tx + 1) * level.tile_w)
                ay1 = min(y1, (ty + 1) * level.tile_h)
                out[ay0 - y:ay1 - y, ax0 - x:ax1 - x] = tile[
                    ay0 - ty * level.tile_h:ay1 - ty * level.tile_h,
                    ax0 - tx * level.tile_w:ax1 - tx * level.tile_w]
        return out

    def _agrees(self, slide) -> bool:
        """Whether the middle tile of level 0 reads here exactly as OpenSlide's."""
        level = self.levels[0]
        tx = min(level.tiles_across - 1, (level.width // 2) // level.tile_w)
        ty = min(-(-level.height // level.tile_h) - 1, (level.height // 2) // level.tile_h)
        x, y = tx * level.tile_w, ty * level.tile_h
        w, h = min(level.tile_w, level.width - x), min(level.tile_h, level.height - y)
        try:
            mine = self.read(0, x, y, w, h)
        except Exception as e:  # a codec tifffile lacks, a damaged tile
            log.debug('%s level 0: tiles not readable by tifffile (%s)', slide, e)
            return False
        theirs = np.asarray(slide.read_region((x, y), 0, (w, h)))
        theirs = np.where(theirs[..., 3:] == 255, theirs[..., :3], WHITE).astype(np.uint8)
        return bool(np.array_equal(mine, theirs))


def _level_from_page(page) -> Optional[_Level]:
    """The page as a level read tile by tile, if it is tiled, 8-bit RGB, contiguous (RGB
    only: an alpha channel would need OpenSlide's compositing over white)."""
    width, height = page.imagewidth, page.imagelength
    if not page.is_tiled or page.planarconfig != 1 or page.samplesperpixel != 3 or any(
            b != 8 for b in np.atleast_1d(page.bitspersample)):
        return None
    across, down = -(-width // page.tilewidth), -(-height // page.tilelength)
    if len(page.dataoffsets) != across * down:
        return None
    return _Level(page, width, height, page.tilewidth, page.tilelength, across,
                  np.asarray(page.dataoffsets, np.int64),
                  np.asarray(page.databytecounts, np.int64))
