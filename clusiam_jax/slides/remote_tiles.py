"""The remote backend of TIFF-based slides: a slide's tiles fetched by exact byte ranges, all
a read needs in one batch (a bucket's latency is hidden by concurrency, storage.read_ranges),
from its tile index (tile_index.py) instead of a parsed header, decoded as tifffile decodes
them and placed by TiffTiles' own region code: the same pixels as the local direct reads.
"""
import collections
import concurrent.futures
import itertools
import threading
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from clusiam_jax.slides import tiles as tiles_lib
from clusiam_jax.slides.tile_index import IndexLevel, TileIndex

# Decoded tiles kept per backend: a 224 px patch spans about 3.5 tiles of 256 px, and
# neighbouring patches share tiles. 64 RGB tiles of 256 px are 12 MiB.
CACHED_TILES = 64
# Tiles whose bytes lie at most this far apart in the file come in one ranged request (the
# gap read and dropped): a request costs a whole round trip to the bucket, while 64 KiB of
# gap is a small fraction of one at a bucket's bandwidth (docs/storage.md: costs of a read).
# A 224 px patch's tiles side by side are neighbours in the file.
MERGE_GAP = 64 * 1024

Region = Tuple[int, int, int, int, int]   # (level, x0, y0, w, h), x0 and y0 at level 0
ReadRanges = Callable[[str, Sequence[Tuple[int, int]]], List[bytes]]
_OWNERS = itertools.count()


class TileCache:
    """Decoded tiles, the least recently used dropped first. One per process can serve all
    its remote slides, so memory stays bounded however many slides are open."""

    def __init__(self, max_tiles: int = CACHED_TILES):
        self.max_tiles = int(max_tiles)
        self._tiles = collections.OrderedDict()   # (owner, level, tile) -> decoded tile
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._tiles)

    def get(self, key) -> Optional[np.ndarray]:
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
            return tile

    def put(self, items: dict):
        if self.max_tiles <= 0:
            return
        with self._lock:
            for key, tile in items.items():
                self._tiles[key] = tile
                self._tiles.move_to_end(key)
            while len(self._tiles) > self.max_tiles:
                self._tiles.popitem(last=False)

    def drop(self, owner: int):
        with self._lock:
            for key in [k for k in self._tiles if k[0] == owner]:
                del self._tiles[key]


