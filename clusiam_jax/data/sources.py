"""`open_source`: the one way to a PatchSource. Sources pickle cheaply for grain's workers:
per-patch numpy columns, readers opened lazily per process."""
import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
from typing import Optional, Sequence

import numpy as np

from clusiam_jax import fileio, storage
from clusiam_jax.data import image_io, slide_cache, slide_source
from clusiam_jax.data import records as records_lib
from clusiam_jax.data.records import PatchRecord, PatchSource
from clusiam_jax.errors import DataError

logger = logging.getLogger(__name__)
_NONE = np.iinfo(np.int64).min   # a coordinate the record does not have
STAGED_MARKER = '.staged.json'   # a staged s3:// dataset's objects (written last)
# Records of a bucket dataset read ahead per process, at most (prefetch; ~50 KB each).
_READ_AHEAD = 64


class FileSource(PatchSource):
    """Patch files (a folder or a manifest), or a built dataset's images (`dataset_dir`)."""

    def __init__(self, records: Sequence[PatchRecord], dataset_dir: Optional[str] = None):
        self.dataset_dir = dataset_dir
        self._paths = np.array([os.fsencode(r.path) for r in records])
        # A patch without a slide id belongs to its folder (balancing, holding out).
        keys = np.array([r.slide_id or os.path.dirname(r.path) for r in records],
                        dtype=object).astype(str)
        names, index = np.unique(keys, return_inverse=True)
        self.slide_index = index.reshape(-1).astype(np.int32)
        ids = dict(zip(keys.tolist(), (r.slide_id or '' for r in records)))
        self.slide_ids = np.array([ids[k] for k in names.tolist()], dtype=str)
        self._labels = np.array([r.label or '' for r in records], dtype=str)
        self._xy = np.array([(_NONE if r.x is None else r.x, _NONE if r.y is None else r.y)
                             for r in records], np.int64).reshape(-1, 2)
        self._reader = None
        self._lock = threading.Lock()
        self._wanted = collections.OrderedDict()   # indices prefetch() named, not yet read
        self._ahead = collections.OrderedDict()    # index -> encoded image, read with another

    def __getstate__(self):
        # Reopened in each process; what it read ahead stays with the process that read it.
        return dict(self.__dict__, _reader=None, _lock=None, _wanted=collections.OrderedDict(),
                    _ahead=collections.OrderedDict())

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    def path(self, index: int) -> str:
        return os.fsdecode(self._paths[index])

    def record(self, index: int) -> PatchRecord:
        x, y = (None if v == _NONE else int(v) for v in self._xy[index])
        return PatchRecord(self.path(index), str(self.slide_ids[self.slide_index[index]])
                           or None, str(self._labels[index]) or None, x, y)

    def prefetch(self, indices) -> None:
        """Notes patches load() will want soon. A built dataset in a bucket then reads them
        with the next one load() misses, in one concurrent array_record read, instead of a
        bucket round trip each (measured: docs/storage.md)."""
        if self.dataset_dir is None or not storage.is_url(self.dataset_dir):
            return
        with self._lock:
            for i in map(int, indices):
                if i not in self._ahead:
                    self._wanted[i] = None
            while len(self._wanted) > _READ_AHEAD:
                self._wanted.popitem(last=False)

    def load(self, index: int) -> np.ndarray:
        if self.dataset_dir is None:
            img = image_io.load_rgb(self.path(index))
            if max(img.shape[:2]) > image_io.MAX_PATCH_SIDE:
                raise image_io.BadImageError(
                    f'{self.path(index)}: {img.shape[1]}x{img.shape[0]} px is far larger '
                    f'than a patch (a slide or a slide region? tile it: --mode tile)')
            return img
        try:
            return image_io.decode_rgb(self._encoded(index))
        except image_io.BadImageError as e:
            raise image_io.BadImageError(f'{self.path(index)}: {e}') from None
        except DataError:   # the bucket failing under the dataset (_read_failed): no skip
            raise
        except Exception as e:  # a damaged shard: treat like a damaged file
            raise image_io.BadImageError(f'{self.path(index)}: record {index}: {e}') from None

    def _encoded(self, index: int) -> bytes:
        """Record `index`'s image bytes: read ahead, or read now with the wanted ones."""
        with self._lock:
            if index in self._ahead:
                return self._ahead.pop(index)
            self._wanted.pop(index, None)
            others = list(self._wanted)
            self._wanted.clear()
        if others:
            try:
                got = self._reader_now().__getitems__([index] + others)
            except Exception:  # a damaged neighbour: this record is read alone below
                got = None
            if got is not None:
                with self._lock:
                    for i, example in zip(others, got[1:]):
                        self._ahead[i] = example['image']
                    while len(self._ahead) > _READ_AHEAD:
                        self._ahead.popitem(last=False)
                return got[0]['image']
        try:
            return self._reader_now()[index]['image']
        except Exception as e:
            if not storage.is_url(self.dataset_dir):
                raise
            return self._read_failed(index, e)

    def _reader_now(self):
        with self._lock:
            if self._reader is None:
                from clusiam_jax.data import tfds_builder  # tensorflow-datasets: only here
                self._reader = tfds_builder.open_data_source(self.dataset_dir)
            return self._reader

    def _read_failed(self, index: int, error: Exception) -> bytes:
        """Record `index` of a gs:// dataset could not be read. array_record says why only in
        its message (a RuntimeError for an outage, a refusal and a damaged chunk alike), and
        after a failed request its reader of that shard fails every read. So the shard is
        looked at through storage, whose errors say what they are (after its retries): an
        outage or a refusal is that DataError, which ends the run (skipping would read other
        batches than an undisturbed run); a missing shard is Unreadable, skipped and listed
        like a missing slide; a shard the bucket serves is read again through a new reader,
        and a record that fails again is damaged (the caller skips it)."""
        storage.version(self._shard_of(index))
        with self._lock:
            self._reader = None   # its failed reader of that shard would fail every read
        try:
            return self._reader_now()[index]['image']
        except Exception as again:
            raise again from error

    def _shard_of(self, index: int) -> str:
        """The shard object holding record `index` (tfds's split info: the shards in order
        and their record counts); the dataset's info where the reader could not be opened."""
        reader = self._reader
        if reader is None:   # the dataset's own files failed: the folder is looked at
            return storage.join(self.dataset_dir, 'dataset_info.json')
        split = reader.dataset_info.splits[reader.split]
        ends = np.cumsum(split.shard_lengths)
        return str(split.filepaths[int(np.searchsorted(ends, index, side='right'))])


