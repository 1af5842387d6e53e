"""Random access to the training images: by file path, or from a built dataset.

Both sources are cheap to pickle (grain sends them to spawned worker
processes): the file source keeps its paths in one numpy bytes array, and the
dataset source opens its ArrayRecord reader lazily in each process.
"""
import os
from typing import List

import numpy as np

from clusiam_jax.data import image_io
from clusiam_jax.data import records as records_lib


class FileSource:
    """Images read from their files (a patch folder or a manifest)."""

    def __init__(self, recs: List[records_lib.PatchRecord]):
        self._paths = np.array([os.fsencode(r.path) for r in recs])

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> str:
        return os.fsdecode(self._paths[index])

    def load(self, index: int) -> np.ndarray:
        """HxWx3 uint8 RGB; BadImageError if unreadable."""
        return image_io.load_rgb(self.path(index))


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


def open_source(path: str):
    """(records, source) for a patch folder, manifest CSV or built dataset."""
    recs = records_lib.discover(path)
    dataset_dir = records_lib.find_tfds_dataset(path) if os.path.isdir(path) else None
    if dataset_dir is not None:
        return recs, TfdsSource(dataset_dir, recs)
    return recs, FileSource(recs)
