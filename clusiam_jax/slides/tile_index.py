"""A slide's tile index: per level, what reading its tiles takes (geometry, byte ranges, codec),
taken from the TIFF header once at tiling time, so a host reading the slide from a bucket
fetches tiles by exact byte ranges and never parses the header over the network (issue 25).

One .npz per slide: numpy alone reads it (no h5py in grain workers), from bytes fetched in one
GET, without pickle; it is written whole in one upload. Since version 2 it also holds the
`layout` of the slide as reader.Slide opens it locally (reader.layout_of: OpenSlide's levels and
which ones the direct reader covers), so a remote Slide picks the same levels with no header.
Since version 3 it holds the slide object's ETag at tiling (storage.version): a slide written
again with the same byte count is not read through the old index. Local slides have no index.
"""
import dataclasses
import io
import json
import logging
import os
import zipfile
from typing import Dict, Iterable, Optional

import numpy as np

from clusiam_jax import fileio, storage
from clusiam_jax.errors import DataError
from clusiam_jax.slides import tiles as tiles_lib

log = logging.getLogger('clusiam_jax')

FORMAT_VERSION = 4   # 'etag' holds storage.version()[1]: a gs:// generation since 4
READABLE_VERSIONS = (3, 4)
INDEX_DIR = 'tile_index'
# tifffile's decode paths (TiffPage.decode): JPEG with tables and colour spaces; codecs that
# return whole images; byte codecs followed by a predictor. Others are not indexed.
JPEG_COMPRESSIONS = frozenset({6, 7, 34892, 33007})
BYTE_CODEC_ONLY = frozenset({2, 3, 4, 48124, 65000, 65001, 65002})   # CCITT, Jetraw, EER


class Unindexable(DataError):
    """A slide whose level 0 cannot be read tile by tile from byte ranges (stage it whole)."""


def index_file(out_dir: str, slide_id: str) -> str:
    """Where the tiling job keeps a slide's index: beside its coordinates."""
    return storage.join(out_dir, INDEX_DIR, f'{slide_id}.npz')


@dataclasses.dataclass(frozen=True)
class Codec:
    """How tifffile decodes one level's tiles, with what its page would look up per call."""
    kind: str                      # 'jpeg', 'image' (whole-image codecs) or 'bytes'
    compression: int
    photometric: int
    predictor: int
    fillorder: int
    colorspace: Optional[int]      # JPEG only: tifffile.jpeg_decode_colorspace's answer
    outcolorspace: Optional[int]
    jpegtables: Optional[bytes]

    def decode(self, data: bytes, tile_h: int, tile_w: int) -> np.ndarray:
        """uint8 [tile_h, tile_w, 3]: the calls TiffPage.decode makes for a contiguous 8-bit RGB
        tile, so the pixels are tifffile's own."""
        import imagecodecs
        from tifffile import TIFF
        if self.kind == 'jpeg':
            out = imagecodecs.jpeg_decode(
                data, bitspersample=8, tables=self.jpegtables, header=None,
                colorspace=self.colorspace, outcolorspace=self.outcolorspace,
                shape=(tile_h, tile_w))
        elif self.kind == 'image':
            out = TIFF.DECOMPRESSORS[self.compression](data)
        else:
            if self.fillorder == 2:
                data = imagecodecs.bitorder_decode(data)
            size = tile_h * tile_w * 3
            if self.compression != 1:
                data = TIFF.DECOMPRESSORS[self.compression](data, out=size)
            out = np.frombuffer(data, np.uint8)
            if self.predictor != 1:
                out = out[:size].reshape(tile_h, tile_w, 3) if out.size > size else \
                    out.reshape(tile_h, tile_w, 3)
                out = TIFF.UNPREDICTORS[self.predictor](out, axis=-2, out=out)
        if out.ndim == 1 and out.size > tile_h * tile_w * 3:
            out = out[:tile_h * tile_w * 3]
        return out.reshape(tile_h, tile_w, 3)


@dataclasses.dataclass
class IndexLevel:
    """One level as TiffTiles reads it (the same attribute names), without its page."""
    width: int
    height: int
    tile_w: int
    tile_h: int
    tiles_across: int
    offsets: np.ndarray    # int64 per tile, row-major
    counts: np.ndarray     # int64 byte counts
    codec: Codec

    def downsample(self, width0: int) -> float:
        """Level-0 px per pixel, as TiffTiles places level-0 coordinates on this level."""
        return width0 / self.width


