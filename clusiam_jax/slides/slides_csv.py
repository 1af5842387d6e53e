"""`slides.csv`, the table of a tiling folder (one row per slide): `--mode tile` writes it,
the slide source reads it; nothing else opens it.
"""
import contextlib
import errno
import os
from typing import Dict, List, Optional

from clusiam_jax import fileio, storage
from clusiam_jax.errors import DataError

SLIDES_CSV = 'slides.csv'
SLIDES_FIELDS = ('slide_id', 'path', 'label', 'level0_mpp', 'mpp_origin', 'n_patches',
                 'tissue_fraction', 'status', 'reason')
# status values
TILED, NO_TISSUE, NO_MPP, UNREADABLE = 'tiled', 'no_tissue', 'no_mpp', 'unreadable'
BAD_ID, TOO_LARGE, DUPLICATE_ID = 'bad_id', 'too_large', 'duplicate_id'
BAD_MPP = 'bad_mpp'   # the slide's metadata µm/px is no scan's (reader.implausible_mpp)
# mpp_origin of a µm/px from the config
OVERRIDE_ORIGIN, DEFAULT_ORIGIN = 'tile.mpp_override', 'tile.mpp_default'
# A full disk or quota, also inside h5py's messages (which carry no errno).
_FULL = (errno.ENOSPC, errno.EDQUOT)


class OutputError(DataError):
    """Writing the output failed (a full disk, a read-only folder): the job stops."""


@contextlib.contextmanager
def writing(path: str):
    """Turns a failure to write `path` into the job's OutputError (one line)."""
    try:
        yield
    except OutputError:
        raise
    except DataError as e:   # a bucket refused the upload (storage told why, in one line)
        raise OutputError(f'{e}: fix the output bucket and rerun; finished slides are '
                          f'kept') from None
    except OSError as e:
        text = ' '.join(str(e).split())
        if e.errno in _FULL or any(os.strerror(c) in text for c in _FULL):
            raise OutputError(f'out of space writing {path}: free space and rerun; finished '
                              f'slides are kept') from None
        raise OutputError(f'cannot write {path} ({e.strerror or text}): fix the output '
                          f'folder and rerun; finished slides are kept') from None


def has_table(folder: str, name: str = SLIDES_CSV) -> bool:
    return storage.isfile(storage.join(folder, name))


def part_name(host_index: int, host_count: int) -> str:
    """The part of slides.csv one host of a split tiling writes (tile.host_index)."""
    return f'slides-{host_index}-of-{host_count}.csv'


def row(entry, status: str, reason: str = '', mpp: Optional[float] = None, origin: str = '',
        n: int = 0, fraction: Optional[float] = None) -> dict:
    return {'slide_id': entry.slide_id, 'path': entry.path, 'label': entry.label,
            'level0_mpp': '' if mpp is None else f'{mpp:.6g}', 'mpp_origin': origin,
            'n_patches': n, 'tissue_fraction': '' if fraction is None else f'{fraction:.4f}',
            'status': status, 'reason': reason}


def read_rows(folder: str, name: str = SLIDES_CSV) -> List[dict]:
    """The rows of `folder`'s slides.csv (or a host's part), every field present."""
    _, rows = fileio.read_csv_rows(storage.join(folder, name), name)
    return [{k: r.get(k) or '' for k in SLIDES_FIELDS} for r in rows]


def tiled_rows(folder: str) -> List[dict]:
    rows = [r for r in read_rows(folder) if r['status'] == TILED]
    if not rows:
        raise DataError(f'{folder}: slides.csv lists no tiled slide (see its status and '
                        f'reason columns)')
    return rows


def current_rows(folder: str, name: str = SLIDES_CSV) -> List[dict]:
    """The rows slides.csv has now, on disk or in a bucket ([] without one), also of a job
    writing there meanwhile."""
    if not has_table(folder, name):
        return []
    try:
        return read_rows(folder, name)
    except DataError as e:
        raise DataError(f'{e}: it lists the slides tiled there; move it away to start the '
                        f'list anew') from None


def write(folder: str, finished: Dict[str, List[dict]], order: List[str],
          name: str = SLIDES_CSV):
    """slides.csv: the rows stored, read again now, with this job's `finished` rows (slide
    id -> its rows) in place of theirs and new slides after them; rows of slides not
    finished (yet) are kept: their coordinate files are still there."""
    rows, on_disk = [], {}
    for r in current_rows(folder, name):
        on_disk.setdefault(r['slide_id'], []).append(r)
    for slide_id, found in on_disk.items():
        if slide_id in finished:
            rows.extend(finished[slide_id])
        elif all(r['status'] == DUPLICATE_ID for r in found):
            rows.extend({r['path']: r for r in found}.values())
        else:
            rows.append(found[0])
    rows += [r for s in order if s in finished and s not in on_disk for r in finished[s]]
    path = storage.join(folder, name)
    with writing(path):
        fileio.write_csv(path, SLIDES_FIELDS, rows)


def merge_parts(folder: str, order: List[str], shares: List[set]) -> Optional[List[dict]]:
    """slides.csv from the hosts' parts (`shares`: each host's slide ids) once every part
    has rows for its whole share, as one host tiling `order` writes it; None before."""
    finished: Dict[str, List[dict]] = {}
    for host, share in enumerate(shares):
        found: Dict[str, List[dict]] = {}
        for r in current_rows(folder, part_name(host, len(shares))):
            found.setdefault(r['slide_id'], []).append(r)
        if not share <= set(found):
            return None
        finished.update((s, found[s]) for s in share)
    write(folder, finished, order)
    return [r for s in order for r in finished[s]]
