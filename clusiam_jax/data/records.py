"""Patch discovery: what the training list is, and what travels with each patch.

A patch source is one of
  * a folder of image files at any depth; the original CluSiam layout
    ``root/<class>/<slide>/<x>_<y>.png`` works as is (label = <class>);
  * a manifest CSV with a ``path`` column and optional ``slide_id``, ``label``,
    ``x``, ``y`` columns (relative paths are relative to the CSV's folder);
  * a dataset built by :mod:`clusiam_jax.data.tfds_builder` (its ``records.csv``).

A folder holding whole slides (slide formats, pyramidal or tiled large TIFFs) is refused
with the tiling command: slides are read through a tiling (data/slide_source.py).

Records are sorted by path so that the list, and with it every shuffle drawn
from the seed, does not depend on the file system's listing order.
"""
import csv
import dataclasses
import logging
import os
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np

from clusiam_jax import fileio
from clusiam_jax.data import image_io
from clusiam_jax.errors import DataError
from clusiam_jax.slides.reader import SLIDE_ONLY_EXTENSIONS

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp', '.webp')

# `<x>_<y>` at the end of the file stem, optionally after a prefix and `_`/`-`
# (e.g. `1024_2048.png`, `slideA_1024_2048.png`); level-0 pixel coordinates.
_COORDS_RE = re.compile(r'(?:^|[_\-])(\d+)_(\d+)$')

MANIFEST_COLUMNS = ('path', 'slide_id', 'label', 'x', 'y')
# Name of the manifest a built TFDS dataset keeps next to its ArrayRecord shards.
DATASET_MANIFEST = 'records.csv'


@dataclasses.dataclass(frozen=True)
class PatchRecord:
    """One patch: its file and the metadata export/evaluation needs."""
    path: str
    slide_id: Optional[str] = None
    label: Optional[str] = None
    x: Optional[int] = None
    y: Optional[int] = None


def take(records, indices) -> Sequence[PatchRecord]:
    """records[i] for i in indices, still lazy when `records` makes its records on
    access (a slide source's, data/slide_source.SlideRecords)."""
    if hasattr(records, 'take'):
        return records.take(indices)
    return [records[int(i)] for i in indices]


def slide_codes(records) -> Tuple[np.ndarray, np.ndarray]:
    """(names, codes): the distinct slide ids, sorted ('' for records without one), and
    each record's index into them (int [N]), without making the records of a source
    that makes them on access (grouping on the integers, not on a string per patch)."""
    if hasattr(records, 'slide_codes'):
        return records.slide_codes()
    ids = np.array([r.slide_id or '' for r in records], dtype=object).astype(str)
    names, codes = np.unique(ids, return_inverse=True)
    return names, codes.reshape(-1)


def labels_of(records, indices) -> List[Optional[str]]:
    """records[i].label for i in indices (a slide source's from its slides' labels)."""
    if hasattr(records, 'labels_of'):
        return records.labels_of(indices)
    return [records[int(i)].label for i in indices]


def parse_patch_path(path: str, root: Optional[str] = None) -> PatchRecord:
    """Slide id, label and coordinates read off ``.../<slide>/<x>_<y>.<ext>``.

    The slide is the parent folder (``root`` itself for files directly in it).
    The label is only taken when the file sits exactly two folders below
    ``root`` (the original ``<class>/<slide>/file`` layout); deeper or
    shallower layouts carry no reliable class folder.
    """
    stem = os.path.splitext(os.path.basename(path))[0]
    match = _COORDS_RE.search(stem)
    x, y = (int(match.group(1)), int(match.group(2))) if match else (None, None)
    parent = os.path.basename(os.path.dirname(path)) or None
    label = None
    if root is not None:
        rel_parts = os.path.relpath(path, root).split(os.sep)
        if len(rel_parts) == 3:
            label = rel_parts[0]
    return PatchRecord(path=path, slide_id=parent, label=label, x=x, y=y)


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')


def _is_slide_file(path: str, name: str) -> bool:
    """Whole-slide formats (.svs, .ndpi, ...), and TIFFs that are pyramids or tiled and
    larger than a patch (image_io.tiff_is_slide): small plain TIFFs are patches."""
    lower = name.lower()
    if lower.endswith(SLIDE_ONLY_EXTENSIONS):
        return True
    return lower.endswith(('.tif', '.tiff')) and image_io.tiff_is_slide(path)