def open_source(path: str, slide_dir: str = '', open_slides: int = 512, cache_dir: str = '',
                cache_gb: float = slide_cache.DEFAULT_CACHE_GB) -> PatchSource:
    """The source of a slide layout (`slide_dir`: its slides), patch folder, manifest or dataset
    (a dataset's gs:// or s3:// URL too). `cache_dir`, `cache_gb`: data.cache_dir/cache_gb,
    where slides from a bucket are staged, and an s3:// dataset (in `cache_dir`/datasets)."""
    if slide_source.is_slide_source(path):
        return slide_source.open_slide_source(path, slide_dir, open_slides, cache_dir, cache_gb)
    if slide_dir:
        raise DataError(f'data.slide_dir is set but {path} is not a CLAM/TRIDENT patch '
                        f'folder (no patches/*.h5): drop data.slide_dir or point data.path '
                        f'at the folder holding patches/')
    if storage.is_url(path):
        return _bucket_dataset(path, cache_dir)
    dataset_dir = records_lib.find_tfds_dataset(path) if os.path.isdir(path) else None
    return FileSource(records_lib.discover(path), dataset_dir)


def _bucket_dataset(url: str, cache_dir: str) -> FileSource:
    """A built dataset in a bucket: gs:// read in place by array_record, s3:// (which it
    cannot read) from a local copy of its shards, staged once per host."""
    dataset_dir = records_lib.find_tfds_dataset(url)
    if dataset_dir is None:
        raise DataError(f'{url}: no built dataset (dataset_info.json) there; in a bucket '
                        f'data.path is a built dataset (--mode build_dataset --out {url})')
    if dataset_dir.startswith('s3://'):
        dataset_dir = stage_dataset(dataset_dir, cache_dir)
    return FileSource(records_lib.discover(dataset_dir), dataset_dir)


