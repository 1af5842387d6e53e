r"""Evaluation CLI over an export directory (see clusiam_jax/export.py).

  python -m clusiam_jax.eval.run knn    --export DIR --splits SPLITS.csv [--ks 1,5,20] [--positive tumor]
  python -m clusiam_jax.eval.run linear --export DIR --splits SPLITS.csv
  python -m clusiam_jax.eval.run dsmil  --export DIR --splits SPLITS.csv [--seeds 0,1,2,3,4]
  python -m clusiam_jax.eval.run maps   --export DIR [--thumbnail PATH --downsample 8]

SPLITS.csv has `slide_id,split[,label]` with split train, val (or validation) or test:
splits are by slide (or by image: an image is a "slide" of the export), never by patch.
Patch tasks (knn, linear) use each patch's own label when the export has `labels`
(from the patch source), else the slide's label (SPLITS.csv, else manifest.csv).
kNN: references = train slides, queries = test slides. Linear probe: weight decay
chosen on the val slides (or on 20% of the train slides when there are none).
DSMIL: slide labels from SPLITS.csv; epoch and thresholds chosen on val.
Prints one JSON line with the results.
"""
import argparse
import csv
import json
import sys

import numpy as np

from clusiam_jax.eval import exported

SPLITS = ('train', 'val', 'test')


def read_splits(path):
    """{slide_id: (split, label or '')} from a splits CSV."""
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        missing = {'slide_id', 'split'} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f'{path}: missing column(s) {sorted(missing)} '
                             f'(expected slide_id,split[,label])')
        out = {}
        for row in reader:
            split = row['split'].strip().lower()
            split = 'val' if split == 'validation' else split
            if split not in SPLITS:
                raise ValueError(f'{path}: unknown split {row["split"]!r} for '
                                 f'{row["slide_id"]!r} (use train, val or test)')
            out[row['slide_id'].strip()] = (split, (row.get('label') or '').strip())
    return out


def _require_in_export(splits_csv, listed, exported_slides):
    missing = sorted(set(listed) - set(exported_slides))
    if missing:
        raise ValueError(f'{len(missing)} slides of {splits_csv} are not in the export, '
                         f'e.g. {missing[:3]}')


def patch_sets(export_dir, splits_csv, key='features'):
    """{split: (embeddings [N, D], labels [N], slide ids [N])} over the listed slides."""
    splits = read_splits(splits_csv)
    data = exported.read_export(export_dir, slides=set(splits))
    _require_in_export(splits_csv, splits, data)
    parts = {s: ([], [], []) for s in SPLITS}
    for slide, arrays in data.items():
        split, slide_label = splits[slide]
        if key not in arrays:
            raise ValueError(f'the export has no {key!r} for slide {slide} (projections are '
                             f'exported with --config.export.with_projection=True)')
        n = arrays[key].shape[0]
        if 'labels' in arrays:
            labels = np.asarray(arrays['labels'], dtype=object)
        else:
            label = slide_label or arrays['label']
            if not label:
                raise ValueError(f'slide {slide} has no label (SPLITS.csv or manifest)')
            labels = np.full(n, label, dtype=object)
        parts[split][0].append(arrays[key])
        parts[split][1].append(labels)
        parts[split][2].append(np.full(n, slide, dtype=object))
    out = {}
    for split, (x, y, g) in parts.items():
        if x:
            out[split] = (np.concatenate(x).astype(np.float32),
                          np.concatenate(y).astype(str), np.concatenate(g).astype(str))
    for split in ('train', 'test'):
        if split not in out:
            raise ValueError(f'{splits_csv} lists no {split} slide')
    return out


def run_knn(export_dir, splits_csv, ks=(1,), positive_label=None, key='features'):
    from clusiam_jax.eval.knn import knn_evaluate
    sets = patch_sets(export_dir, splits_csv, key)
    (ref_x, ref_y, _), (query_x, query_y, _) = sets['train'], sets['test']
    result = knn_evaluate(ref_x, ref_y, query_x, query_y, ks=ks,
                          positive_label=positive_label)
    return {'task': 'knn', 'n_reference': len(ref_y), 'n_query': len(query_y), **result}


