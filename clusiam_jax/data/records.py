"""PatchRecord, the PatchSource protocol, and the sorted listing of patch files (a folder, a
manifest CSV or a built dataset): a seeded shuffle then ignores the file system's order."""
import dataclasses
import glob
import os
import posixpath
import re
from typing import List, Optional

import numpy as np

from clusiam_jax import fileio, storage
from clusiam_jax.data import image_io
from clusiam_jax.errors import DataError
from clusiam_jax.slides.reader import SLIDE_ONLY_EXTENSIONS

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp', '.webp')
# `<x>_<y>` (level-0 pixels) ending the file stem, optionally after a prefix and `_`/`-`.
_COORDS_RE = re.compile(r'(?:^|[_\-])(\d+)_(\d+)$')
DATASET_MANIFEST = 'records.csv'   # a built dataset's records, in its ArrayRecord order
BUILT_FOLDER = 'clusiam_patches/1.0.0'   # build_dataset's folder under --out


@dataclasses.dataclass(frozen=True)
class PatchRecord:
    path: str
    slide_id: Optional[str] = None
    label: Optional[str] = None
    x: Optional[int] = None
    y: Optional[int] = None


class PatchSource:
    """Every patch source's protocol; records are made on access (millions fill memory)."""
    slide_ids: np.ndarray      # str [S]: each slide's id ('' for patch files without one)
    slide_index: np.ndarray    # int [N]: each patch's slide, an index into slide_ids
    dataset_dir: Optional[str] = None   # a built dataset's folder
    from_slides = False        # read from whole slides

    def __len__(self) -> int:
        return len(self.slide_index)

    def load(self, index: int) -> np.ndarray:
        """uint8 [H, W, 3] RGB; BadImageError when unreadable."""
        raise NotImplementedError

    def path(self, index: int) -> str:
        raise NotImplementedError

    def record(self, index: int) -> PatchRecord:
        raise NotImplementedError

    def labels(self, indices) -> List[Optional[str]]:
        return [self.record(int(i)).label for i in indices]

    def subset(self, indices) -> 'Subset':
        return Subset(self, indices)


class Subset(PatchSource):
    """Patches `indices` of `parent`: index i here is index indices[i] there."""

    def __init__(self, parent: PatchSource, indices):
        self.parent, self.indices = parent, np.asarray(indices, np.int64)
        self.slide_ids, self.slide_index = parent.slide_ids, parent.slide_index[self.indices]
        self.dataset_dir, self.from_slides = parent.dataset_dir, parent.from_slides

    def load(self, index: int) -> np.ndarray:
        return self.parent.load(int(self.indices[index]))

    def path(self, index: int) -> str:
        return self.parent.path(int(self.indices[index]))

    def record(self, index: int) -> PatchRecord:
        return self.parent.record(int(self.indices[index]))


def parse_patch_path(path: str, root: Optional[str] = None) -> PatchRecord:
    """Slide id, coordinates and (under root/<class>/<slide>/) label, read off the path."""
    match = _COORDS_RE.search(os.path.splitext(os.path.basename(path))[0])
    x, y = (int(match.group(1)), int(match.group(2))) if match else (None, None)
    parts = os.path.relpath(path, root).split(os.sep) if root is not None else ()
    return PatchRecord(path, os.path.basename(os.path.dirname(path)) or None,
                       parts[0] if len(parts) == 3 else None, x, y)


def _optional_int(value: str, column: str, line: int, csv_path: str):
    value = (value or '').strip()
    try:
        return None if value in ('', '-1') else int(float(value))
    except ValueError:
        raise DataError(f'{csv_path}:{line}: column {column!r} is not a number: '
                        f'{value!r}') from None


def read_patch_manifest(csv_path: str) -> List[PatchRecord]:
    columns, rows = fileio.read_path_csv(csv_path, 'manifest', 'path[,slide_id][,label][,x,y]')
    if ('x' in columns) != ('y' in columns):
        raise DataError(f'manifest {csv_path} has only one of the columns "x", "y"')
    records = []
    for line, row in enumerate(rows, start=2):
        parsed = parse_patch_path(row['path'])
        slide = (row.get('slide_id') or '').strip() if 'slide_id' in columns else None
        x, y = ((_optional_int(row.get(c), c, line, csv_path) for c in 'xy')
                if 'x' in columns else (parsed.x, parsed.y))
        records.append(PatchRecord(
            row['path'], slide or (None if 'slide_id' in columns else parsed.slide_id),
            (row.get('label') or '').strip() or None, x, y))
    if not records:
        raise DataError(f'manifest {csv_path} lists no patches')
    records.sort(key=lambda r: r.path)
    return records


def write_patch_manifest(records, csv_path: str) -> None:
    fileio.write_csv(csv_path, ('path', 'slide_id', 'label', 'x', 'y'), (
        {'path': r.path, 'slide_id': r.slide_id or '', 'label': r.label or '',
         'x': '' if r.x is None else r.x, 'y': '' if r.y is None else r.y}
        for r in records))