def stage_dataset(url: str, cache_dir: str = '') -> str:
    """The local copy of the dataset folder `url`: `<cache>/datasets/<sha1 of url>/`, where
    <cache> is `cache_dir` or $XDG_CACHE_HOME/clusiam_jax. Each file is downloaded whole to a
    temporary name then renamed, and `.staged.json` (the objects' storage.version) written last:
    a later open whose objects match it downloads nothing; a changed dataset is staged again.
    The processes of a host take turns (a file lock): one downloads, the others reuse it."""
    root = os.path.join(os.path.abspath(cache_dir), 'datasets') if cache_dir else \
        fileio.cache_root('datasets')
    local = os.path.join(root,
                         hashlib.sha1(url.encode()).hexdigest()[:20])
    names = [n for n in storage.find_files(url) if '/' not in n]
    versions = {'url': url, 'objects': {n: list(storage.version(storage.join(url, n)))
                                        for n in names}}
    if _staged(local, versions):
        return local
    os.makedirs(local, exist_ok=True)
    with open(f'{local}.lock', 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # released when closed (or its process dies)
        if not _staged(local, versions):
            _stage(url, local, versions)
    return local


def _staged(local: str, versions: dict) -> bool:
    with contextlib.suppress(OSError, ValueError), open(os.path.join(local, STAGED_MARKER)) as f:
        return json.load(f) == versions and all(
            os.path.isfile(os.path.join(local, n)) for n in versions['objects'])
    return False


def _stage(url: str, local: str, versions: dict) -> None:
    marker, names = os.path.join(local, STAGED_MARKER), sorted(versions['objects'])
    with contextlib.suppress(FileNotFoundError):
        os.remove(marker)   # what follows may change files the old marker vouched for
    logger.info('staging %s (%d files, %.1f MB) into %s', url, len(names),
                sum(v[0] for v in versions['objects'].values()) / 1e6, local)
    for name in sorted(names, key=lambda n: (n == 'dataset_info.json', n)):
        tmp = os.path.join(local, f'.{name}.tmp')
        storage.download(storage.join(url, name), tmp)
        os.replace(tmp, os.path.join(local, name))
    for stale in set(os.listdir(local)) - set(names):   # an earlier build's, a killed stager's
        os.remove(os.path.join(local, stale))
    with open(f'{marker}.tmp', 'w') as f:
        json.dump(versions, f)
    os.replace(f'{marker}.tmp', marker)


def holdout_slides(source: PatchSource, fraction: float, seed: int):
    """(training, held-out indices): `fraction` of the slides (at least one, never all) held
    out whole, since a monitor set sharing slides with training would flatter it."""
    ids, codes = source.slide_ids, source.slide_index
    if (ids[np.unique(codes)] == '').any():   # no slide ids: the folder is the slide
        keys = [str(ids[c]) or os.path.dirname(source.path(i)) for i, c in enumerate(codes)]
        ids, codes = np.unique(np.array(keys, dtype=object).astype(str), return_inverse=True)
    slides = np.unique(ids[np.unique(codes)])
    if len(slides) < 2:
        raise DataError(f'monitor.holdout needs at least 2 slides in the training source; it '
                        f'has {len(slides)} (give monitor.data_path instead)')
    count = min(len(slides) - 1, max(1, int(round(fraction * len(slides)))))
    held = sorted(np.random.default_rng([seed, 0x401D]).permutation(slides)[:count].tolist())
    if len(slides) < 20:
        logger.warning('monitor.holdout: only %d slides (or folders) in the training source; '
                       'holding out %s. With class folders and no slide ids a folder is a '
                       'class: prefer monitor.data_path', len(slides), held)
    out = np.isin(ids, held)[codes.reshape(-1)]
    return np.flatnonzero(~out), np.flatnonzero(out)