@dataclasses.dataclass
class TileIndex:
    file_size: int                  # the slide's identity: a changed slide reads wrong bytes
    width0: int
    height0: int
    levels: Dict[int, IndexLevel]   # by the level's number in tifffile's first series
    layout: Optional[dict] = None   # reader.layout_of the slide opened locally (build_for_slide)
    etag: str = ''                  # the slide object's ETag when tiled ('' unknown)

    def to_bytes(self) -> bytes:
        meta = {'version': FORMAT_VERSION, 'file_size': self.file_size, 'etag': self.etag,
                'width0': self.width0, 'height0': self.height0, 'levels': {},
                'layout': self.layout}
        arrays = {}
        for number, lv in self.levels.items():
            c = lv.codec
            meta['levels'][str(number)] = {
                'width': lv.width, 'height': lv.height, 'tile_w': lv.tile_w,
                'tile_h': lv.tile_h, 'kind': c.kind, 'compression': c.compression,
                'photometric': c.photometric, 'predictor': c.predictor,
                'fillorder': c.fillorder, 'colorspace': c.colorspace,
                'outcolorspace': c.outcolorspace, 'downsample': lv.downsample(self.width0)}
            arrays[f'offsets_{number}'] = lv.offsets
            arrays[f'counts_{number}'] = lv.counts
            arrays[f'jpegtables_{number}'] = np.frombuffer(c.jpegtables or b'', np.uint8)
        buf = io.BytesIO()
        np.savez_compressed(buf, meta=np.array(json.dumps(meta)), **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, raw: bytes, file_size: int, name: str = 'tile index',
                   etag: str = '') -> 'TileIndex':
        """The index in `raw`; DataError when it is no index of this version or was written
        for another state of the slide (`file_size`, `etag`: the slide's now; the ETags are
        compared when both are known)."""
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
                meta = json.loads(str(npz['meta']))
                version = meta.get('version')
                if version not in READABLE_VERSIONS:
                    raise DataError(f'{name}: tile index format {version}, this version reads '
                                    f'{FORMAT_VERSION}; tile the slide again')
                if meta['file_size'] != file_size:
                    raise DataError(f"{name}: the slide is {file_size} bytes, its tile index "
                                    f"was written for {meta['file_size']}; tile it again")
                # Format 3 kept a gs:// slide's ETag where 4 keeps its generation: size only.
                if etag and meta.get('etag') and meta['etag'] != etag and version != 3:
                    raise DataError(f"{name}: the slide was written again (ETag {etag}, its "
                                    f"tile index was written for {meta['etag']}); tile it "
                                    f'again')
                levels = {int(k): _level_from_meta(m, npz, k)
                          for k, m in meta['levels'].items()}
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f'{name}: not a readable tile index ({type(e).__name__}: '
                            f'{" ".join(str(e).split())})') from None
        return cls(meta['file_size'], meta['width0'], meta['height0'], levels,
                   meta.get('layout'), meta.get('etag') or '')


