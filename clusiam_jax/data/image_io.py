"""Patch files into RGB uint8 arrays (PNG/JPEG through OpenCV, pixel-identical to PIL's; the
rest through PIL); what does not decode raises BadImageError, which the pipeline skips."""
import io
import os
import struct
from typing import Optional

import cv2
import numpy as np
import tifffile
from PIL import Image

cv2.setNumThreads(1)   # the parallelism is in the worker processes

_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
_JPEG_MAGIC = b'\xff\xd8\xff'
# A longer side is no patch (a slide or a region of one): training would crop a speck.
MAX_PATCH_SIDE = 4096
_SUBIFDS = 330   # the TIFF tag of an OME-TIFF's reduced levels


class BadImageError(ValueError):
    """A file that is not a readable image; `subject`: what the skip list names (a slide)."""

    def __init__(self, message: str, subject: Optional[str] = None):
        super().__init__(message)
        self.subject = subject


def _to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
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
        return np.ascontiguousarray(arr[:, :, :3])
    raise BadImageError(f'unsupported channel count {channels}')


# Straight to RGB, alpha dropped, gray replicated; ANYDEPTH keeps 16 bits for our scaling.
_CV2_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION


def decode_rgb(data: bytes) -> np.ndarray:
    if not data:
        raise BadImageError('empty file')
    if data.startswith((_PNG_MAGIC, _JPEG_MAGIC)):
        if data.startswith(_JPEG_MAGIC) and b'\xff\xd9' not in data[-64:]:
            # libjpeg pads a truncated JPEG with gray and only warns; PIL refuses it.
            raise BadImageError('truncated JPEG (no end-of-image marker)')
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), _CV2_FLAGS)
        if arr is None or arr.size == 0:
            raise BadImageError('not decodable')
        arr = _to_rgb_uint8(arr)
    else:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if im.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I'):
                    arr = _to_rgb_uint8(np.clip(np.asarray(im), 0, 65535).astype(np.uint16))
                else:
                    arr = np.asarray(im.convert('RGB'))
        except Exception as e:  # PIL raises many types for corrupt data
            raise BadImageError(f'{type(e).__name__}: {e}') from None
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise BadImageError(f'empty image {arr.shape}')
    return arr


def load_rgb(path: str) -> np.ndarray:
    try:
        with open(path, 'rb') as f:
            return decode_rgb(f.read())
    except OSError as e:
        raise BadImageError(f'{path}: {e.strerror or e}') from None
    except BadImageError as e:
        raise BadImageError(f'{os.fspath(path)}: {e}') from None


def tiff_is_slide(path: str) -> bool:
    """Whether a .tif/.tiff file is a whole slide: a pyramid (pages or SubIFDs), or tiled and
    larger than MAX_PATCH_SIDE. An unreadable TIFF is not a slide (decoding tells)."""
    try:
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages.first
            if len(tiff.pages) > 1 or _SUBIFDS in page.tags:
                return True
            return page.is_tiled and max(page.imagewidth, page.imagelength) > MAX_PATCH_SIDE
    except (OSError, ValueError, IndexError, struct.error):
        return False
