"""Training records of whole slides read at a drawn µm/px (`data.mpps`) and at fresh positions
inside the tissue every epoch (`data.sampling=tissue_random`), docs/method.md §9.

A wrapper of the grid's SlideSource, not options of it: the grid stays what the export, the
normalization statistics and the monitor read, and with both options off no code here runs
(the paper's stream is byte for byte what it was). Everything it reads is a pure function
of (record, epoch, µm/px): which µm/px each element gets is drawn by the pipeline from
(seed, epoch, position), the fresh positions of a slide from (seed, epoch, slide), so the
batches do not depend on the worker or process count and a resumed run reads what an
uninterrupted one reads.

Record space. Resolutions alone keep the grid's records. Fresh positions number each
slide's patches 0..n-1 (n: its grid's count, or data.patches_per_slide), slide after slide;
record (slide, j) is the j-th of the positions drawn for the slide in that epoch, so the
epoch's permutation (EpochPlan, unchanged) orders them like grid records.
"""
import collections
import json
import logging
import math
import threading
from typing import Optional, Sequence

import numpy as np

from clusiam_jax.data.records import PatchRecord, PatchSource, Subset
from clusiam_jax.data.slide_source import Region, SlideSource
from clusiam_jax.errors import ConfigError, DataError
from clusiam_jax.slides import coords as coords_lib
from clusiam_jax.slides import reader, tissue_positions

logger = logging.getLogger(__name__)

# A resolution at most this much finer than a slide's level 0 is read from level 0 and
# enlarged a little (scanners write 0.2527 µm/px for what a recipe calls 0.25).
LEVEL0_TOLERANCE = 0.01
# Per process: tissue samplers kept (an integral image, 8 bytes a mask pixel: a large
# slide's at 8 µm/px is ~10 MiB), and drawn positions kept (16 bytes each). Elements come
# in a random order over all slides, so each worker needs every slide's draw of the epoch;
# past these bounds a slide's are drawn again (the same numbers), not kept.
_SAMPLER_BYTES = 512 * 2 ** 20
_POSITION_ROWS = 1 << 22


def training_sampler(source: PatchSource, path: str, mpps: Sequence[float] = (),
                     fresh: bool = False, patches_per_slide: int = 0,
                     seed: int = 0) -> 'SlideSampler':
    """The sampler of `source` (a SlideSource or a Subset of one: the slides monitor.holdout
    left to training); one ConfigError/DataError line, naming the slide, for what cannot be
    read: no slides, an unknown level-0 µm/px, a resolution finer than level 0, no mask."""
    base = source.parent if isinstance(source, Subset) else source
    if not isinstance(base, SlideSource):
        kind = ('a built dataset' if source.dataset_dir else
                'a folder or list of patch files')
        what = ("data.sampling=tissue_random draws positions inside each slide's tissue "
                'mask' if fresh else 'data.mpps reads each patch at other µm/px from its slide')
        raise ConfigError(f'{what}: data.path {path} is {kind}, which has no slides; tile the '
                          f'slides (--mode tile) and train on the tiling')
    grid = (source.indices if isinstance(source, Subset)
            else np.arange(len(base), dtype=np.int64))
    sampler = SlideSampler(base, grid, tuple(float(m) for m in mpps), bool(fresh),
                           int(patches_per_slide), int(seed))
    said = ([f'each sample at one of {", ".join(f"{m:g}" for m in mpps)} µm/px'] if mpps
            else []) + ([f'fresh positions inside the tissue every epoch ({len(sampler)} '
                         f'patches an epoch)'] if fresh else [])
    logger.info('training from slides: %s', '; '.join(said))
    if fresh and len(sampler) > _POSITION_ROWS:
        logger.warning('tissue_random: %d patches an epoch, more than the %d drawn positions a '
                       'worker keeps; slides whose positions were dropped are drawn again when '
                       'next asked (slower input): data.patches_per_slide caps the epoch',
                       len(sampler), _POSITION_ROWS)
    return sampler


