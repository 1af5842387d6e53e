"""Slides in a bucket, opened for training and export (issue 25). A slide with a tile index
(slides/tile_index.py) is a reader.RemoteSlide: the levels the local Slide reads directly come
by exact byte ranges; the levels it reads through OpenSlide, and slides without an index
(formats only OpenSlide reads), come from the slide staged whole into a bounded per-host cache.

Requests in flight per host: one storage.read_ranges per patch, all the tiles the patch needs
at once (about 4 for 224 px over 256 px tiles), per reading thread: data.num_workers workers x
grain's one read thread each. Patches are read in the epoch plan's random order, so tiles
seldom repeat; more in flight needs more workers (each a process with its own handles).
"""
import fcntl
import hashlib
import logging
import os
import shutil
import socket
import tempfile
import time
from typing import Callable, Optional, Tuple

from clusiam_jax import fileio, storage
from clusiam_jax.errors import DataError
from clusiam_jax.slides import listing, reader

log = logging.getLogger('clusiam_jax')

DEFAULT_CACHE_GB = 50.0
# Staging folders are named `.staging-<pid>@<host>@...`: this host's dead processes' are removed
# at the next staging or eviction; another host's (a cache on a shared disk) once this old.
STALE_STAGING_S = 6 * 3600
_STAGING = '.staging-'
_LOCK = '.lock'
_unindexed_warned = set()   # slides told once per process to have no tile index


def default_cache_dir() -> str:
    return fileio.cache_root('slides')


class SlideCache:
    """Whole slides staged from a bucket into `folder`, at most `max_bytes` in all, the least
    recently opened evicted first. Several processes of one host share it: a slide is
    downloaded to a staging folder then renamed into place, and the accounting and renames
    happen under an flock of `folder/.lock` (held for metadata only, never for a download).
    A slide evicted while another process has it open stays readable to that process (its
    files are unlinked, not truncated); a slide larger than the whole cache is refused."""

    def __init__(self, folder: str = '', max_bytes: Optional[float] = None):
        self.folder = folder or default_cache_dir()
        self.max_bytes = int(DEFAULT_CACHE_GB * 2 ** 30 if max_bytes is None else max_bytes)
        self.hits = self.misses = 0

    def open(self, url: str, version: Tuple[int, str], opener: Callable[[str], object]):
        """opener(local path) of the slide at `url` in `version` (storage.version), staged
        first when not cached; the open happens under the lock, so no eviction races it. A
        slide of several objects (MIRAX, DICOM) is keyed by every object's version, from one
        listing each open: a changed sidecar is staged again."""
        others = listing.sidecars(url)
        files = [storage.split(url)[1]] + list(others)
        versions = [(files[0],) + tuple(version)] + [(rel,) + others[rel] for rel in files[1:]]
        text = '\0'.join([url] + [f'{rel}\0{size}\0{etag}' for rel, size, etag in versions])
        key = hashlib.sha256(text.encode()).hexdigest()[:32]
        entry = os.path.join(self.folder, key)
        os.makedirs(self.folder, exist_ok=True)
        with self._locked() as lock:
            if os.path.isdir(entry):
                lock.touch(entry)
                self.hits += 1
                storage.telemetry.note(cache_hits=1)
                return opener(listing.local_slide(url, entry))
        size = sum(v[1] for v in versions)
        if size > self.max_bytes:
            raise reader.SlideError(f'{url}: {size / 2 ** 30:.3g} GiB, more than the '
                                    f'whole slide cache (data.cache_gb '
                                    f'{self.max_bytes / 2 ** 30:.3g})')
        listing.remove_dead_staging(self.folder, _STAGING)
        staging = tempfile.mkdtemp(prefix=f'{_STAGING}{listing.owner_tag()}@', dir=self.folder)
        try:
            listing.stage_into(url, staging, files)
            with self._locked() as lock:
                self.misses += 1
                storage.telemetry.note(cache_misses=1)
                if not os.path.isdir(entry):   # else another process staged it meanwhile
                    self._evict(_size(staging))
                    os.rename(staging, entry)
                lock.touch(entry)
                return opener(listing.local_slide(url, entry))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def used_bytes(self) -> int:
        return sum(_size(os.path.join(self.folder, n)) for n in self._entries())

    def _entries(self):
        return [n for n in os.listdir(self.folder) if not n.startswith('.')]

    def _evict(self, incoming: int):
        """Removes the least recently opened slides until `incoming` more bytes fit."""
        now, host = time.time(), socket.gethostname()
        listing.remove_dead_staging(self.folder, _STAGING)
        for name in os.listdir(self.folder):
            path = os.path.join(self.folder, name)
            owner = listing.staging_owner(name, _STAGING)
            if (name.startswith(_STAGING) and (owner is None or owner[1] != host)
                    and now - os.path.getmtime(path) > STALE_STAGING_S):
                shutil.rmtree(path, ignore_errors=True)
        entries = sorted((os.stat(os.path.join(self.folder, n)).st_mtime_ns, n)
                         for n in self._entries())
        used = sum(_size(os.path.join(self.folder, n)) for _, n in entries)
        for _, name in entries:
            if used + incoming <= self.max_bytes:
                break
            path = os.path.join(self.folder, name)
            used -= _size(path)
            shutil.rmtree(path, ignore_errors=True)

    def _locked(self):
        return _FileLock(os.path.join(self.folder, _LOCK))