def _level_from_meta(m: dict, npz, key: str) -> IndexLevel:
    tables = npz[f'jpegtables_{key}'].tobytes()
    codec = Codec(m['kind'], m['compression'], m['photometric'], m['predictor'],
                  m['fillorder'], m['colorspace'], m['outcolorspace'], tables or None)
    return IndexLevel(m['width'], m['height'], m['tile_w'], m['tile_h'],
                      -(-m['width'] // m['tile_w']), npz[f'offsets_{key}'].astype(np.int64),
                      npz[f'counts_{key}'].astype(np.int64), codec)


def write(path: str, index: TileIndex) -> None:
    """One atomic write (a local rename, or one upload to a bucket)."""
    data = index.to_bytes()
    if storage.is_url(path):
        storage.write_bytes(path, data)
        return
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with fileio.atomic_write(path) as tmp, open(tmp, 'wb') as f:
        f.write(data)


def read(path: str, file_size: int, etag: str = '') -> TileIndex:
    """The index at `path`, checked against the slide's size and ETag now (see from_bytes)."""
    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        raise DataError(f'{path}: no tile index (tile the slide first)') from None
    return TileIndex.from_bytes(raw, file_size, path, etag)


# ------------------------------------------------------------------------ building

def build_for_slide(path: str, name: str = 'slide', etag: str = '') -> TileIndex:
    """The index of the local slide file at `path` (the tiling job's staged copy) with its
    layout as reader.open_slide opens it: the levels a host in the bucket must pick alike.
    `etag`: the object's, looked up before it was staged (a later write then mismatches)."""
    from clusiam_jax.slides import reader
    with reader.open_slide(path) as slide:
        layout = reader.layout_of(slide)
    with open(path, 'rb') as fh:
        index = build(fh, name=name)
    return dataclasses.replace(index, layout=layout, etag=etag)


def build(fh, levels: Optional[Iterable[int]] = None, name: str = 'slide') -> TileIndex:
    """The index of the TIFF in the binary file object `fh` (a local file, or an fsspec file
    opened with small read-ahead blocks: storage.open_header). Levels of tifffile's first
    series read as TiffTiles reads them (tiled 8-bit RGB), each kept only if its middle tile
    decodes here exactly as tifffile decodes it; `levels`: only these. Unindexable when
    level 0 is not kept."""
    import tifffile
    wanted = None if levels is None else set(levels)
    try:
        tiff = tifffile.TiffFile(fh)   # a file object it was given stays open
    except Exception as e:  # not a TIFF tifffile understands
        raise Unindexable(f'{name}: not a TIFF tifffile reads ({type(e).__name__}: '
                          f'{" ".join(str(e).split())})') from None
    with tiff:
        series = tiff.series[0].levels
        first = series[0].keyframe
        width0, height0 = first.imagewidth, first.imagelength
        found = {}
        for number, level in enumerate(series):
            if wanted is not None and number not in wanted:
                continue
            indexed = _indexed_level(tiff, level.keyframe)
            if indexed is not None:
                found[number] = indexed
            else:
                log.debug('%s level %d: not indexed', name, number)
        if 0 not in found and (wanted is None or 0 in wanted):
            raise Unindexable(f'{name}: level 0 is not a tiled 8-bit RGB TIFF level whose '
                              f'tiles decode from byte ranges')
        return TileIndex(int(tiff.filehandle.size), width0, height0, found)


def _indexed_level(tiff, page) -> Optional[IndexLevel]:
    """The page as an IndexLevel, or None when TiffTiles would not read it or a tile decodes
    otherwise here than through the page (an NDPI's, a codec this module does not follow)."""
    level = tiles_lib._level_from_page(page)
    if level is None or getattr(page, 'is_ndpi', False) or page.compression in BYTE_CODEC_ONLY:
        return None
    codec = _codec(page)
    if codec is None:
        return None
    indexed = IndexLevel(level.width, level.height, level.tile_w, level.tile_h,
                         level.tiles_across, level.offsets, level.counts, codec)
    middle = ((level.height // 2 // level.tile_h) * level.tiles_across
              + level.width // 2 // level.tile_w)
    fh = tiff.filehandle
    fh.seek(int(level.offsets[middle]))
    data = fh.read(int(level.counts[middle]))
    try:
        theirs = page.decode(data, middle, jpegtables=page.jpegtables)[0]
        theirs = theirs.reshape(level.tile_h, level.tile_w, 3)
        mine = codec.decode(data, level.tile_h, level.tile_w)
    except Exception as e:  # a codec tifffile lacks, a damaged tile
        log.debug('middle tile %d does not decode (%s)', middle, e)
        return None
    return indexed if np.array_equal(mine, theirs) else None


def _codec(page) -> Optional[Codec]:
    from tifffile import TIFF
    from tifffile.tifffile import jpeg_decode_colorspace
    tables = page.jpegtables
    common = dict(compression=int(page.compression), photometric=int(page.photometric),
                  predictor=int(page.predictor), fillorder=int(page.fillorder),
                  jpegtables=None if tables is None else bytes(tables))
    if page.compression in JPEG_COMPRESSIONS:
        space, out = jpeg_decode_colorspace(page.photometric, page.planarconfig,
                                            page.extrasamples, page.is_jfif)
        if not all(v is None or isinstance(v, int) for v in (space, out)):
            return None
        return Codec('jpeg', colorspace=space, outcolorspace=out, **common)
    if page.compression != 1 and page.compression not in TIFF.DECOMPRESSORS:
        return None
    kind = 'image' if page.compression in TIFF.IMAGE_COMPRESSIONS else 'bytes'
    if kind == 'bytes' and page.predictor != 1 and page.predictor not in TIFF.UNPREDICTORS:
        return None
    return Codec(kind, colorspace=None, outcolorspace=None, **common)
