"""Random access to the training images: by file path, or from a built dataset.

Both sources are cheap to pickle (grain sends them to spawned worker
processes): the file source keeps its paths in one numpy bytes array, and the
dataset source opens its ArrayRecord reader lazily in each process.
"""
import logging
import os
from typing import List

import numpy as np

from clusiam_jax.data import image_io
from clusiam_jax.data import records as records_lib
from clusiam_jax.errors import DataError

logger = logging.getLogger(__name__)

# An image file with a longer side is not a patch (image_io.MAX_PATCH_SIDE); a tiled or
# pyramidal TIFF that large is a slide, refused when the folder is listed (records.py).
MAX_PATCH_SIDE = image_io.MAX_PATCH_SIDE


class FileSource:
    """Images read from their files (a patch folder or a manifest)."""

    def __init__(self, recs: List[records_lib.PatchRecord]):
        self._paths = np.array([os.fsencode(r.path) for r in recs])

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> str:
        return os.fsdecode(self._paths[index])

    def load(self, index: int) -> np.ndarray:
        """HxWx3 uint8 RGB; BadImageError if unreadable or far larger than a patch."""
        img = image_io.load_rgb(self.path(index))
        if max(img.shape[:2]) > MAX_PATCH_SIDE:
            raise image_io.BadImageError(
                f'{self.path(index)}: {img.shape[1]}x{img.shape[0]} px is far larger than '
                f'a patch (a slide or a slide region? tile it: --mode tile)')
        return img


class TfdsSource:
    """Images stored in a dataset built by ``tfds_builder`` (ArrayRecord)."""

    def __init__(self, dataset_dir: str, recs: List[records_lib.PatchRecord]):
        self.dataset_dir = dataset_dir
        self._paths = np.array([os.fsencode(r.path) for r in recs])
        self._source = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_source'] = None  # reopened in each process
        return state

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> str:
        return os.fsdecode(self._paths[index])

    def load(self, index: int) -> np.ndarray:
        if self._source is None:
            from clusiam_jax.data import tfds_builder  # tfds import only where used
            self._source = tfds_builder.open_data_source(self.dataset_dir)
        try:
            example = self._source[index]
        except Exception as e:  # a damaged shard: treat like a damaged file
            raise image_io.BadImageError(f'{self.path(index)}: record {index}: {e}') from None
        try:
            return image_io.decode_rgb(example['image'])
        except image_io.BadImageError as e:
            raise image_io.BadImageError(f'{self.path(index)}: {e}') from None


def open_source(path: str, slide_dir: str = '', open_slides: int = 512):
    """(records, source) for a tiling output or CLAM/TRIDENT patch folder (slides read
    directly, `slide_dir`: where the latter's slides are), a patch folder, a manifest CSV
    or a built dataset."""
    from clusiam_jax.data import slide_source  # openslide only where slides are read
    if slide_source.is_slide_source(path):
        return slide_source.open_slide_source(path, slide_dir, open_slides)
    if slide_dir:
        raise DataError(f'data.slide_dir is set but {path} is not a CLAM/TRIDENT patch '
                        f'folder (no patches/*.h5): drop data.slide_dir or point data.path '
                        f'at the folder holding patches/')
    recs = records_lib.discover(path)
    dataset_dir = records_lib.find_tfds_dataset(path) if os.path.isdir(path) else None
    if dataset_dir is not None:
        return recs, TfdsSource(dataset_dir, recs)
    return recs, FileSource(recs)


class SubsetSource:
    """Some records of a source (the training records when a monitor set is held out):
    index i of the subset is index `indices[i]` of the source."""

    def __init__(self, source, indices):
        self.source = source
        self.indices = np.asarray(indices, np.int64)
        if hasattr(source, 'slide_index'):
            self.slide_index = source.slide_index[self.indices]
        if hasattr(source, 'dataset_dir'):
            self.dataset_dir = source.dataset_dir

    def __len__(self) -> int:
        return len(self.indices)

    def path(self, index: int) -> str:
        return self.source.path(int(self.indices[index]))

    def load(self, index: int) -> np.ndarray:
        return self.source.load(int(self.indices[index]))


def holdout_slides(records, fraction: float, seed: int):
    """(training indices, held-out indices): `fraction` of the slides (at least one, never
    all), drawn from `seed`, held out whole: patches of one slide are correlated, so a
    monitor set that shares slides with training would flatter it."""
    slides, codes = records_lib.slide_codes(records)
    if (slides == '').any():   # patch files without a slide id: their folder is the slide
        keys = np.array([r.slide_id or os.path.dirname(r.path) for r in records],
                        dtype=object).astype(str)
        slides, codes = np.unique(keys, return_inverse=True)
    if len(slides) < 2:
        raise DataError(f'monitor.holdout needs at least 2 slides in the training source; it '
                        f'has {len(slides)} (give monitor.data_path instead)')
    count = min(len(slides) - 1, max(1, int(round(fraction * len(slides)))))
    held = set(np.random.default_rng([seed, 0x401D]).permutation(slides)[:count])
    if len(slides) < 20:
        logger.warning('monitor.holdout: only %d slides (or folders) in the training source; '
                       'holding out %s. With class folders and no slide ids a folder is a '
                       'class: prefer monitor.data_path', len(slides), sorted(held))
    out = np.isin(codes.reshape(-1), np.flatnonzero(np.isin(slides, sorted(held))))
    return np.flatnonzero(~out), np.flatnonzero(out)
