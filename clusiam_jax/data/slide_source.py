"""Patches read straight from whole slides (our tiling, or CLAM/TRIDENT patches/*.h5): slides
open lazily per process, at most `open_slides` at a time, so memory stays flat. Slides at
gs:// / s3:// URLs are read through data/slide_cache.py (tile index, staged cache).

Requests in flight per host from slides in a bucket: `prefetch` reads up to PREFETCH_THREADS
patches at once in each worker process besides the one being loaded, each one read_ranges call
of its tiles (about 4 for 224 px over 256 px tiles), so up to about 4 x (PREFETCH_THREADS + 1)
per worker and data.num_workers times that per host. Why 16: by Little's law a worker making
R pairs a second against a bucket answering in L seconds has R x L patches waiting; at the
rates and latencies docs/storage.md measured and models, that is about 15.
The loader names the next patches of its worker across batch boundaries (pipeline.py); at
most _PREFETCH_QUEUED of them wait for a thread, so what the read-ahead holds stays bounded.
The threads (read_ahead.DaemonPool) never hold up a process's exit."""
import collections
import dataclasses
import logging
import os
import threading
import weakref
from typing import Dict, List, Tuple

import numpy as np

from clusiam_jax import storage
from clusiam_jax.data import image_io, slide_cache
from clusiam_jax.data.read_ahead import DaemonPool
from clusiam_jax.data.records import PatchRecord, PatchSource
from clusiam_jax.errors import DataError
from clusiam_jax.slides import coords as coords_lib
from clusiam_jax.slides import reader, slides_csv, tile_index

logger = logging.getLogger(__name__)

PREFETCH_THREADS = 16   # patches fetched ahead at once per process (module docstring)
# Decoded tiles of slides in a bucket kept per process (all its slides together): 256 RGB
# tiles of 256 px are 48 MiB, room for the patches under way and their neighbours' tiles.
REMOTE_TILES = 256
# Indices asked for and not loaded since, not asked again (load() forgets its index, so a
# record of a small data set is read ahead again in its next epoch).
_PREFETCH_REMEMBERED = 4096
# Patches handed to the prefetch threads and not yet done, per process: a loader outrunning
# its read-ahead (cached tiles) would otherwise queue without end; the rest are asked again.
_PREFETCH_QUEUED = 64
# What a patch read is: (slide, level-0 x, y of its top-left, level-0 side, output side).
Region = Tuple[int, int, int, float, int]


@dataclasses.dataclass(frozen=True)
class SlidePatches:
    slide_id: str
    path: str                  # the slide file
    label: str
    coords: coords_lib.SlideCoords
    index: str = ''            # a slide in a bucket: its tile index (missing: staged whole)
    coord_file: str = ''       # where `coords` was read (its tissue mask: slide_sampler.py)


