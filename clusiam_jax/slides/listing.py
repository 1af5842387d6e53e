"""The slides of `tile.slides`: the slide files under a folder (a folder of DICOM
instances is one slide, named after the folder), or the rows of a CSV of slides; a slide in
a bucket staged to local files (`staged`) for the readers that only read those."""
import contextlib
import dataclasses
import os
import posixpath
import shutil
import socket
import tempfile
from typing import Dict, Iterator, List, Optional, Tuple

from clusiam_jax import fileio, storage, workdir_lock
from clusiam_jax.errors import DataError
from clusiam_jax.slides import reader, slides_csv


@dataclasses.dataclass(frozen=True)
class SlideEntry:
    slide_id: str
    path: str
    mpp: Optional[float] = None   # the CSV's `mpp` column
    label: str = ''


# Sidecars by slide extension, neither slides nor skipped files (VMS/VMU: JPEG tiles, .opt).
_SIDECARS = {'.vms': ('.jpg', '.jpeg', '.opt'), '.vmu': ('.jpg', '.jpeg', '.opt')}


def find_slides(folder: str):
    """(the slides under `folder`, {extension: count} of the other files but those slides
    need); hidden files and a MIRAX slide's data folder (`X/` by `X.mrxs`) left out."""
    if storage.is_url(folder):
        return _find_in_bucket(folder)
    found, skipped = [], {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        names = sorted(n for n in filenames if not n.startswith('.'))
        mirax = _scan(dirpath, names, found, skipped)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.') and d not in mirax)
    return sorted(found, key=lambda e: e.path), skipped


def _scan(dirpath: str, names: List[str], found: List[SlideEntry], skipped: Dict[str, int]):
    """Adds the slides of one folder's visible `names` to `found`, the other files to
    `skipped`; returns the names of its MIRAX data folders."""
    lower = [n.lower() for n in names]
    mirax = {os.path.splitext(n)[0] for n, low in zip(names, lower) if low.endswith('.mrxs')}
    needed = tuple(e for low in lower for ext, sidecars in _SIDECARS.items()
                   if low.endswith(ext) for e in sidecars)
    if any(low.endswith(reader.DICOM_EXTENSION) for low in lower):
        dicom = (storage.join(dirpath, min(n for n, low in zip(names, lower)
                                           if low.endswith(reader.DICOM_EXTENSION)))
                 if storage.is_url(dirpath) else reader.dicom_file(dirpath, names))
        found.append(SlideEntry(storage.split(dirpath)[1], dicom))
    for name, low in zip(names, lower):
        if low.endswith(reader.SLIDE_EXTENSIONS):
            path = storage.join(dirpath, name)
            found.append(SlideEntry(reader.slide_id_of(path), path))
        elif not low.endswith((reader.DICOM_EXTENSION,) + needed):
            ext = os.path.splitext(low)[1] or 'without extension'
            skipped[ext] = skipped.get(ext, 0) + 1
    return mirax


def _find_in_bucket(folder: str):
    """find_slides over a bucket's flat listing, folder by folder as os.walk gives them."""
    folder = folder.rstrip('/')
    names: Dict[str, List[str]] = {}
    for rel in storage.find_files(folder):
        parent, name = posixpath.split(rel)
        names.setdefault(parent, []).append(name)
    found, skipped, mirax = [], {}, {}

    def hidden(rel: str) -> bool:   # under a hidden or MIRAX data folder
        if not rel:
            return False
        parent, name = posixpath.split(rel)
        return hidden(parent) or name.startswith('.') or name in mirax.get(parent, ())

    for rel in sorted(names, key=lambda r: (r.count('/') if r else -1, r)):   # parents first
        if not hidden(rel):
            visible = sorted(n for n in names[rel] if not n.startswith('.'))
            mirax[rel] = _scan(storage.join(folder, rel) if rel else folder, visible, found,
                               skipped)
    return sorted(found, key=lambda e: e.path), skipped


def skipped_line(skipped: Dict[str, int]) -> str:
    """'12 files that are not slides: 8 .txt, 4 .json' ('' when none)."""
    if not skipped:
        return ''
    n = sum(skipped.values())
    kinds = ', '.join(f'{c} {e}' for e, c in sorted(skipped.items(), key=lambda i: (-i[1], i[0])))
    return f'{n} file{"s" if n > 1 else ""} that {"are" if n > 1 else "is"} not slides: {kinds}'


def read_slide_list(path: str) -> List[SlideEntry]:
    _, rows = fileio.read_path_csv(path, 'tile.slides CSV', 'path[,slide_id][,mpp][,label]')
    entries = []
    for line, row in enumerate(rows, start=2):
        slide_path = row['path']
        if not storage.is_url(slide_path) and os.path.isdir(slide_path):   # DICOM instances
            slide_path = reader.dicom_file(slide_path) or slide_path
        mpp_text = (row.get('mpp') or '').strip()
        try:
            mpp = float(mpp_text) if mpp_text else None
        except ValueError:
            raise DataError(f'{path}:{line}: "mpp" is not a number: {mpp_text!r}') from None
        if mpp is not None and not mpp > 0:
            raise DataError(f'{path}:{line}: "mpp" must be positive, got {mpp_text}')
        entries.append(SlideEntry((row.get('slide_id') or '').strip()
                                  or reader.slide_id_of(slide_path), slide_path, mpp,
                                  (row.get('label') or '').strip()))
    return entries


def duplicate_rows(entries: List[SlideEntry]) -> Dict[int, dict]:
    """{index in entries: its row} of every slide whose id another has too: none is tiled."""
    paths: Dict[str, List[str]] = {}
    for e in entries:
        paths.setdefault(e.slide_id, []).append(e.path)
    rows = {}
    for i, e in enumerate(entries):
        group = paths[e.slide_id]
        if len(group) < 2:
            continue
        others = sorted(group)
        others.remove(e.path)
        where = ('listed again' if all(p == e.path for p in others) else
                 f'also {", ".join(others)}')
        rows[i] = slides_csv.row(
            e, slides_csv.DUPLICATE_ID, f'{len(group)} slides have the id {e.slide_id!r} '
            f'({where}); none of them is tiled: give each its own id (the slide_id column '
            f'of a slide CSV, tile.slides=slides.csv) or remove the copies')
    return rows


# Slides of several files that `staged` cannot gather (VMS/VMU: sidecars named in the file).
UNSTAGED = ('.vms', '.vmu')


# `staged` downloads into <tmp>/clusiam-staging/<pid>@<host>/: a process of this host removes
# the folders of its dead processes (a SIGKILL runs no cleanup) when it first stages a slide.
STAGING_PARENT = 'clusiam-staging'
_cleaned = set()


@contextlib.contextmanager
def staged(path: str) -> Iterator[str]:
    """The slide at `path` as a local file, downloaded with the files it needs (stage_into)
    and deleted after; `path` itself when local."""
    if not storage.is_url(path):
        yield path
        return
    parent = os.path.join(tempfile.gettempdir(), STAGING_PARENT)
    if parent not in _cleaned:
        remove_dead_staging(parent, '')
        _cleaned.add(parent)
    mine = os.path.join(parent, owner_tag())
    os.makedirs(mine, exist_ok=True)
    folder = tempfile.mkdtemp(dir=mine)
    try:
        yield stage_into(path, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def slide_files(url: str) -> List[str]:
    """The objects a slide in a bucket is read from, relative to its folder, the slide first
    (then its sidecars)."""
    return [storage.split(url)[1]] + list(sidecars(url))


def sidecars(url: str) -> Dict[str, Tuple[int, str]]:
    """{object relative to the slide's folder: storage.version} of the other objects OpenSlide
    reads with the slide at `url`, from one listing: a MIRAX slide's data folder `X/` by
    `X.mrxs`, every other .dcm instance of a DICOM folder (the levels are spread over them);
    {} for a slide of one file (no request)."""
    parent, name = storage.split(url)
    low = name.lower()
    if low.endswith('.mrxs'):
        data = name[:-len('.mrxs')]
        return {f'{data}/{rel}': v
                for rel, v in storage.versions(storage.join(parent, data)).items()}
    if low.endswith(reader.DICOM_EXTENSION):
        return {n: v for n, v in storage.versions(parent, recursive=False).items()
                if n.lower().endswith(reader.DICOM_EXTENSION) and n != name}
    return {}


def stage_into(url: str, folder: str, files: Optional[List[str]] = None) -> str:
    """Downloads the slide at `url` (`files`: slide_files(url)) into the empty local `folder`;
    returns the file to open (local_slide)."""
    parent = storage.split(url)[0]
    into = _local_parent(url, folder)
    for rel in slide_files(url) if files is None else files:
        local = os.path.join(into, *rel.split('/'))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        storage.download(storage.join(parent, rel), local)
    return local_slide(url, folder)


def local_slide(url: str, folder: str) -> str:
    """The file to open of the slide at `url` staged into `folder`: a DICOM folder's instance
    OpenSlide detects as the slide (reader.dicom_file), as on disk; else the slide's own."""
    into, name = _local_parent(url, folder), storage.split(url)[1]
    if name.lower().endswith(reader.DICOM_EXTENSION):
        return reader.dicom_file(into) or os.path.join(into, name)
    return os.path.join(into, name)


def _local_parent(url: str, folder: str) -> str:
    """A DICOM slide's instances go to a subfolder named as theirs (the slide's id)."""
    parent, name = storage.split(url)
    if name.lower().endswith(reader.DICOM_EXTENSION):
        return os.path.join(folder, storage.split(parent)[1])
    return folder


def owner_tag() -> str:
    """'<pid>@<host>': names a staging folder so its owner's death can be told ('@' is in no
    host name, so no host's tag begins another's)."""
    return f'{os.getpid()}@{socket.gethostname()}'


def staging_owner(name: str, prefix: str) -> Optional[Tuple[int, str]]:
    """(pid, host) of a folder named `<prefix><owner_tag>[@...]`, else None."""
    if not name.startswith(prefix):
        return None
    parts = name[len(prefix):].split('@')
    return (int(parts[0]), parts[1]) if len(parts) > 1 and parts[0].isdigit() else None


def remove_dead_staging(parent: str, prefix: str) -> None:
    """Removes the folders `<prefix><pid>@<host>...` in `parent` of this host's processes that
    no longer run (other hosts' are left: their pids mean nothing here)."""
    host = socket.gethostname()
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(parent):
            owner = staging_owner(name, prefix)
            if owner and owner[1] == host and not workdir_lock.pid_alive(owner[0]):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
