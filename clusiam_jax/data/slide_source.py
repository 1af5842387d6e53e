"""Training and export straight from whole slides: a random-access source over
(slide, x, y), with the slides opened lazily in each process.

Three layouts are read (docs/formats.md):
  * our tiling (`--mode tile`): `<dir>/slides.csv` + `<dir>/patches/<id>_patches.h5`; the
    slides are where slides.csv says;
  * TRIDENT's and CLAM's patch folders: `<dir>/patches/*.h5` (or the `patches` folder
    itself), with `data.slide_dir` saying where the slides are (found by slide id, at any
    depth).

Each patch is read from the pyramid level closest to (not coarser than) its resolution
and area-resized to its patch size (slides/reader.py), so slides scanned at 40x and 20x
give the same physical patches. Handles are never opened before a worker process forks
(the source pickles without them); each process keeps at most `open_slides` of them in
an LRU, each with a bounded OpenSlide tile cache, so memory stays flat over thousands of
slides. A slide that vanished or cannot be read, or a region that fails to decode, is a
BadImageError: the pipeline skips it and lists it (the slide once, not every patch).
Coordinate files are checked (slides/coords.py): a damaged one, or a slide id that
names no file of its folder, leaves its slide out with one warning line saying why; a
slide whose coordinates fall outside it (known once it is opened) is a bad slide.
"""
import collections
import collections.abc
import csv
import dataclasses
import logging
import os
import threading
from typing import Dict, List, Optional

import numpy as np

from clusiam_jax.data import image_io
from clusiam_jax.data import records as records_lib
from clusiam_jax.errors import DataError
from clusiam_jax.slides import coords as coords_lib
from clusiam_jax.slides import reader
from clusiam_jax.slides.tiles import TiffTiles

logger = logging.getLogger(__name__)

SLIDES_CSV = 'slides.csv'   # slides/tiling.py writes it


@dataclasses.dataclass(frozen=True)
class SlidePatches:
    """One slide of a slide source."""
    slide_id: str
    path: str                  # the slide file
    label: str
    coords: coords_lib.SlideCoords