def discover_folder(root: str) -> List[PatchRecord]:
    """All image files under ``root`` (any depth, symlinks followed), sorted. A folder
    holding whole-slide files (.svs, .ndpi, pyramidal or tiled TIFF, ...) is refused with
    the tiling command: slides are never patches, and training on the few small images
    beside them (labels, thumbnails) would look like success."""
    root = os.path.abspath(root)
    records, slides = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith('.')]
        for name in filenames:
            if name.startswith('.'):
                continue
            path = os.path.join(dirpath, name)
            if _is_slide_file(path, name):
                slides.append(path)
            elif _is_image_file(name):
                records.append(parse_patch_path(path, root))
    if slides:
        slides.sort()
        beside = f' beside {len(records)} images' if records else ''
        raise DataError(
            f'{root} holds {len(slides)} whole-slide file{"s" if len(slides) > 1 else ""} '
            f'(e.g. {os.path.relpath(slides[0], root)}){beside}, which are not patches: '
            f'tile them first: python launch.py --mode tile --config.tile.slides={root} '
            f'--config.tile.out_dir=TILES, then train with --config.data.path=TILES'
            + (f' (or move the slides out of {root} to train on its images)'
               if records else ''))
    if not records:
        raise DataError(
            f'no image files ({", ".join(IMAGE_EXTENSIONS)}) found under {root}')
    records.sort(key=lambda r: r.path)
    return records


def _optional_int(value: str, column: str, line: int, csv_path: str):
    value = (value or '').strip()
    if value == '' or value == '-1':
        return None
    try:
        return int(float(value))
    except ValueError:
        raise DataError(
            f'{csv_path}:{line}: column {column!r} is not a number: {value!r}'
        ) from None


def read_patch_manifest(csv_path: str) -> List[PatchRecord]:
    """Records from a manifest CSV (``path`` required; see module docstring)."""
    base = os.path.dirname(os.path.abspath(csv_path))
    # One reader for every CSV a user gives: a BOM, a non-UTF-8 file, a broken one.
    columns, rows = fileio.read_csv_rows(csv_path, 'manifest')
    if 'path' not in columns:
        raise DataError(
            f'manifest {csv_path} has no "path" column (columns: {columns}); '
            f'expected path[,slide_id][,label][,x,y]')
    if ('x' in columns) != ('y' in columns):
        raise DataError(f'manifest {csv_path} has only one of the columns "x", "y"')
    records = []
    for line, row in enumerate(rows, start=2):
        raw = (row.get('path') or '').strip()
        if not raw:
            raise DataError(f'{csv_path}:{line}: empty "path"')
        path = raw if os.path.isabs(raw) else os.path.normpath(os.path.join(base, raw))
        parsed = parse_patch_path(path)
        slide = (row.get('slide_id') or '').strip() if 'slide_id' in columns else None
        label = (row.get('label') or '').strip() if 'label' in columns else None
        if 'x' in columns:
            x = _optional_int(row.get('x'), 'x', line, csv_path)
            y = _optional_int(row.get('y'), 'y', line, csv_path)
        else:
            x, y = parsed.x, parsed.y
        records.append(PatchRecord(
            path=path,
            slide_id=slide or (None if 'slide_id' in columns else parsed.slide_id),
            label=label or None,
            x=x, y=y))
    if not records:
        raise DataError(f'manifest {csv_path} lists no patches')
    records.sort(key=lambda r: r.path)
    return records


def write_patch_manifest(records, csv_path: str) -> None:
    """Writes records as a manifest CSV (absolute paths, empty = unknown)."""
    with open(csv_path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(MANIFEST_COLUMNS)
        for r in records:
            writer.writerow([
                r.path, r.slide_id or '', r.label or '',
                '' if r.x is None else r.x, '' if r.y is None else r.y])


def find_tfds_dataset(path: str) -> Optional[str]:
    """The folder holding ``dataset_info.json`` of a built dataset, or None.

    Accepts the build output folder itself or any folder above the version
    folder (``out/<name>/<version>/``), at most three levels deep.
    """
    if not os.path.isdir(path):
        return None
    for depth in range(4):
        pattern_parts = [path] + ['*'] * depth + ['dataset_info.json']
        import glob  # local: only needed here
        hits = sorted(glob.glob(os.path.join(*pattern_parts)))
        if hits:
            if len(hits) > 1:
                raise DataError(
                    f'{path} holds several built datasets: '
                    f'{[os.path.dirname(h) for h in hits]}; point data.path at one')
            return os.path.dirname(hits[0])
    return None


def discover(path: str) -> List[PatchRecord]:
    """The training list of a patch source (folder, manifest CSV or built dataset)."""
    if not path:
        raise DataError('data.path is empty: give a patch folder, a manifest CSV '
                         'or a built dataset folder')
    if not os.path.exists(path):
        raise DataError(f'patch source not found: {path}')
    if os.path.isfile(path):
        if not path.lower().endswith('.csv'):
            raise DataError(f'{path} is a file but not a manifest CSV')
        return read_patch_manifest(path)
    dataset_dir = find_tfds_dataset(path)
    if dataset_dir is not None:
        manifest = os.path.join(dataset_dir, DATASET_MANIFEST)
        if not os.path.exists(manifest):
            raise DataError(f'built dataset {dataset_dir} has no {DATASET_MANIFEST}')
        with open(manifest, newline='') as f:
            rows = list(csv.DictReader(f))
        # Keep the stored order: it is the order of the ArrayRecord index.
        return [PatchRecord(
            path=r['path'], slide_id=r['slide_id'] or None, label=r['label'] or None,
            x=int(r['x']) if r['x'] else None, y=int(r['y']) if r['y'] else None)
            for r in rows]
    return discover_folder(path)