class SlideSource(PatchSource):
    """Patches of whole slides, index -> uint8 [S, S, 3] (S: the slide's patch size)."""
    from_slides = True

    def __init__(self, slides: List[SlidePatches], open_slides: int = 512, cache_dir: str = '',
                 cache_gb: float = slide_cache.DEFAULT_CACHE_GB):
        self.slides = [dataclasses.replace(s, coords=dataclasses.replace(s.coords, coords=None))
                       for s in slides]
        self.slide_ids = np.array([s.slide_id for s in slides], dtype=str)
        counts = [len(s.coords.coords) for s in slides]
        self.slide_index = np.repeat(np.arange(len(slides), dtype=np.int32), counts)
        self._xy = (np.concatenate([s.coords.coords for s in slides]).astype(np.int64)
                    if slides else np.zeros((0, 2), np.int64))
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.open_slides = int(open_slides)
        self.slide_cache = slide_cache.SlideCache(cache_dir, float(cache_gb) * 2 ** 30)
        self.__setstate__({})

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items()
                if k not in ('_handles', '_bad', '_sizes', '_lock', '_cache', '_pool',
                             '_asked', '_opening', '_tiles', '_queued')}

    def __setstate__(self, state):
        """Fresh per-process state; a dropped handle is never closed: another thread may read it."""
        self.__dict__.update(state)
        self._handles = collections.OrderedDict()
        self._bad: Dict[int, str] = {}
        self._sizes: Dict[int, tuple] = {}
        self._lock = threading.Lock()
        self._cache = None   # one tile cache for all the handles of this process
        self._pool = None    # prefetch threads (made in the process that uses them)
        self._asked = collections.OrderedDict()   # regions given to prefetch lately
        self._queued = 0     # prefetches submitted and not done (_PREFETCH_QUEUED)
        self._opening: Dict[int, threading.Lock] = {}   # slides being opened: by whom
        self._tiles = None   # decoded tiles of the slides in a bucket (remote_tiles.TileCache)

    def path(self, index: int) -> str:
        x, y = self._xy[index]
        return f'{self.slides[self.slide_index[index]].path}#x={x},y={y}'

    def record(self, index: int) -> PatchRecord:
        s = self.slides[self.slide_index[index]]
        x, y = self._xy[index]
        return PatchRecord(self.path(index), s.slide_id, s.label or None, int(x), int(y))

    def labels(self, indices):
        return [self.slides[s].label or None
                for s in self.slide_index[np.asarray(indices, np.int64)]]

    def coords_attrs(self, slide_id: str) -> dict:
        """A slide's coordinate-file attributes, completed with what CLAM files lack."""
        index = self.slide_ids.tolist().index(slide_id)
        slide = self.slides[index]
        attrs = dict(slide.coords.attrs, slide_path=storage.resolve(os.getcwd(), slide.path))
        if 'patch_size_level0' not in attrs or 'level0_width' not in attrs:
            opened = self._handle(index)
            attrs.setdefault('patch_size_level0', self._patch_sizes(index, opened)[0])
            attrs.setdefault('level0_width', opened.dimensions[0])
            attrs.setdefault('level0_height', opened.dimensions[1])
        return attrs

    def _handle(self, s: int) -> reader.Slide:
        """Slide s's open handle; opened outside the source's lock (a slide in a bucket takes
        two requests to open), once, by the first thread that asks."""
        with self._lock:
            opened = self._open_handle(s)
            if opened is not None:
                return opened
            opening = self._opening.setdefault(s, threading.Lock())
        with opening:
            with self._lock:
                opened = self._open_handle(s)   # opened meanwhile by another thread
                if opened is not None:
                    return opened
                if self._cache is None:
                    import openslide

                    from clusiam_jax.slides import remote_tiles
                    self._cache = openslide.OpenSlideCache(reader.TILE_CACHE_BYTES)
                    self._tiles = remote_tiles.TileCache(REMOTE_TILES)
            try:
                opened = self._open(s)
                with self._lock:
                    self._handles[s] = opened
                    while len(self._handles) > self.open_slides:
                        self._handles.popitem(last=False)
                return opened
            finally:
                with self._lock:
                    self._opening.pop(s, None)

    def _open_handle(self, s: int):
        """(under the lock) slide s's handle if open, else None; its error if it is bad."""
        if s in self._bad:
            raise _slide_error(self.slides[s].path, self._bad[s])
        opened = self._handles.get(s)
        if opened is not None:
            self._handles.move_to_end(s)
        return opened

    def _open(self, s: int) -> reader.Slide:
        path = self.slides[s].path
        try:
            opened = (slide_cache.open_remote_slide(path, self.slides[s].index, self.slide_cache,
                                                    self._cache, self._tiles)
                      if storage.is_url(path) else reader.open_slide(path, cache=self._cache))
        except DataError as e:   # in a bucket: the slide's own, not the credentials'
            if storage.is_url(path) and not isinstance(e, (reader.SlideError,
                                                           storage.Unreadable)):
                raise
            with self._lock:
                self._bad[s] = str(e).split(': ', 1)[-1]
            raise _slide_error(path, self._bad[s]) from None
        outside = self._outside(s, opened.dimensions)
        if outside:
            opened.close()
            with self._lock:
                self._bad[s] = outside
            raise _slide_error(path, outside)
        return opened

    def _outside(self, s: int, dimensions) -> str:
        """Why slide s's patches do not fit it (a slide replaced), or ''."""
        xy = self._xy[self._starts[s]:self._starts[s + 1]]
        width, height = dimensions
        bad = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= width) | (xy[:, 1] >= height)
        if not bad.any():
            return ''
        return (f'{int(bad.sum())} of {len(xy)} patch coordinates start outside the slide '
                f'({width} x {height} px at level 0), e.g. {tuple(xy[bad.argmax()].tolist())}: '
                f'its coordinate file is not of this slide')

    def _patch_sizes(self, s: int, opened=None) -> tuple:
        """(level-0 side, output side) of slide s's tiled patches; opens the slide only when
        its file does not say (CLAM without `downsample`)."""
        if s not in self._sizes:
            c = self.slides[s].coords
            size0, out = c.patch_size_level0, c.patch_size
            if c.patch_level is not None:  # CLAM without `downsample`: from the slide
                opened = opened if opened is not None else self._handle(s)
                size0 = out * opened.levels[c.patch_level].downsample
            self._sizes[s] = (float(size0), int(out))
        return self._sizes[s]

    def grid_region(self, index: int) -> Region:
        """The region load(index) reads: the tiled patch, at the tiling's resolution."""
        s = int(self.slide_index[index])
        size0, out = self._patch_sizes(s)
        x, y = self._xy[index]
        return s, int(x), int(y), size0, out

    @property
    def remote(self) -> bool:
        """Whether any slide is read from a bucket (where read-ahead pays)."""
        return any(storage.is_url(s.path) for s in self.slides)

    def prefetch(self, indices) -> None:
        """Starts reading, in background threads, the tiles of these patches that are in a
        bucket, so that load() finds them cached or under way. Only when it pays: slides at
        URLs; each index once until it is loaded. Errors are left to load(), which reads
        again and reports."""
        remote = [int(i) for i in indices
                  if storage.is_url(self.slides[self.slide_index[int(i)]].path)]
        regions = []
        for i in remote:
            try:
                regions.append(self.grid_region(i))
            except Exception as e:  # a slide that does not open: load() reports it
                logger.debug('prefetch of %s skipped: %s', self.path(i), e)
        self.prefetch_regions(regions)

    def prefetch_regions(self, regions) -> None:
        """prefetch() of regions (read(*region) reads them): each once until it is read."""
        with self._lock:
            fresh = [r for r in regions if r not in self._asked
                     and storage.is_url(self.slides[r[0]].path)]
            fresh = list(dict.fromkeys(fresh))[:max(0, _PREFETCH_QUEUED - self._queued)]
            self._queued += len(fresh)
            for r in fresh:
                self._asked[r] = None
            while len(self._asked) > _PREFETCH_REMEMBERED:
                self._asked.popitem(last=False)
            if fresh and self._pool is None:
                self._pool = DaemonPool(PREFETCH_THREADS, 'slide-prefetch')
                # A source dropped without close() stops its idle threads at once.
                weakref.finalize(self, self._pool.shutdown)
            pool = self._pool
        for r in fresh:
            if not pool.submit(self._warm, r):
                with self._lock:
                    self._queued -= 1

    def close(self) -> None:
        """Stops the read-ahead without waiting for a read under way (queued ones are
        dropped); the source stays usable (a later prefetch starts new threads)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            dropped = pool.shutdown(wait=False)
            with self._lock:
                self._queued -= dropped
                self._asked.clear()

    def _warm(self, region: Region) -> None:
        """Opens the slide and reads the tiles read(*region) reads by byte ranges into the
        tile cache, or stages the slide whole into the slide cache when the read needs that."""
        try:
            s, x, y, size0, out = region
            opened = self._handle(s)
            level = opened.best_level(size0 / out)
            backend = opened.levels[level].backend
            if hasattr(backend, 'read_regions'):
                side = max(1, int(round(size0 / opened.levels[level].downsample)))
                backend.read_regions([(level, int(x), int(y), side, side)])
            elif isinstance(opened, reader.RemoteSlide):   # a level only the staged copy has
                opened.staged()
        except Exception as e:  # the read meets it again, and reports it there
            logger.debug('prefetch of %s failed: %s', self.slides[region[0]].path, e)
        finally:
            with self._lock:
                self._queued -= 1

    def load(self, index: int) -> np.ndarray:
        return self.read(*self.grid_region(index))

    def read(self, s: int, x: int, y: int, size0: float, out: int) -> np.ndarray:
        """uint8 [out, out, 3]: slide s's level-0 square at (x, y) of side size0 (pixels
        outside the slide white); BadImageError when the slide or the region is unreadable."""
        if self._asked:
            with self._lock:
                self._asked.pop((s, x, y, size0, out), None)
        opened = self._handle(s)
        try:
            return reader.read_patch(opened, x, y, size0, out)
        except Exception as e:
            import openslide
            if not isinstance(e, (openslide.OpenSlideError, OSError, ValueError)) or (
                    isinstance(e, DataError)
                    and not isinstance(e, (storage.Unreadable, reader.SlideError))):
                raise   # a plain DataError: the bucket refused us (credentials): end the run
            # OpenSlideError leaves the handle unusable (reopen later); a ValueError: one tile
            # (storage.Unreadable: a bucket read that failed after its retries; SlideError: a
            # slide staged on first need that could not be).
            if not isinstance(e, ValueError):
                with self._lock:
                    if self._handles.get(s) is opened:
                        del self._handles[s]
            why = ' '.join(str(e).split())
            where = f'{self.slides[s].path}#x={x},y={y}'
            if (size0, out) != self._sizes.get(s, (size0, out)):   # not the tiling's size
                where += f',size0={size0:g}'
            raise image_io.BadImageError(f'{where}: region unreadable ({why})') from None


def _slide_error(path: str, reason: str) -> image_io.BadImageError:
    return image_io.BadImageError(f'{path}: {reason}', subject=path)


def _has_h5(folder: str) -> bool:
    return any(n.endswith('.h5') for n in os.listdir(folder))


def _patches_folder(path: str):
    """The folder of coordinate files of a slide layout at `path`, or None."""
    if not os.path.isdir(path):
        return None
    inner = os.path.join(path, coords_lib.PATCHES_DIR)
    if os.path.isdir(inner) and (slides_csv.has_table(path) or _has_h5(inner)):
        return inner
    if os.path.basename(os.path.normpath(path)) == coords_lib.PATCHES_DIR and _has_h5(path):
        return path
    return None


def is_slide_source(path: str) -> bool:
    if storage.is_url(path):   # a tiling in a bucket (CLAM folders are read from disk)
        return slides_csv.has_table(path)
    return _patches_folder(path) is not None


def _index_slides(slide_dir: str) -> Dict[str, str]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(slide_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        for name in sorted(filenames):
            if name.lower().endswith(reader.SLIDE_EXTENSIONS) and not name.startswith('.'):
                found.setdefault(reader.slide_id_of(name), os.path.join(dirpath, name))
    return found


def _usable(coord_file: str, slide_id: str, left_out: List[str]):
    try:
        return coords_lib.read_coords(coord_file)
    except DataError as e:
        left_out.append(str(e))
        logger.warning('slide %r left out: %s', slide_id, e)
        return None


def _tiling_slides(path: str, slide_dir: str, left_out: List[str]) -> List[SlidePatches]:
    """The tiled slides of slides.csv, looked up by id in `slide_dir` when given."""
    moved = _index_slides(slide_dir) if slide_dir else None
    out = []
    for row in slides_csv.tiled_rows(path):
        try:   # a hand-edited slides.csv may hold an id that leads out of `path`
            coord_file = coords_lib.trident_file(path, row['slide_id'])
        except DataError as e:
            left_out.append(str(e))
            logger.warning('slide %r left out: %s', row['slide_id'], e)
            continue
        if not storage.exists(coord_file):
            raise DataError(f'{path}: slides.csv lists {row["slide_id"]} as tiled but '
                            f'{coord_file} is missing (tile again: --mode tile)')
        slide_path = row['path']
        if moved is not None:
            if row['slide_id'] not in moved:
                raise DataError(f'slide {row["slide_id"]} of {path} is not in data.slide_dir '
                                f'{slide_dir} (looked for it at any depth)')
            slide_path = moved[row['slide_id']]
        coords = _usable(coord_file, row['slide_id'], left_out)
        if coords is not None:
            index = (tile_index.index_file(path, row['slide_id'])
                     if storage.is_url(slide_path) else '')
            out.append(SlidePatches(row['slide_id'], slide_path, row['label'], coords, index,
                                    coord_file))
    return out


def _patch_folder_slides(path: str, folder: str, slide_dir: str,
                         left_out: List[str]) -> List[SlidePatches]:
    """Slides of a patches/ folder: by id in `slide_dir`, else at the recorded `slide_path`."""
    paths = coords_lib.list_coord_files(folder)
    files = {s: _usable(p, s, left_out) for s, p in paths.items()}
    files = {s: c for s, c in files.items() if c is not None}
    if not files:
        return []
    if slide_dir:
        on_disk = _index_slides(slide_dir)
    else:
        on_disk = {s: c.attrs['slide_path'] for s, c in files.items() if 'slide_path' in c.attrs}
        if len(on_disk) < len(files):
            raise DataError(f'{path} is a CLAM/TRIDENT patch folder ({len(files)} coordinate '
                            f'files): say where its slides are with data.slide_dir=DIR '
                            f'(export: export.slide_dir)')
    missing = [s for s in files if s not in on_disk]
    if len(missing) == len(files):
        raise DataError(f'none of the {len(files)} slides of {path} is in {slide_dir} '
                        f'(looked for {missing[0]}.<slide extension> at any depth)')
    if missing:
        logger.warning('%d of %d slides of %s are not in %s and are left out: %s%s',
                       len(missing), len(files), path, slide_dir, ', '.join(missing[:5]),
                       ' ...' if len(missing) > 5 else '')
    return [SlidePatches(s, on_disk[s], '', c, coord_file=paths[s])
            for s, c in files.items() if s in on_disk]


def open_slide_source(path: str, slide_dir: str = '', open_slides: int = 512,
                      cache_dir: str = '', cache_gb: float = slide_cache.DEFAULT_CACHE_GB
                      ) -> SlideSource:
    if slide_dir and not os.path.isdir(slide_dir):
        raise DataError(f'slide folder not found: {slide_dir}')
    left_out: List[str] = []
    if slides_csv.has_table(path):
        slides = _tiling_slides(path, slide_dir, left_out)
    else:
        slides = _patch_folder_slides(path, _patches_folder(path), slide_dir, left_out)
    slides = [s for s in slides if len(s.coords.coords)]
    if not slides:
        why = (f' ({len(left_out)} coordinate files left out; the first: {left_out[0]})'
               if left_out else '')
        raise DataError(f'{path}: no slide has usable patch coordinates{why}')
    return SlideSource(slides, open_slides, cache_dir, cache_gb)
