"""Splits files (slide_id,split[,label]; split train, val or validation, test): by slide,
never by patch, or a probe would learn the slide instead of the class."""
from typing import Dict, Tuple

from clusiam_jax.errors import DataError
from clusiam_jax.fileio import read_csv_rows

SPLITS = ('train', 'val', 'test')


def read_splits(path: str) -> Dict[str, Tuple[str, str]]:
    """{slide_id: (split, label or '')}; DataError (one line) for a file that does not fit."""
    fields, rows = read_csv_rows(path, 'splits file')
    missing = sorted({'slide_id', 'split'} - set(fields))
    if missing:
        raise DataError(f'{path}: missing column(s) {missing} (expected slide_id,split[,label])')
    out = {}
    for line, row in enumerate(rows, start=2):
        split = (row['split'] or '').strip().lower()
        split = 'val' if split == 'validation' else split
        if split not in SPLITS:
            raise DataError(f'{path}:{line}: unknown split {row["split"]!r} for '
                            f'{row["slide_id"]!r} (use train, val or test)')
        out[(row['slide_id'] or '').strip()] = (split, (row.get('label') or '').strip())
    if not out:
        raise DataError(f'{path} lists no slides')
    return out


def class_splits(path, task):
    """({split: [(slide_id, class index)]}, class names): labels that are all integers are
    class indices, others sorted names. DataError for a missing or negative label."""
    table = read_splits(path)
    unlabeled = [slide for slide, (_, label) in table.items() if not label]
    if unlabeled:
        raise DataError(f'{path}: {task} needs a label column; {len(unlabeled)} slides '
                        f'have none, e.g. {unlabeled[:3]}')
    raw = [label for _, label in table.values()]
    if all(v.lstrip('-').isdigit() for v in raw):
        names = [str(i) for i in range(max(int(v) for v in raw) + 1)]
    else:
        names = sorted(set(raw))
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(raw) - set(index))
    if unknown:
        raise DataError(f'{path}: labels {unknown} are not class indices 0..{len(names) - 1}')
    splits = {split: [] for split in SPLITS}
    for slide, (split, label) in table.items():
        splits[split].append((slide, index[label]))
    return splits, names


def require_in_export(splits_path, listed, exported):
    """DataError naming the listed slides the export lacks."""
    missing = sorted(set(listed) - set(exported))
    if missing:
        raise DataError(f'{len(missing)} slides of {splits_path} are not in the export, '
                        f'e.g. {missing[:3]}')
