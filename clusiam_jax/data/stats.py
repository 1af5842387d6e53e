"""Per-channel normalization statistics over the exact training list, cached by its hash; an
entry made while files were unreadable remembers them, so that repairing them recomputes."""
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
from typing import List, Optional, Sequence

import numpy as np
import tqdm

from clusiam_jax import fileio, interrupts, storage
from clusiam_jax.data import image_io
from clusiam_jax.errors import DataError

logger = logging.getLogger(__name__)

CACHE_NAME = 'clusiam_stats.json'
_CHUNK = 256
_SAMPLE_SEED = 0x57A7
# A flatter channel is a blank or uniform data set, whose normalization would blow noise up.
MIN_STD = 1e-3
MAX_UNREADABLE_TO_CACHE = 0.5   # more: the statistics describe the few files read
_MAX_REMEMBERED = 10000         # unreadable files an entry remembers; with more, no entry
_KEY_VERSION = 'v2'             # older entries predate the checks above: never read


def list_key(paths: Sequence[str]) -> str:
    digest = hashlib.sha1()
    for p in paths:
        digest.update(os.fsencode(p) + b'\n')
    return f'{_KEY_VERSION}-{len(paths)}-{digest.hexdigest()}'


def file_states(paths) -> List[list]:
    """[path, size, mtime_ns] of each distinct file (None, None when missing)."""
    out = []
    for path in sorted(set(paths)):
        try:
            st = os.stat(path)
            out.append([path, st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([path, None, None])
    return out


def check_stats(mean, std, what: str = 'the images'):
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise DataError(f'normalization statistics of {what} are not finite (mean '
                        f'{mean.tolist()}, std {std.tolist()})')
    flat = [c for c, v in zip('RGB', std) if v < MIN_STD]
    if flat:
        raise DataError(f'normalization statistics of {what} have std {std.round(6).tolist()}:'
                        f' channel {", ".join(flat)} is (almost) constant, so the images are '
                        f'blank or uniform (background only, a failed export, one colour); '
                        f'check data.path, or set data.mean and data.std')


def _chunk_moments(source, indices):
    s1, s2, n, bad = np.zeros(3), np.zeros(3), 0, []
    for i in map(int, indices):
        try:
            x = source.load(i).reshape(-1, 3).astype(np.float64) / 255.0
        except image_io.BadImageError as e:
            bad.append((source.path(i), str(e)))
            continue
        s1 += x.mean(axis=0)
        s2 += np.square(x).mean(axis=0)
        n += 1
    return s1, s2, n, bad


def sample_indices(n: int, size: int, seed=_SAMPLE_SEED) -> np.ndarray:
    """A fixed, sorted sample of `size` of n indices (all when n <= size)."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def compute_stats(source, num_workers: int = 0, skip_log=None, indices=None,
                  unreadable: Optional[list] = None, what: str = 'the images'):
    """(mean, std) tuples over the readable images; `unreadable` gets (path, reason)s."""
    indices = np.arange(len(source)) if indices is None else np.asarray(indices)
    chunks = [indices[i:i + _CHUNK] for i in range(0, len(indices), _CHUNK)]
    total1, total2, count = np.zeros(3), np.zeros(3), 0
    with contextlib.ExitStack() as stack:
        progress = stack.enter_context(tqdm.tqdm(total=len(indices), desc='normalization stats',
                                                 unit='img', mininterval=1.0))
        if num_workers > 0 and len(chunks) > 1:   # workers ignore the terminal's signals
            pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
                num_workers, mp_context=multiprocessing.get_context('spawn'),
                initializer=interrupts.worker_initializer()))
            futures = {pool.submit(_chunk_moments, source, c): len(c) for c in chunks}
            results = ((f.result(), futures[f]) for f in concurrent.futures.as_completed(futures))
        else:
            results = ((_chunk_moments(source, c), len(c)) for c in chunks)
        for (s1, s2, n, bad), size in results:
            interrupts.check()  # a safe point per chunk
            total1, total2, count = total1 + s1, total2 + s2, count + n
            for path, reason in bad:
                if unreadable is not None:
                    unreadable.append((path, reason))
                if skip_log is not None:
                    skip_log.record(path, reason)
            progress.update(size)
    if count == 0:
        raise DataError(f'no readable image to compute normalization stats from '
                        f'({len(indices)} of {what} tried)')
    mean = total1 / count
    std = np.sqrt(np.maximum(total2 / count - mean ** 2, 0.0))
    check_stats(mean, std, f'{what} ({count} images read)')
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def cache_file(data_path: str, dataset_dir: Optional[str] = None) -> str:
    source = os.path.abspath(dataset_dir if dataset_dir is not None else data_path)
    digest = hashlib.sha1(os.fsencode(source)).hexdigest()
    return os.path.join(fileio.cache_root('stats'), f'{digest}.json')


def _read_cache(path: str, key: str):
    """(mean, std) of the entry `key`; None when absent, degenerate or stale."""
    try:
        with open(path) as f:
            entry = json.load(f).get(key)
        mean, std = tuple(entry['mean']), tuple(entry['std'])
        remembered = entry.get('unreadable_files') or []
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    try:
        check_stats(mean, std)
    except DataError:
        logger.warning('normalization cache %s holds degenerate statistics (std %s); '
                       'recomputing', path, list(std))
        return None
    if remembered and file_states(p for p, *_ in remembered) != remembered:
        logger.info('normalization cache %s was computed while %d files were unreadable; '
                    'some have changed since (repaired?): recomputing', path, len(remembered))
        return None
    return mean, std


def _write_cache(path: str, key: str, mean, std, unreadable_files) -> bool:
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError):
        table = {}
    table = table if isinstance(table, dict) else {}
    table[key] = {'mean': list(mean), 'std': list(std)}
    if unreadable_files:
        table[key]['unreadable_files'] = list(unreadable_files)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fileio.write_json(path, table, indent=1)
        return True
    except OSError:
        return False


def cached_stats(data_path: str, source, workdir: Optional[str] = None,
                 num_workers: int = 0, skip_log=None, indices=None):
    """(mean, std, origin) from the cache, or computed and cached; origin says which."""
    over = range(len(source)) if indices is None else indices
    key = list_key([source.path(int(i)) for i in over])
    origin = f'computed over the training list of {data_path}'
    if indices is not None and len(indices) < len(source):
        origin = (f'computed over a fixed sample of {len(indices)} of the {len(source)} '
                  f'patches of {data_path}')
    candidates = [cache_file(data_path, source.dataset_dir)]   # then the run's folder
    # A work directory in a bucket keeps none (normalization.json records what the run used).
    candidates += ([os.path.join(os.path.abspath(workdir), CACHE_NAME)]
                   if workdir and not storage.is_url(workdir) else [])
    for path in candidates:
        hit = _read_cache(path, key)
        if hit is not None:
            logger.info('normalization stats from %s: mean %s std %s', path, *hit)
            return hit + (f'{origin} (cached in {path})',)
    unreadable = []
    mean, std = compute_stats(source, num_workers=num_workers, skip_log=skip_log,
                              indices=indices, unreadable=unreadable,
                              what=f'the patches of {data_path}')
    files = file_states(p.split('#x=', 1)[0] for p, _ in unreadable)   # a slide's file
    if len(unreadable) > MAX_UNREADABLE_TO_CACHE * len(over) or len(files) > _MAX_REMEMBERED:
        logger.warning('normalization: %d of the %d patches sampled from %s were unreadable '
                       '(skipped_files.txt); the statistics of the others are used but not '
                       'cached', len(unreadable), len(over), data_path)
        return mean, std, f'{origin}; {len(unreadable)} of {len(over)} unreadable, not cached'
    for path in candidates:
        if _write_cache(path, key, mean, std, files):
            logger.info('normalization stats cached in %s', path)
            return mean, std, f'{origin} (cached in {path})'
    return mean, std, origin
