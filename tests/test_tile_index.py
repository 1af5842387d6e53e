"""The tile index and the remote tile backend (issue 25): a slide's tiles read from exact byte
ranges, one batch per read, from an index written once, give the pixels of the local direct
reads (TiffTiles) bit for bit, and of tifffile's own decode of the whole level.

The references: TiffTiles over every level of a synthetic pyramid (JPEG YCbCr, JPEG RGB as
Aperio writes it, zlib with and without a predictor, an OME-TIFF's SubIFD levels), tifffile's
`asarray` of the level, and the shared real slides (JPEG, JPEG 2000) through OpenSlide.
"""
import concurrent.futures
import io
import os

import numpy as np
import pytest
import tifffile
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.spec import AbstractBufferedFile

from clusiam_jax import storage
from clusiam_jax.errors import DataError
from clusiam_jax.slides import reader, remote_tiles, tile_index, tiles
from tests.helpers import REPO, _halvings, synthetic_tissue, write_ome_pyramid

SLIDES = os.path.join(REPO, '..', 'shared', 'data', 'slides')
CMU = os.path.join(SLIDES, 'cmu-1-small-region.svs')
TCGA = os.path.join(SLIDES, 'tcga-cr-7395-01a-01-ts1.svs')
needs_shared = pytest.mark.skipif(not os.path.isfile(CMU),
                                  reason='../shared/data/slides is absent')

TILE = 128
CODECS = {
    'jpeg_ycbcr': dict(compression='jpeg', photometric='ycbcr'),
    'jpeg_rgb': dict(compression='jpeg', photometric='rgb', subsampling=(1, 1),   # as Aperio
                     compressionargs={'level': 90, 'outcolorspace': 'rgb'}),
    'jpeg2000': dict(compression='jpeg2000', photometric='rgb'),   # a whole-image codec
    'zlib': dict(compression='zlib', photometric='rgb'),
    'zlib_predictor': dict(compression='zlib', predictor=True, photometric='rgb'),
}


def _base():
    """1000 x 700 px: edge tiles are partial on every level (1000 = 7.8 tiles)."""
    return synthetic_tissue(700, 1000, [(300, 300, 200), (750, 420, 230)], seed=3)


def _write(path, codec):
    with tifffile.TiffWriter(path) as tw:
        for k, level in enumerate(_halvings(_base(), 100)):
            res = 1e4 / (0.25 * 2 ** k)
            tw.write(level, tile=(TILE, TILE), resolution=(res, res),
                     resolutionunit='CENTIMETER', subfiletype=0 if k == 0 else 1,
                     **CODECS[codec])
    return path


@pytest.fixture(scope='module')
def pyramids(tmp_path_factory):
    root = tmp_path_factory.mktemp('pyramids')
    return {codec: _write(str(root / f'{codec}.tif'), codec) for codec in CODECS}


@pytest.fixture(autouse=True)
def _tile_by_tile(monkeypatch):
    """One range per tile (the index's own ranges); neighbours joined into one request:
    tests/test_read_ahead.py."""
    monkeypatch.setattr(remote_tiles, 'MERGE_GAP', -1)


class Counting:
    """read_ranges over a local file, recording each call's ranges."""

    def __init__(self):
        self.calls = []

    def __call__(self, path, ranges):
        self.calls.append(list(ranges))
        return storage.read_ranges(path, ranges)


def _index(path, **kwargs):
    with open(path, 'rb') as f:
        return tile_index.build(f, name=path, **kwargs)


def _direct(path):
    """TiffTiles over every level of tifffile's first series (OpenSlide's check aside: the
    reference here is its read code, which the remote backend must match)."""
    tiff = tifffile.TiffFile(path)
    levels = {k: tiles._level_from_page(lv.keyframe)
              for k, lv in enumerate(tiff.series[0].levels)}
    return tiles.TiffTiles(tiff, levels, levels[0].width)