def find_tfds_dataset(path: str) -> Optional[str]:
    """The folder of a built dataset's dataset_info.json, at most 3 levels below, or None."""
    if storage.is_url(path):
        return _find_dataset_in_bucket(path)
    if not os.path.isdir(path):
        return None
    for depth in range(4):
        hits = sorted(glob.glob(os.path.join(path, *['*'] * depth, 'dataset_info.json')))
        if len(hits) > 1:
            raise DataError(f'{path} holds several built datasets: '
                            f'{[os.path.dirname(h) for h in hits]}; point data.path at one')
        if hits:
            return os.path.dirname(hits[0])
    return None


def _find_dataset_in_bucket(url: str) -> Optional[str]:
    """find_tfds_dataset in a bucket. dataset_info.json is uploaded last, so shards without it
    are a build that stopped uploading: refused, never read as a dataset."""
    url = url.rstrip('/')
    for folder in ('', f'{BUILT_FOLDER}/'):   # where data.path points: no listing of a bucket
        if storage.isfile(f'{url}/{folder}dataset_info.json'):
            return storage.resolve(url, folder or '.').rstrip('/')
    names = [n for n in storage.find_files(url) if n.count('/') <= 3]
    hits = sorted(n for n in names if posixpath.basename(n) == 'dataset_info.json')
    if len(hits) > 1:
        raise DataError(f'{url} holds several built datasets: '
                        f'{[storage.join(url, posixpath.dirname(h)) for h in hits]}; '
                        f'point data.path at one')
    if hits:
        return storage.resolve(url, posixpath.dirname(hits[0])).rstrip('/')
    shards = [n for n in names if '.array_record-' in posixpath.basename(n)]
    if shards:
        raise DataError(f'{storage.join(url, posixpath.dirname(shards[0]))} has ArrayRecord '
                        f'shards but no dataset_info.json: its build stopped before uploading '
                        f'all of it; build it again (--mode build_dataset)')
    return None


def _dataset_records(dataset_dir: str) -> List[PatchRecord]:
    manifest = storage.join(dataset_dir, DATASET_MANIFEST)
    if not storage.exists(manifest):
        raise DataError(f'built dataset {dataset_dir} has no {DATASET_MANIFEST}')
    _, rows = fileio.read_csv_rows(manifest, 'built dataset records')
    return [PatchRecord(r['path'], r['slide_id'] or None, r['label'] or None,
                        int(r['x']) if r['x'] else None, int(r['y']) if r['y'] else None)
            for r in rows]   # the stored order: that of the ArrayRecord index


def discover(path: str) -> List[PatchRecord]:
    if not path:
        raise DataError('data.path is empty: give a patch folder, a manifest CSV or a built '
                        'dataset folder')
    if storage.is_url(path):
        dataset_dir = find_tfds_dataset(path)
        if dataset_dir is None:
            raise DataError(f'{path}: no built dataset (dataset_info.json) in the bucket; a '
                            f'patch folder is read from local disk, or packed with --mode '
                            f'build_dataset --out {path}')
        return _dataset_records(dataset_dir)
    if not os.path.exists(path):
        raise DataError(f'patch source not found: {path}')
    if os.path.isfile(path):
        if not path.lower().endswith('.csv'):
            raise DataError(f'{path} is a file but not a manifest CSV')
        return read_patch_manifest(path)
    dataset_dir = find_tfds_dataset(path)
    if dataset_dir is not None:
        return _dataset_records(dataset_dir)
    # Whole slides are refused: training on the images beside them would look like success.
    root = os.path.abspath(path)
    records, slides = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith('.')]
        for name in filenames:
            if name.startswith('.'):
                continue
            path, lower = os.path.join(dirpath, name), name.lower()
            if lower.endswith(SLIDE_ONLY_EXTENSIONS) or (
                    lower.endswith(('.tif', '.tiff')) and image_io.tiff_is_slide(path)):
                slides.append(path)
            elif lower.endswith(IMAGE_EXTENSIONS):
                records.append(parse_patch_path(path, root))
    if slides:
        slides.sort()
        beside = f' beside {len(records)} images' if records else ''
        raise DataError(
            f'{root} holds {len(slides)} whole-slide file{"s" if len(slides) > 1 else ""} '
            f'(e.g. {os.path.relpath(slides[0], root)}){beside}, which are not patches: '
            f'tile them first: python launch.py --mode tile --config.tile.slides={root} '
            f'--config.tile.out_dir=TILES, then train with --config.data.path=TILES'
            + (f' (or move the slides out of {root} to train on its images)' if records else ''))
    if not records:
        raise DataError(f'no image files ({", ".join(IMAGE_EXTENSIONS)}) found under {root}')
    records.sort(key=lambda r: r.path)
    return records
