"""`slides.csv`, the table of a tiling folder (one row per slide): `--mode tile` writes it,
the slide source reads it; nothing else opens it.
"""
import contextlib
import errno
import os
from typing import Dict, List, Optional

from clusiam_jax import fileio
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
    except OSError as e:
        text = ' '.join(str(e).split())
        if e.errno in _FULL or any(os.strerror(c) in text for c in _FULL):
            raise OutputError(f'out of space writing {path}: free space and rerun; finished '
                              f'slides are kept') from None
        raise OutputError(f'cannot write {path} ({e.strerror or text}): fix the output '
                          f'folder and rerun; finished slides are kept') from None


def has_table(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, SLIDES_CSV))


def row(entry, status: str, reason: str = '', mpp: Optional[float] = None, origin: str = '',
        n: int = 0, fraction: Optional[float] = None) -> dict:
    return {'slide_id': entry.slide_id, 'path': entry.path, 'label': entry.label,
            'level0_mpp': '' if mpp is None else f'{mpp:.6g}', 'mpp_origin': origin,
            'n_patches': n, 'tissue_fraction': '' if fraction is None else f'{fraction:.4f}',
            'status': status, 'reason': reason}


def read_rows(folder: str) -> List[dict]:
    """The rows of `folder`'s slides.csv, every field present ('' when empty)."""
    _, rows = fileio.read_csv_rows(os.path.join(folder, SLIDES_CSV), SLIDES_CSV)
    return [{k: r.get(k) or '' for k in SLIDES_FIELDS} for r in rows]


def tiled_rows(folder: str) -> List[dict]:
    rows = [r for r in read_rows(folder) if r['status'] == TILED]
    if not rows:
        raise DataError(f'{folder}: slides.csv lists no tiled slide (see its status and '
                        f'reason columns)')
    return rows


def rows_on_disk(folder: str) -> List[dict]:
    """The rows slides.csv has now ([] without one), also of a job writing there meanwhile."""
    if not has_table(folder):
        return []
    try:
        return read_rows(folder)
    except DataError as e:
        raise DataError(f'{e}: it lists the slides tiled there; move it away to start the '
                        f'list anew') from None


def write(folder: str, finished: Dict[str, List[dict]], order: List[str]):
    """slides.csv: the rows on disk, read again now, with this job's `finished` rows (slide
    id -> its rows) in place of theirs and new slides after them; rows of slides not
    finished (yet) are kept: their coordinate files are still there."""
    rows, on_disk = [], {}
    for r in rows_on_disk(folder):
        on_disk.setdefault(r['slide_id'], []).append(r)
    for slide_id, found in on_disk.items():
        if slide_id in finished:
            rows.extend(finished[slide_id])
        elif all(r['status'] == DUPLICATE_ID for r in found):
            rows.extend({r['path']: r for r in found}.values())
        else:
            rows.append(found[0])
    rows += [r for s in order if s in finished and s not in on_disk for r in finished[s]]
    path = os.path.join(folder, SLIDES_CSV)
    with writing(path):
        fileio.write_csv(path, SLIDES_FIELDS, rows)