class RemoteTiles(tiles_lib.TiffTiles):
    """Reads of the indexed levels of the slide at `path` through `read_ranges(path, [(start,
    end), ...]) -> [bytes]` (end exclusive), with an LRU of decoded tiles (`cache`, shared by a
    process's slides, else its own of `cached_tiles`); threads may share it (the slide
    source's handles are shared by its threads)."""

    def __init__(self, index: TileIndex, path: str, read_ranges: ReadRanges,
                 cached_tiles: int = CACHED_TILES, cache: Optional[TileCache] = None):
        # Not TiffTiles.__init__: no file, no header. read() below is TiffTiles'.
        self.index, self.path, self._read_ranges = index, path, read_ranges
        self.levels = dict(index.levels)
        self.width0 = index.width0
        self._number = {id(lv): number for number, lv in self.levels.items()}
        self._cache = cache if cache is not None else TileCache(cached_tiles)
        self._owner = next(_OWNERS)               # this slide's part of the cache's keys
        self._pending = {}                        # (level, tile) -> Future of a fetch under way
        self._lock = threading.Lock()             # guards _pending
        self._local = threading.local()           # .batch: this thread's read's tiles

    def close(self):
        self._cache.drop(self._owner)

    def read(self, level_index: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        return self.read_regions([(level_index, x0, y0, w, h)])[0]

    def read_regions(self, regions: Sequence[Region]) -> List[np.ndarray]:
        """Each region as TiffTiles.read returns it; every tile they need that is neither cached
        nor being fetched by another thread (a prefetch) comes from one read_ranges call."""
        needed, batch, waits = {}, {}, {}
        mine = concurrent.futures.Future()
        with self._lock:
            for level_index, x0, y0, w, h in regions:
                level = self.levels[level_index]
                for tile in _tiles_of(level, self.width0, x0, y0, w, h):
                    key = (level_index, tile)
                    cached = self._cache.get((self._owner, *key))
                    if cached is not None:
                        batch[key] = cached
                    elif key in self._pending:
                        waits[key] = (self._pending[key], level)
                    else:
                        needed[key] = level
                        self._pending[key] = mine
        try:
            fetched = self._fetch(needed)
            mine.set_result(fetched)
        except BaseException as e:
            mine.set_exception(e)
            raise
        finally:
            with self._lock:
                for key in needed:
                    self._pending.pop(key, None)
        batch.update(fetched)
        for key, (future, level) in waits.items():
            try:
                batch[key] = future.result()[key]
            except Exception:   # that fetch failed: this read tries again (and reports it)
                batch.update(self._fetch({key: level}))
        self._local.batch = batch
        try:
            return [super(RemoteTiles, self).read(*region) for region in regions]
        finally:
            self._local.batch = None

    def _fetch(self, needed: dict) -> dict:
        """The tiles `needed` ({(level, tile): IndexLevel}) decoded from one batch of ranges;
        an empty tile (no bytes stored) is decoded from b'' as TiffTiles' pread gives it."""
        keys = [k for k, lv in needed.items() if lv.counts[k[1]] > 0]
        ranges = [(int(needed[k].offsets[k[1]]),
                   int(needed[k].offsets[k[1]] + needed[k].counts[k[1]])) for k in keys]
        spans, where = merged_ranges(ranges, MERGE_GAP)
        got = self._read_ranges(self.path, spans) if spans else []
        if len(got) != len(spans):
            raise ValueError(f'{len(got)} byte ranges read for {len(spans)} asked')
        fetched = {k: got[m][at:at + end - start]
                   for k, (start, end), (m, at) in zip(keys, ranges, where, strict=True)}
        decoded = {key: _decoded(level, key[1], fetched.get(key, b''))
                   for key, level in needed.items()}
        self._cache.put({(self._owner, *key): tile for key, tile in decoded.items()})
        return decoded

    def _tile(self, level: IndexLevel, index: int) -> np.ndarray:
        return self._local.batch[(self._number[id(level)], index)]


def merged_ranges(ranges: Sequence[Tuple[int, int]], gap: int):
    """(spans to read: ranges at most `gap` bytes apart joined (gap < 0: none), for each
    range: (its span, its start within the span's bytes))."""
    spans, where = [], [None] * len(ranges)
    for i in sorted(range(len(ranges)), key=lambda i: ranges[i]):
        start, end = ranges[i]
        if spans and gap >= 0 and start - spans[-1][1] <= gap:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((start, end))
        where[i] = (len(spans) - 1, start - spans[-1][0])
    return spans, where


def _decoded(level: IndexLevel, index: int, data: bytes) -> np.ndarray:
    try:
        tile = level.codec.decode(data, level.tile_h, level.tile_w)
    except Exception as e:  # the codec's own error type: as TiffTiles reports it
        raise ValueError(f'tile {index} does not decode '
                         f'({type(e).__name__}: {" ".join(str(e).split())})') from None
    tile.flags.writeable = False   # shared by the cache
    return tile


def _tiles_of(level, width0: int, x0: int, y0: int, w: int, h: int) -> List[int]:
    """The tiles TiffTiles.read decodes for this region (its own placement arithmetic)."""
    ds = width0 / level.width
    x, y = int(round(x0 / ds)), int(round(y0 / ds))
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, level.width), min(y + h, level.height)
    if x0 >= x1 or y0 >= y1:
        return []
    return [ty * level.tiles_across + tx
            for ty in range(y0 // level.tile_h, (y1 - 1) // level.tile_h + 1)
            for tx in range(x0 // level.tile_w, (x1 - 1) // level.tile_w + 1)]