def run_linear(export_dir, splits_csv, positive_label=None, key='features', seed=0):
    from clusiam_jax.eval.linear import linear_probe
    sets = patch_sets(export_dir, splits_csv, key)
    train_x, train_y, train_g = sets['train']
    test_x, test_y, _ = sets['test']
    val_x, val_y = (sets['val'][0], sets['val'][1]) if 'val' in sets else (None, None)
    result = linear_probe(train_x, train_y, test_x, test_y, val_x=val_x, val_y=val_y,
                          groups=train_g, seed=seed, positive_label=positive_label)
    result['val_scores'] = {str(k): v for k, v in result['val_scores'].items()}
    return {'task': 'linear', 'n_train': len(train_y), 'n_test': len(test_y), **result}


def run_dsmil_eval(export_dir, splits_csv, seeds=(0, 1, 2, 3, 4), epochs=200):
    import os
    from clusiam_jax.eval.dsmil import DSMILConfig, run_dsmil
    if not seeds:
        raise ValueError('dsmil needs at least one seed (--seeds 0,1,2)')
    if epochs < 1:
        raise ValueError(f'dsmil needs --epochs of at least 1; got {epochs}')
    rows = exported.read_manifest(export_dir)
    if any(not row['file'].endswith('.h5') for row in rows):
        raise ValueError(f'dsmil reads per-slide HDF5 files; {export_dir} is an npz export '
                         f'(export again with --config.export.format=h5)')
    files = {row['slide_id']: os.path.join(export_dir, row['file']) for row in rows}
    _require_in_export(splits_csv, read_splits(splits_csv), files)
    result = run_dsmil(splits_csv, files, seeds=seeds, config=DSMILConfig(epochs=epochs))
    for r in result['runs']:  # per-epoch history and scores make the line unreadable
        r.pop('history', None)
        r.pop('test_scores', None)
    return {'task': 'dsmil', **result}


def _ints(text):
    try:
        return tuple(int(v) for v in text.split(',') if v)
    except ValueError:
        raise ValueError(f'expected comma-separated integers, got {text!r}') from None


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m clusiam_jax.eval.run',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('task', choices=['knn', 'linear', 'dsmil', 'maps'])
    parser.add_argument('--export', required=True, help='export directory (has manifest.csv)')
    parser.add_argument('--splits', help='CSV slide_id,split[,label]')
    parser.add_argument('--ks', default='1,5,20', help='kNN: neighbour counts')
    parser.add_argument('--positive', help='the positive class, for its F1 (e.g. tumor)')
    parser.add_argument('--key', default='features',
                        help='which embedding: features (default) or projections')
    parser.add_argument('--seeds', default='0,1,2,3,4', help='dsmil: seeds')
    parser.add_argument('--epochs', type=int, default=200, help='dsmil: epochs')
    parser.add_argument('--thumbnail', help='maps: thumbnail file or folder')
    parser.add_argument('--downsample', type=float, help='maps: level-0 px per thumbnail px')
    parser.add_argument('--out', help='also write the JSON here')
    args = parser.parse_args(argv)
    if args.task != 'maps' and not args.splits:
        parser.error(f'{args.task} needs --splits CSV (slide_id,split[,label])')
    try:
        if args.task == 'knn':
            result = run_knn(args.export, args.splits, _ints(args.ks), args.positive, args.key)
        elif args.task == 'linear':
            result = run_linear(args.export, args.splits, args.positive, args.key)
        elif args.task == 'dsmil':
            result = run_dsmil_eval(args.export, args.splits, _ints(args.seeds), args.epochs)
        else:
            result = {'task': 'maps', 'written': exported.draw_export_maps(
                args.export, args.thumbnail, args.downsample)}
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    text = json.dumps(result, default=lambda o: o.tolist() if hasattr(o, 'tolist') else str(o))
    print(text)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(text + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