class SlideSampler(PatchSource):
    """Record -> uint8 [S, S, 3] at a µm/px and epoch (`load_sample`); S the tiling's size."""
    from_slides = True

    def __init__(self, base: SlideSource, grid: np.ndarray, mpps: tuple, fresh: bool,
                 patches_per_slide: int, seed: int):
        self.base, self.mpps, self.fresh, self.seed = base, mpps, fresh, seed
        self.slide_ids = base.slide_ids
        self._grid = np.asarray(grid, np.int64)
        in_grid = base.slide_index[self._grid]
        slides = np.unique(in_grid)
        n = len(base.slides)
        self._size0, self._out = np.zeros(n), np.zeros(n, np.int64)
        self._level0, self._min_tissue = np.full(n, np.nan), np.full(n, np.nan)
        for s in slides.tolist():
            self._size0[s], self._out[s] = base._patch_sizes(s)
            if mpps:
                self._level0[s] = self._checked_level0(s)
            if fresh:
                self._min_tissue[s] = self._checked_mask(s)
        if fresh:
            counts = (np.full(len(slides), patches_per_slide, np.int64) if patches_per_slide
                      else np.bincount(in_grid, minlength=n)[slides].astype(np.int64))
            self.slide_index = np.repeat(slides.astype(np.int32), counts)
            self._count, self._first = np.zeros(n, np.int64), np.zeros(n, np.int64)
            self._count[slides] = counts
            self._first[slides] = np.concatenate([[0], np.cumsum(counts)[:-1]])
        else:
            self.slide_index = in_grid
        self.__setstate__({})

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items()
                if k not in ('_lock', '_samplers', '_drawn', '_downsamples')}

    def __setstate__(self, state):
        """Fresh per-process caches."""
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._samplers = collections.OrderedDict()   # slide -> (TissueSampler, bytes, step)
        self._drawn = collections.OrderedDict()      # (epoch, slide) -> int64 [n, 2]
        self._downsamples = {}                       # slide -> its levels' downsamples

    # ----------------------------------------------------------------- start checks

    def _name(self, s: int) -> str:
        return f'slide {self.base.slides[s].slide_id} ({self.base.slides[s].path})'

    def _checked_level0(self, s: int) -> float:
        """Slide s's level-0 µm/px: what our tiling recorded (the one its grid used: a CSV
        column or tile.mpp_override included), else the slide's metadata; refused when
        unknown or coarser than a data.mpps resolution asks for."""
        recorded = self.base.slides[s].coords.attrs.get('level0_mpp')
        if isinstance(recorded, (int, float)) and recorded > 0:
            level0, origin = float(recorded), 'recorded by the tiling'
        else:
            try:
                found = reader.level0_resolution(self.base._handle(s))
            except ValueError as e:   # BadImageError: the slide does not open
                raise DataError(f'{self._name(s)}: data.mpps needs its level-0 µm/px, and '
                                f'the slide does not open ({e})') from None
            if found.mpp is None:
                why = found.implausible or found.origin
                raise DataError(f'{self._name(s)}: data.mpps needs its level-0 µm/px; its '
                                f'coordinate file has none and the slide says: {why}; tile it '
                                f'(--mode tile: tile.mpp_default or a CSV mpp column give one)')
            level0, origin = float(found.mpp), found.origin
        finest = min(self.mpps)
        if finest < level0 * (1 - LEVEL0_TOLERANCE):
            raise DataError(f'{self._name(s)}: data.mpps {finest:g} µm/px is finer than the '
                            f'slide holds (level 0: {level0:.4g} µm/px, {origin}); drop '
                            f'{finest:g} from data.mpps or leave the slide out')
        return level0

    def _checked_mask(self, s: int) -> float:
        """The tiling's tile.min_tissue for slide s, after checking its mask is stored."""
        slide = self.base.slides[s]
        if not slide.coords.has_tissue_mask:
            raise DataError(f'{self._name(s)}: data.sampling=tissue_random needs the tissue '
                            f'mask the tiling kept its patches by, and its coordinate file '
                            f'has none (a CLAM/TRIDENT file, or a tiling made before masks '
                            f'were stored): tile again (--mode tile)')
        try:   # the mask records it too (read with it, in the workers)
            settings = json.loads(slide.coords.attrs['tiling_inputs'])['settings']
            return float(settings['min_tissue'])
        except (KeyError, TypeError, ValueError):
            return math.nan

    # ------------------------------------------------------------------ records

    def path(self, index: int) -> str:
        if not self.fresh:
            return self.base.path(int(self._grid[index]))
        s = int(self.slide_index[index])
        return f'{self.base.slides[s].path}#tissue_random={index - self._first[s]}'

    def record(self, index: int) -> PatchRecord:
        if not self.fresh:
            return self.base.record(int(self._grid[index]))
        s = self.base.slides[int(self.slide_index[index])]
        return PatchRecord(self.path(index), s.slide_id, s.label or None)

    def labels(self, indices):
        return [self.base.slides[s].label or None
                for s in self.slide_index[np.asarray(indices, np.int64)]]

    def region(self, index: int, epoch: int, mpp: Optional[float]) -> Region:
        """What load_sample reads: the record's square (its grid square, or the epoch's
        fresh position for it) at `mpp` (None: the tiling's) around the same centre."""
        s = int(self.slide_index[index])
        size0, out = float(self._size0[s]), int(self._out[s])
        if self.fresh:
            x, y = self._positions(int(epoch), s)[index - self._first[s]]
        else:
            x, y = self.base._xy[self._grid[index]]
        x, y = int(x), int(y)
        if mpp is None:
            return s, x, y, size0, out
        side = out * float(mpp) / float(self._level0[s])
        if abs(side - size0) <= 0.5:   # the tiling's own µm/px: its own square
            return s, x, y, size0, out
        shift, step = (size0 - side) / 2, self._step(s, side, out)
        x, y = (int(math.floor((v + shift) / step + 0.5)) * step for v in (x, y))
        return s, x, y, side, out

    def _step(self, s: int, side: float, out: int) -> int:
        """The level-0 px of one pixel of the level a square of `side` is read from, when
        whole (else 1). Squares start on that level's pixels: OpenSlide places a square
        starting between them by resampling the level (slower, and a sub-pixel blur)."""
        with self._lock:
            downsamples = self._downsamples.get(s)
        if downsamples is None:
            downsamples = tuple(lv.downsample for lv in self.base._handle(s).levels)
            with self._lock:
                self._downsamples[s] = downsamples
        ds = downsamples[reader.coarsest_within(downsamples, side / out)]
        step = int(round(ds))
        return step if step > 1 and abs(ds - step) < 1e-6 else 1

    def load(self, index: int) -> np.ndarray:
        """The record at the tiling's µm/px (fresh positions: epoch 0's)."""
        return self.load_sample(index, 0, None)

    def load_sample(self, index: int, epoch: int, mpp: Optional[float]) -> np.ndarray:
        return self.base.read(*self.region(index, epoch, mpp))

    def prefetch_samples(self, samples) -> None:
        """Reads ahead (slides in a bucket) what load_sample(*sample) will read."""
        if not self.base.remote:
            return
        regions = []
        for index, epoch, mpp in samples:
            if int(self.slide_index[index]) not in self._downsamples:
                continue   # not opened yet by this process: its first load opens it
            try:
                regions.append(self.region(index, epoch, mpp))
            except Exception:  # a slide or mask that does not open: the load reports it
                continue
        self.base.prefetch_regions(regions)

    def close(self) -> None:
        self.base.close()

    # --------------------------------------------------------------- fresh positions

    def _positions(self, epoch: int, s: int) -> np.ndarray:
        """int64 [n, 2]: slide s's fresh top-left corners of `epoch`."""
        key = (epoch, s)
        with self._lock:
            drawn = self._drawn.get(key)
            if drawn is not None:
                self._drawn.move_to_end(key)
                return drawn
        sampler, step = self._sampler(s)
        drawn = sampler.draw(int(self._count[s]), self.seed, epoch, s) * step
        with self._lock:
            self._drawn[key] = drawn
            rows = sum(len(v) for v in self._drawn.values())
            while rows > _POSITION_ROWS and len(self._drawn) > 1:
                rows -= len(self._drawn.popitem(last=False)[1])
        return drawn

    def _sampler(self, s: int):
        """(slide s's TissueSampler, its lattice step): positions are drawn in units of one
        pixel of the level the tiling's square is read from (_step), under the rule at
        level 0 (x = step * p: the mask's pixels per unit are its downsample / step)."""
        with self._lock:
            kept = self._samplers.get(s)
            if kept is not None:
                self._samplers.move_to_end(s)
                return kept[0], kept[2]
        slide = self.base.slides[s]
        found = coords_lib.read_tissue(slide.coord_file)
        if found is None:   # the file was replaced since the start
            raise DataError(f'{self._name(s)}: {slide.coord_file} has no tissue mask any '
                            f'more: tile again (--mode tile)')
        min_tissue = found.min_tissue if found.min_tissue is not None else self._min_tissue[s]
        if math.isnan(min_tissue):
            raise DataError(f'{self._name(s)}: {slide.coord_file} does not record the '
                            f'tile.min_tissue its patches were kept by: tile again')
        step = self._step(s, self._size0[s], int(self._out[s]))
        level0 = (None if found.level0_size is None
                  else tuple(side // step for side in found.level0_size))
        sampler = tissue_positions.TissueSampler(
            found.mask, found.downsample / step, self._size0[s] / step, float(min_tissue),
            level0, name=self._name(s))
        size = (found.mask.shape[0] + 1) * (found.mask.shape[1] + 1) * 8   # its integral, at most
        with self._lock:
            self._samplers[s] = (sampler, size, step)
            held = sum(v[1] for v in self._samplers.values())
            while held > _SAMPLER_BYTES and len(self._samplers) > 1:
                held -= self._samplers.popitem(last=False)[1][1]
        return sampler, step