class SlideSource:
    """Patches of whole slides, index -> uint8 [S, S, 3] (S: the slide's patch size)."""

    def __init__(self, slides: List[SlidePatches], open_slides: int = 512,
                 fast_tiles: bool = True):
        self.slides = [dataclasses.replace(s, coords=dataclasses.replace(s.coords,
                                                                         coords=None))
                       for s in slides]
        counts = [len(s.coords.coords) for s in slides]
        self._slide_of = np.repeat(np.arange(len(slides), dtype=np.int32), counts)
        self._xy = (np.concatenate([s.coords.coords for s in slides]).astype(np.int64)
                    if slides else np.zeros((0, 2), np.int64))
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.open_slides = int(open_slides)
        self.fast_tiles = fast_tiles   # False: every read through OpenSlide (benchmarks)
        self._reset()

    def _reset(self):
        """The per-process state: never pickled (handles must not cross a fork)."""
        self._handles = collections.OrderedDict()
        self._bad: Dict[int, str] = {}
        self._sizes: Dict[int, tuple] = {}
        # The export reads with several threads: the table and eviction are locked. An
        # evicted or failed handle is only dropped, never closed here: a thread may be
        # reading from it, and OpenSlide closes it when the last reference goes.
        self._lock = threading.Lock()
        self._cache = None   # one tile cache for all the handles of this process

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ('_handles', '_bad', '_sizes', '_lock', '_cache'):
            state.pop(key)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def __len__(self) -> int:
        return len(self._slide_of)

    @property
    def slide_index(self) -> np.ndarray:
        """int32 [N]: the slide of each patch (for slide-balanced sampling)."""
        return self._slide_of

    def path(self, index: int) -> str:
        s = self.slides[self._slide_of[index]]
        x, y = self._xy[index]
        return f'{s.path}#x={x},y={y}'

    def record(self, index: int) -> records_lib.PatchRecord:
        s = self.slides[self._slide_of[index]]
        x, y = self._xy[index]
        return records_lib.PatchRecord(path=self.path(index), slide_id=s.slide_id,
                                       label=s.label or None, x=int(x), y=int(y))

    def records(self) -> 'SlideRecords':
        return SlideRecords(self, np.arange(len(self), dtype=np.int64))

    def coords_attrs(self, slide_id: str) -> dict:
        """The coordinate file's attributes of a slide (copied into its export file), with
        `patch_size_level0` and the level-0 size always present (CLAM files lack them),
        and the slide's path."""
        index = [s.slide_id for s in self.slides].index(slide_id)
        slide = self.slides[index]
        attrs = dict(slide.coords.attrs, slide_path=os.path.abspath(slide.path))
        if 'patch_size_level0' not in attrs or 'level0_width' not in attrs:
            handle = self._handle(index)
            attrs.setdefault('patch_size_level0', self._patch_sizes(index, handle)[0])
            attrs.setdefault('level0_width', handle.slide.dimensions[0])
            attrs.setdefault('level0_height', handle.slide.dimensions[1])
        return attrs

    # ------------------------------------------------------------ reading

    def _handle(self, s: int):
        with self._lock:
            if s in self._bad:
                raise _slide_error(self.slides[s].path, self._bad[s])
            handle = self._handles.get(s)
            if handle is not None:
                self._handles.move_to_end(s)
                return handle
            if self._cache is None:
                import openslide
                self._cache = openslide.OpenSlideCache(reader.TILE_CACHE_BYTES)
            path = self.slides[s].path
            try:
                slide = reader.open_slide(path, cache=self._cache)
            except DataError as e:
                self._bad[s] = str(e).split(': ', 1)[-1]
                raise _slide_error(path, self._bad[s]) from None
            outside = self._outside(s, slide.dimensions)
            if outside:
                slide.close()
                self._bad[s] = outside
                raise _slide_error(path, outside)
            handle = _Open(slide, TiffTiles.open(path, slide) if self.fast_tiles else None)
            self._handles[s] = handle
            while len(self._handles) > self.open_slides:
                self._handles.popitem(last=False)
            return handle

    def _outside(self, s: int, dimensions) -> str:
        """Why slide s's patches do not fit the slide (some start outside it), or ''.
        Only here is a CLAM file's slide size known; a slide moved or replaced since
        tiling is caught here too."""
        xy = self._xy[self._starts[s]:self._starts[s + 1]]
        width, height = dimensions
        bad = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= width) | (xy[:, 1] >= height)
        if not bad.any():
            return ''
        return (f'{int(bad.sum())} of {len(xy)} patch coordinates start outside the slide '
                f'({width} x {height} px at level 0), e.g. {tuple(xy[bad.argmax()].tolist())}: '
                f'its coordinate file is not of this slide')

    def _patch_sizes(self, s: int, handle) -> tuple:
        """(level-0 side, output side) of slide s's patches."""
        if s not in self._sizes:
            c = self.slides[s].coords
            size0, out = c.patch_size_level0, c.patch_size
            if c.patch_level is not None:  # CLAM without `downsample`: from the slide
                size0 = out * handle.slide.level_downsamples[c.patch_level]
            self._sizes[s] = (float(size0), int(out))
        return self._sizes[s]

    def load(self, index: int) -> np.ndarray:
        """HxWx3 uint8 RGB; BadImageError when the slide or the region is unreadable."""
        s = int(self._slide_of[index])
        handle = self._handle(s)
        size0, out = self._patch_sizes(s, handle)
        x, y = self._xy[index]
        try:
            return reader.read_patch(handle.slide, x, y, size0, out, handle.tiles)
        except Exception as e:
            import openslide
            if not isinstance(e, (openslide.OpenSlideError, OSError, ValueError)):
                raise
            # OpenSlideError leaves the handle unusable and a failed read may be the file:
            # reopen later. A tile that does not decode (ValueError) is that tile alone.
            if not isinstance(e, ValueError):
                with self._lock:
                    if self._handles.get(s) is handle:
                        del self._handles[s]
            raise image_io.BadImageError(
                f'{self.path(index)}: region unreadable ({" ".join(str(e).split())})') \
                from None


@dataclasses.dataclass(frozen=True)
class _Open:
    """An open slide: its OpenSlide handle and, for TIFF-based slides, the faster tile
    reader of the levels it covers (slides/tiles.py)."""
    slide: object
    tiles: Optional[TiffTiles]


class SlideRecords(collections.abc.Sequence):
    """The PatchRecords of a slide source (or of some of its patches), made on access: a
    list would hold an object and a path string per patch, gigabytes at the tens of
    millions of patches of a cohort, in every process that opens the source; this holds
    one index per patch (records.take, slide_codes and labels_of serve subsets, slide
    grouping and labels without making any record)."""

    def __init__(self, source: SlideSource, indices: np.ndarray):
        self._source, self._indices = source, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._source.record(int(self._indices[i]))

    def take(self, indices) -> 'SlideRecords':
        return SlideRecords(self._source, self._indices[np.asarray(indices, np.int64)])

    def slide_codes(self):
        """As records.slide_codes, from the source's slide index."""
        ids = np.array([s.slide_id for s in self._source.slides], dtype=str)
        names, of_slide = np.unique(ids, return_inverse=True)
        codes = of_slide.reshape(-1)[self._source.slide_index[self._indices]]
        used = np.unique(codes)
        return names[used], np.searchsorted(used, codes)

    def labels_of(self, indices):
        slides = self._source.slide_index[self._indices[np.asarray(indices, np.int64)]]
        return [self._source.slides[s].label or None for s in slides]


