"""Per-channel normalization statistics over the exact training list (docs/method.md §1).

mean = the mean over images of each image's per-channel mean pixel (in [0, 1]);
std  = the population standard deviation (ddof=0) of the pixels, every image
weighted equally: sqrt(mean over images of E_img[x^2] - mean^2). For images of
one size (the usual case) this is exactly the std over all pixels of the set.

The original computed its stats over a glob one level shallower than the one it
trained on; here they come from the very list the loader trains on (unreadable
files are skipped, as in training). The result is cached, keyed by a hash of the file
list (a changed list recomputes), in the user's cache folder
(`$XDG_CACHE_HOME/clusiam_jax/stats/<sha1 of the source's path>.json`, default
`~/.cache`), else in the run's folder: never inside the source, which is input (it may
be read-only, shared, or another user's).

Statistics that would poison every run reading them are never used or cached: a
channel with (almost) no spread (a blank or uniform data set: normalizing by it
blows the inputs up) is refused; statistics from a sample that was mostly unreadable
are used by the run that computed them but not cached, and an entry made while some
files were unreadable remembers their size and modification time, so that repairing
them recomputes.
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

from clusiam_jax import interrupts
from clusiam_jax.data import image_io
from clusiam_jax.errors import DataError

logger = logging.getLogger(__name__)

CACHE_NAME = 'clusiam_stats.json'
# Below $XDG_CACHE_HOME (default ~/.cache): one file per patch source.
CACHE_SUBDIR = os.path.join('clusiam_jax', 'stats')
_CHUNK = 256
_SAMPLE_SEED = 0x57A7
# Below this std (pixels in [0, 1]) a channel is flat: a blank or uniform data set, whose
# normalization would multiply noise by a thousand or more. Stained tissue has ~0.1-0.3.
MIN_STD = 1e-3
# More unreadable than this fraction of the images: the statistics describe the few that
# could be read, not the source once it is repaired: they are not cached.
MAX_UNREADABLE_TO_CACHE = 0.5
# Unreadable files an entry remembers (to notice their repair); with more, no entry.
_MAX_REMEMBERED = 10000
# Entries without this prefix were written before the checks above (one may hold a zero
# std or statistics of a mostly unreadable sample): they are never read.
_KEY_VERSION = 'v2'


def list_key(paths: Sequence[str]) -> str:
    digest = hashlib.sha1()
    for p in paths:
        digest.update(os.fsencode(p) + b'\n')
    return f'{_KEY_VERSION}-{len(paths)}-{digest.hexdigest()}'


def _file_of(path: str) -> str:
    """The file behind a patch path: a slide source's patches are `<slide>#x=..,y=..`
    (data/slide_source.py), whose file is the slide."""
    return path.split('#x=', 1)[0]


def file_states(paths) -> List[list]:
    """[path, size, mtime_ns] of each distinct file (size and mtime None when missing):
    what changes when a file is replaced or repaired."""
    out = []
    for path in sorted(set(paths)):
        try:
            st = os.stat(path)
            out.append([path, st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([path, None, None])
    return out


def check_stats(mean, std, what: str = 'the images'):
    """DataError (one line) for statistics no run should use: a channel whose std is
    below MIN_STD, or a value that is not finite."""
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


def compute_stats(source, num_workers: int = 0, skip_log=None, indices=None,
                  unreadable: Optional[list] = None, what: str = 'the images'):
    """(mean, std) tuples over every readable image of ``source`` (or of ``indices``);
    the (path, reason) of each unreadable one is appended to ``unreadable``. DataError
    when nothing was readable or the statistics are degenerate (check_stats)."""
    indices = np.arange(len(source)) if indices is None else np.asarray(indices)
    chunks = [indices[i:i + _CHUNK] for i in range(0, len(indices), _CHUNK)]
    total1, total2, count = np.zeros(3), np.zeros(3), 0
    progress = tqdm.tqdm(total=len(indices), desc='normalization stats', unit='img',
                         mininterval=1.0)

    def consume(result, size):
        nonlocal total1, total2, count
        interrupts.check()  # a safe point per chunk
        s1, s2, n, bad = result
        total1, total2, count = total1 + s1, total2 + s2, count + n
        for path, reason in bad:
            if unreadable is not None:
                unreadable.append((path, reason))
            if skip_log is not None:
                skip_log.record(path, reason)
        progress.update(size)

    if num_workers > 0 and len(chunks) > 1:
        ctx = multiprocessing.get_context('spawn')
        # Workers ignore the terminal's signals and exit when this process is killed.
        with concurrent.futures.ProcessPoolExecutor(
                num_workers, mp_context=ctx, initializer=interrupts.worker_initializer()) as pool:
            futures = {pool.submit(_chunk_moments, source, c): len(c) for c in chunks}
            for fut in concurrent.futures.as_completed(futures):
                consume(fut.result(), futures[fut])
    else:
        for c in chunks:
            consume(_chunk_moments(source, c), len(c))
    progress.close()
    if count == 0:
        raise DataError(f'no readable image to compute normalization stats from '
                        f'({len(indices)} of {what} tried)')
    mean = total1 / count
    std = np.sqrt(np.maximum(total2 / count - mean ** 2, 0.0))
    check_stats(mean, std, f'{what} ({count} images read)')
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def cache_file(data_path: str, dataset_dir: Optional[str] = None) -> str:
    """The user-level cache file of a patch source (a built dataset: its dataset folder):
    `$XDG_CACHE_HOME/clusiam_jax/stats/<sha1 of its absolute path>.json`."""
    root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'),
                                                            '.cache')
    source = os.path.abspath(dataset_dir if dataset_dir is not None else data_path)
    digest = hashlib.sha1(os.fsencode(source)).hexdigest()
    return os.path.join(os.path.abspath(root), CACHE_SUBDIR, f'{digest}.json')


def cache_paths(data_path: str, workdir: Optional[str],
                dataset_dir: Optional[str] = None) -> List[str]:
    """Where the stats are cached, in order: the user's cache folder (cache_file, shared
    by every run on the source), then the run's folder (when the first cannot be
    written). Never inside the source: `data.path` is input."""
    out = [cache_file(data_path, dataset_dir)]
    if workdir:
        out.append(os.path.join(os.path.abspath(workdir), CACHE_NAME))
    return out


def _read_cache(path: str, key: str):
    """(mean, std) of the entry `key`, or None when there is none or it must not be used:
    degenerate, or made while files were unreadable that have changed since."""
    try:
        with open(path) as f:
            entry = json.load(f).get(key)
        if not entry:
            return None
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


def _write_cache(path: str, key: str, mean, std, unreadable_files=()) -> bool:
    try:
        try:
            with open(path) as f:
                table = json.load(f)
            if not isinstance(table, dict):
                table = {}
        except (OSError, ValueError):
            table = {}
        table[key] = {'mean': list(mean), 'std': list(std)}
        if unreadable_files:
            table[key]['unreadable_files'] = list(unreadable_files)
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
    unreadable = []
    mean, std = compute_stats(source, num_workers=num_workers, skip_log=skip_log,
                              indices=indices, unreadable=unreadable,
                              what=f'the patches of {data_path}')
    if len(unreadable) > MAX_UNREADABLE_TO_CACHE * len(over):
        logger.warning('normalization: %d of the %d patches sampled from %s were unreadable '
                       '(listed in skipped_files.txt); this run uses the statistics of the '
                       'other %d, which are not cached: once the source is repaired they '
                       'are computed again', len(unreadable), len(over), data_path,
                       len(over) - len(unreadable))
        return mean, std, f'{origin}; {len(unreadable)} of {len(over)} unreadable, not cached'
    files = file_states(_file_of(p) for p, _ in unreadable)
    if len(files) > _MAX_REMEMBERED:
        logger.warning('normalization: %d files of %s were unreadable; the statistics are '
                       'not cached', len(files), data_path)
        return mean, std, f'{origin}; {len(unreadable)} unreadable, not cached'
    for path in candidates:
        if _write_cache(path, key, mean, std, files):
            logger.info('normalization stats cached in %s', path)
            return mean, std, f'{origin} (cached in {path})'
    return mean, std, origin