def _regions(level, width0):
    """(x0, y0, w, h) at level 0 of regions on the level: inside one tile, across tile
    corners, over the right and bottom edges, before the origin, outside, one pixel."""
    ds = width0 / level.width
    w, h, t = level.width, level.height, TILE
    on_level = [(5, 7, 40, 30), (t - 10, t - 20, 50, 60), (t, t, t, t), (t - 1, 0, 2 * t + 3, 70),
                (w - 30, h - 25, 64, 64), (w - 100, 10, 150, 2 * t), (-20, -15, 60, 50),
                (w + 5, 0, 30, 30), (w // 2, h // 2, 1, 1), (0, 0, w, h)]
    return [(int(round(x * ds)), int(round(y * ds)), rw, rh) for x, y, rw, rh in on_level]


def _level_pixels(path, number):
    return tifffile.TiffFile(path).series[0].levels[number].asarray()


def _crop(pixels, x, y, w, h):
    """The region of a whole level, white outside it (as OpenSlide over white)."""
    out = np.full((h, w, 3), 255, np.uint8)
    ys, xs = slice(max(y, 0), min(y + h, pixels.shape[0])), slice(max(x, 0),
                                                                   min(x + w, pixels.shape[1]))
    if ys.start < ys.stop and xs.start < xs.stop:
        out[ys.start - y:ys.stop - y, xs.start - x:xs.stop - x] = pixels[ys, xs]
    return out


def _tile_ranges(level):
    return {(int(o), int(o + c)) for o, c in zip(level.offsets, level.counts)}


# ------------------------------------------------------------------ bit-equal reads

@pytest.mark.parametrize('codec', sorted(CODECS))
def test_remote_reads_equal_the_direct_reads_on_every_level(pyramids, codec):
    path = pyramids[codec]
    index = tile_index.TileIndex.from_bytes(_index(path).to_bytes(), os.path.getsize(path))
    direct = _direct(path)
    assert sorted(index.levels) == sorted(direct.levels) == [0, 1, 2]
    counting = Counting()
    remote = remote_tiles.RemoteTiles(index, path, counting, cached_tiles=0)
    for number, level in index.levels.items():
        pixels = _level_pixels(path, number)
        ds = index.width0 / level.width
        for x0, y0, w, h in _regions(level, index.width0):
            before = len(counting.calls)
            got = remote.read(number, x0, y0, w, h)
            np.testing.assert_array_equal(got, direct.read(number, x0, y0, w, h))
            x, y = int(round(x0 / ds)), int(round(y0 / ds))
            np.testing.assert_array_equal(got, _crop(pixels, x, y, w, h))
            # One call, one range per tile the region touches, each a whole tile.
            across = range(max(x, 0) // TILE, (min(x + w, level.width) - 1) // TILE + 1)
            down = range(max(y, 0) // TILE, (min(y + h, level.height) - 1) // TILE + 1)
            inside = max(x, 0) < min(x + w, level.width) and max(y, 0) < min(y + h, level.height)
            touched = len(across) * len(down) if inside else 0
            assert len(counting.calls) - before == (1 if touched else 0)
            if touched:
                ranges = counting.calls[-1]
                assert len(ranges) == len(set(ranges)) == touched
                assert set(ranges) <= _tile_ranges(level)
    direct.close()


def test_ome_subifd_levels_are_numbered_as_the_slide_numbers_them(tmp_path):
    path = write_ome_pyramid(str(tmp_path / 'field.ome.tif'), _base(), 0.25, tile=TILE,
                             min_side=100)
    remote = remote_tiles.RemoteTiles(_index(path), path, Counting(), cached_tiles=0)
    with reader.open_slide(path) as slide:
        assert slide.listed == 1 and len(slide.levels) == len(remote.levels) == 3
        for number, level in enumerate(slide.levels):
            assert level.backend is slide.tiles   # OpenSlide lists level 0; the rest hidden
            for x0, y0, w, h in _regions(remote.levels[number], remote.width0)[:6]:
                np.testing.assert_array_equal(remote.read(number, x0, y0, w, h),
                                              slide.read(number, x0, y0, w, h))


def test_a_batch_of_regions_is_one_call_without_repeated_tiles(pyramids):
    path = pyramids['jpeg_ycbcr']
    counting = Counting()
    remote = remote_tiles.RemoteTiles(_index(path), path, counting, cached_tiles=0)
    direct = _direct(path)
    regions = [(0, 100, 100, 224, 224), (0, 110, 120, 224, 224), (1, 0, 0, 300, 200),
               (0, 5000, 0, 10, 10)]
    got = remote.read_regions(regions)
    assert len(counting.calls) == 1
    ranges = counting.calls[0]
    assert len(ranges) == len(set(ranges)) == 9 + 6   # level 0: 3 x 3; level 1: 3 x 2
    for region, pixels in zip(regions, got):
        np.testing.assert_array_equal(pixels, direct.read(*region))
    direct.close()


def test_decoded_tiles_are_cached_by_count(pyramids):
    path = pyramids['zlib']
    counting = Counting()
    remote = remote_tiles.RemoteTiles(_index(path), path, counting, cached_tiles=4)
    first = remote.read(0, 100, 100, 64, 64)                # 4 tiles
    assert remote.read(0, 100, 100, 64, 64).tobytes() == first.tobytes()
    assert len(counting.calls) == 1                         # all 4 from the cache
    remote.read(0, 0, 0, 10, 10)                            # a cached tile: no call
    assert len(counting.calls) == 1
    remote.read(0, 600, 400, 10, 10)                        # a new tile evicts tile 1,
    assert len(counting.calls) == 2 and len(remote._cache) == 4   # the least recently used
    remote.read(0, 100, 100, 64, 64)
    level = remote.levels[0]
    assert counting.calls[-1] == [(int(level.offsets[1]), int(level.offsets[1] + level.counts[1]))]


def test_threads_sharing_a_backend_read_their_own_regions(pyramids):
    path = pyramids['jpeg_ycbcr']
    remote = remote_tiles.RemoteTiles(_index(path), path, storage.read_ranges, cached_tiles=6)
    direct = _direct(path)
    regions = [(0, x, y, 150, 100) for x in range(0, 900, 70) for y in range(0, 650, 90)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda r: remote.read(*r), regions * 3))
    for region, pixels in zip(regions * 3, got):
        np.testing.assert_array_equal(pixels, direct.read(*region))
    direct.close()


def test_a_damaged_tile_fails_as_the_direct_read_fails(pyramids):
    path = pyramids['jpeg_rgb']
    remote = remote_tiles.RemoteTiles(_index(path), path,
                                      lambda p, ranges: [b'\xff\xd8junk'] * len(ranges))
    with pytest.raises(ValueError, match='tile 0 does not decode'):
        remote.read(0, 0, 0, 10, 10)


# ------------------------------------------------------------------ over fsspec

class RangeFile(AbstractBufferedFile):
    """An fsspec file over bytes, each block fetch one counted GET (as s3fs's S3File)."""

    def __init__(self, data, gets, **kwargs):
        self.data, self.gets = data, gets
        super().__init__(MemoryFileSystem(), 'slide', size=len(data), **kwargs)

    def _fetch_range(self, start, end):
        self.gets.append((start, end))
        return self.data[start:end]


def test_index_built_over_small_read_ahead_blocks_and_read_from_memory_fs(pyramids):
    path = pyramids['jpeg_ycbcr']
    with open(path, 'rb') as f:
        data = f.read()
    gets = []
    with RangeFile(data, gets, block_size=2 ** 16, cache_type='readahead') as f:
        index = tile_index.build(f)
    local = _index(path)
    assert 0 < len(gets) <= 12   # header blocks, plus each level's first and middle tile
    assert index.file_size == local.file_size == len(data)
    for number, level in local.levels.items():
        np.testing.assert_array_equal(index.levels[number].offsets, level.offsets)
        np.testing.assert_array_equal(index.levels[number].counts, level.counts)
        assert index.levels[number].codec == level.codec
    # Reading through a filesystem's own range reads (fsspec memory: no server needed).
    fs = MemoryFileSystem()
    fs.pipe_file('/bucket/slide.tif', data)
    calls = []

    def read_ranges(p, ranges):
        calls.append(len(ranges))
        return fs.cat_ranges([p] * len(ranges), [s for s, _ in ranges], [e for _, e in ranges])

    remote = remote_tiles.RemoteTiles(index, '/bucket/slide.tif', read_ranges)
    np.testing.assert_array_equal(remote.read(0, 200, 150, 224, 224),
                                  _crop(_level_pixels(path, 0), 200, 150, 224, 224))
    assert calls == [6]   # 3 tiles across, 2 down


# ------------------------------------------------------------------ the index file

def test_index_file_round_trip_and_stale_checks(pyramids, tmp_path):
    path = pyramids['zlib_predictor']
    size = os.path.getsize(path)
    target = tile_index.index_file(str(tmp_path / 'tiling'), 'slide')
    assert target == str(tmp_path / 'tiling' / 'tile_index' / 'slide.npz')
    tile_index.write(target, _index(path))
    assert os.listdir(os.path.dirname(target)) == ['slide.npz']   # no temporaries left
    again = tile_index.read(target, size)
    remote = remote_tiles.RemoteTiles(again, path, Counting())
    np.testing.assert_array_equal(remote.read(2, 0, 0, 300, 300), _direct(path).read(2, 0, 0,
                                                                                     300, 300))
    assert os.path.getsize(target) < 4096
    with pytest.raises(DataError, match=r'slide is 5 bytes, its tile index was written for '
                                        rf'{size}; tile it again'):
        tile_index.read(target, 5)
    with pytest.raises(DataError, match='no tile index'):
        tile_index.read(str(tmp_path / 'none.npz'), size)
    with pytest.raises(DataError, match='not a readable tile index'):
        tile_index.TileIndex.from_bytes(b'garbage', size)
    old = io.BytesIO()
    np.savez(old, meta=np.array('{"version": 0}'))
    with pytest.raises(DataError, match=f'tile index format 0, this version reads '
                                        f'{tile_index.FORMAT_VERSION}'):
        tile_index.TileIndex.from_bytes(old.getvalue(), size)


def test_slides_that_are_not_tiled_rgb_tiffs_are_unindexable(tmp_path):
    strips = str(tmp_path / 'strips.tif')
    tifffile.imwrite(strips, _base(), photometric='rgb')
    with pytest.raises(tile_index.Unindexable, match='level 0 is not a tiled 8-bit RGB'):
        _index(strips)
    with pytest.raises(tile_index.Unindexable, match='not a TIFF'):
        tile_index.build(io.BytesIO(b'not a tiff at all'))


# ------------------------------------------------------------------ the shared slides

@needs_shared
@pytest.mark.parametrize('path', [CMU, TCGA], ids=['cmu_jpeg', 'tcga_jpeg2000'])
def test_shared_slides_read_remotely_as_openslide_and_tifffile_read_them(path):
    index = _index(path)
    counting = Counting()
    remote = remote_tiles.RemoteTiles(index, path, counting, cached_tiles=0)
    with reader.open_slide(path) as slide, reader.open_slide(path, direct=False) as plain:
        w, h = slide.dimensions
        for x, y, side in ((0, 0, 224), (w // 2 - 100, h // 2 - 50, 300), (w - 150, h - 90, 224)):
            got = remote.read(0, x, y, side, side)
            np.testing.assert_array_equal(got, slide.tiles.read(0, x, y, side, side))
            np.testing.assert_array_equal(got, plain.read(0, x, y, side, side))
    assert all(set(call) <= _tile_ranges(index.levels[0]) for call in counting.calls)
    for number in sorted(index.levels)[1:]:   # levels OpenSlide reads with sub-pixel placement
        level, pixels = index.levels[number], _level_pixels(path, number)
        x0 = int(round(700 * index.width0 / level.width))
        np.testing.assert_array_equal(remote.read(number, x0, 0, 300, 200),
                                      _crop(pixels, 700, 0, 300, 200))