def _slide_error(path: str, reason: str) -> image_io.BadImageError:
    error = image_io.BadImageError(f'{path}: {reason}')
    error.subject = path   # the skip list names the slide once, not each of its patches
    return error


# -------------------------------------------------------------------- discovery

def _has_h5(folder: str) -> bool:
    return any(n.endswith('.h5') for n in os.listdir(folder))


def _patches_folder(path: str) -> Optional[str]:
    """The folder of coordinate files of a slide layout at `path` (see module), or None."""
    if not os.path.isdir(path):
        return None
    inner = os.path.join(path, coords_lib.PATCHES_DIR)
    if os.path.isdir(inner) and (os.path.isfile(os.path.join(path, SLIDES_CSV))
                                 or _has_h5(inner)):
        return inner
    if os.path.basename(os.path.normpath(path)) == coords_lib.PATCHES_DIR and _has_h5(path):
        return path
    return None


def is_slide_source(path: str) -> bool:
    """Our tiling output, or a CLAM/TRIDENT patch folder."""
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
    """The SlideCoords of a coordinate file, or None, with why in `left_out` and the log
    (a damaged or foreign file, an id that names no file: that slide only is left out)."""
    try:
        return coords_lib.read_coords(coord_file)
    except DataError as e:
        left_out.append(str(e))
        logger.warning('slide %r left out: %s', slide_id, e)
        return None


def _tiling_slides(path: str, slide_dir: str, left_out: List[str]) -> List[SlidePatches]:
    """The tiled slides of slides.csv; with `slide_dir` (slides moved since tiling) each
    is looked up there by slide id instead of at its recorded path."""
    with open(os.path.join(path, SLIDES_CSV), newline='', encoding='utf-8-sig') as f:
        rows = [r for r in csv.DictReader(f) if r.get('status') == 'tiled']
    if not rows:
        raise DataError(f'{path}: slides.csv lists no tiled slide (see its status and '
                        f'reason columns)')
    moved = _index_slides(slide_dir) if slide_dir else None
    out = []
    for row in rows:
        try:   # a hand-edited slides.csv may hold an id that leads out of `path`
            coord_file = coords_lib.trident_file(path, row['slide_id'])
        except DataError as e:
            left_out.append(str(e))
            logger.warning('slide %r left out: %s', row['slide_id'], e)
            continue
        if not os.path.exists(coord_file):
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
            out.append(SlidePatches(row['slide_id'], slide_path, row.get('label') or '',
                                    coords))
    return out


def _patch_folder_slides(path: str, folder: str, slide_dir: str,
                         left_out: List[str]) -> List[SlidePatches]:
    """Slides of a patches/ folder: found in `slide_dir` by id, else where the file says
    (`slide_path`, which our tiling records; CLAM and TRIDENT files record none)."""
    files = {s: _usable(p, s, left_out) for s, p in coords_lib.list_coord_files(folder).items()}
    files = {s: c for s, c in files.items() if c is not None}
    if not files:
        return []
    if slide_dir:
        if not os.path.isdir(slide_dir):
            raise DataError(f'slide folder not found: {slide_dir}')
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
    return [SlidePatches(s, on_disk[s], '', c) for s, c in files.items() if s in on_disk]


def open_slide_source(path: str, slide_dir: str = '', open_slides: int = 512):
    """(records, SlideSource) of a tiling output or a CLAM/TRIDENT patch folder."""
    folder = _patches_folder(path)
    if slide_dir and not os.path.isdir(slide_dir):
        raise DataError(f'slide folder not found: {slide_dir}')
    left_out: List[str] = []
    if os.path.isfile(os.path.join(path, SLIDES_CSV)):
        slides = _tiling_slides(path, slide_dir, left_out)
    else:
        slides = _patch_folder_slides(path, folder, slide_dir, left_out)
    slides = [s for s in slides if len(s.coords.coords)]
    if not slides:
        why = (f' ({len(left_out)} coordinate files left out; the first: {left_out[0]})'
               if left_out else '')
        raise DataError(f'{path}: no slide has usable patch coordinates{why}')
    source = SlideSource(slides, open_slides)
    return source.records(), source
