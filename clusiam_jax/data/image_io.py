"""Reading patch files into RGB uint8 arrays, and telling bad files apart.

PNG and JPEG go through OpenCV's decoder (faster than PIL's, and pixel-identical for
PNG; for baseline JPEG both use libjpeg-turbo with the same
defaults, checked in tests). Everything else goes through PIL.

Conversions (the original opened files without ``convert('RGB')`` and crashed
on RGBA): grayscale is replicated to three channels, alpha is dropped (as PIL's
``convert('RGB')`` does), palette images are expanded, and 16-bit images are
scaled to 8 bits by ``round(v / 257)`` (PIL would clip them at 255 instead).

Anything that cannot be decoded raises :class:`BadImageError`, so the pipeline
can skip it while any other exception (a bug) still surfaces.
"""
import io
import os
import struct

import cv2
import numpy as np
from PIL import Image

# Per-image work is far too small for OpenCV's thread pool to pay off; the
# pipeline's parallelism comes from grain worker processes instead.
cv2.setNumThreads(1)

_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
_JPEG_MAGIC = b'\xff\xd8\xff'


# An image with a longer side is not a patch (a slide region, a whole slide saved as a
# plain TIFF): training on it as one patch would crop a speck of it at random.
MAX_PATCH_SIDE = 4096

# TIFF tags read by tiff_is_slide.
_IMAGE_WIDTH, _IMAGE_LENGTH, _TILE_WIDTH, _SUBIFDS = 256, 257, 322, 330


class BadImageError(ValueError):
    """A file that is not a readable image (empty, truncated, not an image...)."""


def _to_rgb_uint8(arr: np.ndarray, bgr: bool) -> np.ndarray:
    """HxW, HxWx1..4 of uint8/uint16 -> HxWx3 uint8 RGB."""
    if arr.dtype == np.uint16:
        arr = ((arr.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8)  # round(v/257)
    elif arr.dtype != np.uint8:
        raise BadImageError(f'unsupported pixel type {arr.dtype}')
    if arr.ndim == 2:
        arr = arr[:, :, None]
    channels = arr.shape[2]
    if channels in (1, 2):  # gray, gray+alpha
        return np.ascontiguousarray(np.repeat(arr[:, :, :1], 3, axis=2))
    if channels in (3, 4):
        rgb = arr[:, :, 2::-1] if bgr else arr[:, :, :3]
        return np.ascontiguousarray(rgb)
    raise BadImageError(f'unsupported channel count {channels}')


# Decoded straight to RGB (no BGR->RGB copy), alpha dropped and gray
# replicated by the decoder; ANYDEPTH keeps 16-bit samples for our own scaling.
_CV2_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION


def _decode_with_cv2(data: bytes) -> np.ndarray:
    if data.startswith(_JPEG_MAGIC) and b'\xff\xd9' not in data[-64:]:
        # libjpeg pads a truncated JPEG with gray and only warns; PIL refuses
        # it. A JPEG without its end-of-image marker is therefore rejected.
        raise BadImageError('truncated JPEG (no end-of-image marker)')
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), _CV2_FLAGS)
    if arr is None or arr.size == 0:
        raise BadImageError('not decodable')
    return _to_rgb_uint8(arr, bgr=False)


def _decode_with_pil(data: bytes) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I'):
                arr = np.asarray(im)
                arr = np.clip(arr, 0, 65535).astype(np.uint16)
                return _to_rgb_uint8(arr, bgr=False)
            return np.asarray(im.convert('RGB'))
    except BadImageError:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadImageError(f'{type(e).__name__}: {e}') from None


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded image bytes -> HxWx3 uint8 RGB; BadImageError if not an image."""
    if not data:
        raise BadImageError('empty file')
    if data.startswith(_PNG_MAGIC) or data.startswith(_JPEG_MAGIC):
        arr = _decode_with_cv2(data)
    else:
        arr = _decode_with_pil(data)
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise BadImageError(f'empty image {arr.shape}')
    return arr


def load_rgb(path: str) -> np.ndarray:
    """Reads an image file as HxWx3 uint8 RGB; BadImageError if unreadable."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise BadImageError(f'{path}: {e.strerror or e}') from None
    try:
        return decode_rgb(data)
    except BadImageError as e:
        raise BadImageError(f'{os.fspath(path)}: {e}') from None


def _tiff_first_ifd(f):
    """(tags of the first IFD: {tag: first value}, offset of the next IFD) of an open
    TIFF or BigTIFF file; None when it is not one."""
    head = f.read(16)
    if head[:2] not in (b'II', b'MM'):
        return None
    order = '<' if head[:2] == b'II' else '>'
    version = struct.unpack(order + 'H', head[2:4])[0]
    if version == 42:        # classic: 2-byte count, 12-byte entries, 4-byte offsets
        offset = struct.unpack(order + 'I', head[4:8])[0]
        count_fmt, entry_size, value_at, offset_fmt = 'H', 12, 8, 'I'
    elif version == 43:      # BigTIFF: 8-byte count, 20-byte entries, 8-byte offsets
        offset = struct.unpack(order + 'Q', head[8:16])[0]
        count_fmt, entry_size, value_at, offset_fmt = 'Q', 20, 12, 'Q'
    else:
        return None
    f.seek(offset)
    count_size = struct.calcsize(count_fmt)
    count = struct.unpack(order + count_fmt, f.read(count_size))[0]
    if count > 4096:
        return None
    table = f.read(count * entry_size + struct.calcsize(offset_fmt))
    tags = {}
    for i in range(count):
        entry = table[i * entry_size:(i + 1) * entry_size]
        tag, kind = struct.unpack(order + 'HH', entry[:4])
        value = entry[value_at:]
        if kind == 3:      # SHORT
            tags[tag] = struct.unpack(order + 'H', value[:2])[0]
        elif kind in (4, 13):   # LONG, IFD
            tags[tag] = struct.unpack(order + 'I', value[:4])[0]
        elif kind in (16, 18):  # LONG8, IFD8
            tags[tag] = struct.unpack(order + 'Q', value[:8])[0]
        else:
            tags[tag] = None
    next_ifd = struct.unpack(order + offset_fmt, table[count * entry_size:])[0]
    return tags, next_ifd


def tiff_is_slide(path: str) -> bool:
    """Whether a .tif/.tiff file is a whole slide, not a patch: a pyramid (more than one
    image, or reduced levels in SubIFDs as OME-TIFF keeps them), or tiled and larger than
    MAX_PATCH_SIDE. Reads the first image's header only (a few hundred bytes); a file
    that is no readable TIFF is not a slide (decoding it tells what it is)."""
    try:
        with open(path, 'rb') as f:
            first = _tiff_first_ifd(f)
    except (OSError, struct.error):
        return False
    if first is None:
        return False
    tags, next_ifd = first
    if next_ifd or _SUBIFDS in tags:
        return True
    side = max(tags.get(_IMAGE_WIDTH) or 0, tags.get(_IMAGE_LENGTH) or 0)
    return _TILE_WIDTH in tags and side > MAX_PATCH_SIDE