class _FileLock:
    """flock of the cache's lock file, which also holds the last LRU stamp: file times tick
    coarsely (ms), so two opens in one tick would tie; stamps strictly increase."""

    def __init__(self, path):
        self.path = path

    def touch(self, entry: str):
        """Marks `entry` opened now: its mtime set to a stamp above every earlier one."""
        raw = os.pread(self.fd, 32, 0)
        stamp = max(time.time_ns(), int(raw or b'0') + 1)
        os.pwrite(self.fd, str(stamp).encode().ljust(32), 0)
        os.utime(entry, ns=(stamp, stamp))

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder)
               for f in files)


def open_remote_slide(url: str, index_url: str, cache: SlideCache, openslide_cache=None,
                      tile_cache=None) -> reader.Slide:
    """The slide at `url`: a RemoteSlide from its tile index at `index_url` ('' or no such
    object: none), else the slide staged whole. One HEAD (the slide's size and ETag: a slide
    written again must not be read through an old index or cached copy) and one GET of the
    index per open; no read of the slide's header. `tile_cache`: a remote_tiles.TileCache
    shared by the caller's slides."""
    from clusiam_jax.slides import remote_tiles, tile_index
    version = storage.version(url)
    storage.telemetry.note(slides_opened=1)

    def stage():
        return cache.open(url, version, lambda local: reader.open_slide(local,
                                                                        cache=openslide_cache))
    raw = None
    if index_url:
        try:
            raw = storage.read_bytes(index_url)
        except (storage.Unreadable, FileNotFoundError):   # none, or failing: which?
            if storage.exists(index_url):
                raise
    if raw is None:
        _warn_unindexed(url, index_url)
        return stage()
    try:   # an index of another version or another state of the slide: this slide's error
        index = tile_index.TileIndex.from_bytes(raw, version[0], index_url, etag=version[1])
    except DataError as e:
        raise reader.SlideError(str(e)) from None
    if not index.layout:
        raise reader.SlideError(f"{index_url}: a tile index without the slide's layout; tile "
                                f'the slide again')
    tiles = remote_tiles.RemoteTiles(index, url, storage.read_ranges, cache=tile_cache)
    return reader.RemoteSlide(index.layout, tiles, stage, url)


def _warn_unindexed(url: str, index_url: str) -> None:
    """Once per slide and process: a slide without an index is downloaded whole on every host."""
    if url in _unindexed_warned:
        return
    _unindexed_warned.add(url)
    where = f'none at {index_url}' if index_url else 'no tile index folder'
    log.warning('%s: no tile index (%s): every host downloads the whole slide into its slide '
                'cache. Tiling the slides from the bucket writes one, except for formats only '
                'OpenSlide reads (not TIFF-based)', url, where)
