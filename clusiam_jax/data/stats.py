"""Per-channel normalization statistics over the exact training list (docs/method.md §1).

mean = the mean over images of each image's per-channel mean pixel (in [0, 1]);
std  = the population standard deviation (ddof=0) of the pixels, every image
weighted equally: sqrt(mean over images of E_img[x^2] - mean^2). For images of
one size (the usual case) this is exactly the std over all pixels of the set.

The original computed its stats over a glob one level shallower than the one it
trained on; here they come from the very list the loader trains on (unreadable
files are skipped, as in training). The result is cached in a JSON file next to
the source, keyed by a hash of the file list, so a changed list recomputes.
"""
import concurrent.futures
import hashlib
import json
import logging
import multiprocessing
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tqdm

from clusiam_jax.data import image_io
from clusiam_jax.errors import DataError

logger = logging.getLogger(__name__)

CACHE_NAME = 'clusiam_stats.json'
_CHUNK = 256
_SAMPLE_SEED = 0x57A7


def list_key(paths: Sequence[str]) -> str:
    digest = hashlib.sha1()
    for p in paths:
        digest.update(os.fsencode(p) + b'\n')
    return f'{len(paths)}-{digest.hexdigest()}'


def image_moments(img: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel E[x] and E[x^2] of one uint8 image, x in [0, 1] (float64)."""
    x = img.reshape(-1, 3).astype(np.float64) / 255.0
    return x.mean(axis=0), np.square(x).mean(axis=0)


def _chunk_moments(source, indices):
    """Sums of per-image moments over a chunk, and the unreadable paths."""
    s1, s2, n, bad = np.zeros(3), np.zeros(3), 0, []
    for i in indices:
        try:
            img = source.load(int(i))
        except image_io.BadImageError as e:
            bad.append((source.path(int(i)), str(e)))
            continue
        m1, m2 = image_moments(img)
        s1 += m1
        s2 += m2
        n += 1
    return s1, s2, n, bad


def sample_indices(n: int, size: int) -> np.ndarray:
    """A fixed, sorted sample of `size` of n indices (all when n <= size): slide sources
    have millions of patches, and a few thousand pin the statistics to ~1e-3."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(_SAMPLE_SEED).choice(n, size, replace=False))


def compute_stats(source, num_workers: int = 0, skip_log=None, indices=None):
    """(mean, std) tuples over every readable image of ``source`` (or of ``indices``)."""
    indices = np.arange(len(source)) if indices is None else np.asarray(indices)
    chunks = [indices[i:i + _CHUNK] for i in range(0, len(indices), _CHUNK)]
    total1, total2, count = np.zeros(3), np.zeros(3), 0
    progress = tqdm.tqdm(total=len(indices), desc='normalization stats', unit='img',
                         mininterval=1.0)

    def consume(result, size):
        nonlocal total1, total2, count
        s1, s2, n, bad = result
        total1, total2, count = total1 + s1, total2 + s2, count + n
        for path, reason in bad:
            if skip_log is not None:
                skip_log.record(path, reason)
        progress.update(size)

    if num_workers > 0 and len(chunks) > 1:
        ctx = multiprocessing.get_context('spawn')
        with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
            futures = {pool.submit(_chunk_moments, source, c): len(c) for c in chunks}
            for fut in concurrent.futures.as_completed(futures):
                consume(fut.result(), futures[fut])
    else:
        for c in chunks:
            consume(_chunk_moments(source, c), len(c))
    progress.close()
    if count == 0:
        raise DataError('no readable image to compute normalization stats from')
    mean = total1 / count
    std = np.sqrt(np.maximum(total2 / count - mean ** 2, 0.0))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def cache_paths(data_path: str, workdir: Optional[str],
                dataset_dir: Optional[str] = None) -> List[str]:
    """Where the stats may be cached: next to the source first, then the workdir.

    A built dataset keeps them in its own folder, a patch folder in a hidden
    file at its root, a manifest in ``<manifest>.clusiam_stats.json``.
    """
    data_path = os.path.abspath(data_path)
    if dataset_dir is not None:
        first = os.path.join(dataset_dir, CACHE_NAME)
    elif os.path.isdir(data_path):
        first = os.path.join(data_path, '.' + CACHE_NAME)
    else:
        first = data_path + '.' + CACHE_NAME
    out = [first]
    if workdir:
        out.append(os.path.join(workdir, CACHE_NAME))
    return out


def _read_cache(path: str, key: str):
    try:
        with open(path) as f:
            entry = json.load(f).get(key)
    except (OSError, ValueError):
        return None
    if not entry:
        return None
    return tuple(entry['mean']), tuple(entry['std'])


def _write_cache(path: str, key: str, mean, std) -> bool:
    try:
        try:
            with open(path) as f:
                table = json.load(f)
        except (OSError, ValueError):
            table = {}
        table[key] = {'mean': list(mean), 'std': list(std)}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f'{path}.tmp{os.getpid()}'
        with open(tmp, 'w') as f:
            json.dump(table, f, indent=1)
        os.replace(tmp, path)
        return True
    except OSError:
        return False


def cached_stats(data_path: str, source, workdir: Optional[str] = None,
                 num_workers: int = 0, skip_log=None, indices=None):
    """(mean, std, origin) from the cache, or computed over ``source`` (or the sample
    ``indices`` of it) and cached; origin says which, for the run's record
    (normalization.json)."""
    over = range(len(source)) if indices is None else indices
    key = list_key([source.path(int(i)) for i in over])
    origin = f'computed over the training list of {data_path}'
    if indices is not None and len(indices) < len(source):
        origin = (f'computed over a fixed sample of {len(indices)} of the {len(source)} '
                  f'patches of {data_path}')
    candidates = cache_paths(data_path, workdir, getattr(source, 'dataset_dir', None))
    for path in candidates:
        hit = _read_cache(path, key)
        if hit is not None:
            logger.info('normalization stats from %s: mean %s std %s', path, *hit)
            return hit + (f'{origin} (cached in {path})',)
    mean, std = compute_stats(source, num_workers=num_workers, skip_log=skip_log,
                              indices=indices)
    for path in candidates:
        if _write_cache(path, key, mean, std):
            logger.info('normalization stats cached in %s', path)
            return mean, std, f'{origin} (cached in {path})'
    return mean, std, origin
