"""The evaluators over an export, by the CLI's task names; each returns one JSON-able dict.
knn and linear are patch-level; slide tasks log bootstrap intervals and a small-set caution."""
import logging
import os

import numpy as np

from clusiam_jax.errors import DataError
from clusiam_jax.eval.metrics import format_interval
from clusiam_jax.eval.splits import SPLITS, read_splits, require_in_export
from clusiam_jax.export import format as fmt

log = logging.getLogger('clusiam_jax')


def annotation_labels(folder, slide, arrays):
    """Each patch's class: the polygon holding its centre, else (and without a file) normal."""
    from clusiam_jax.slides import annotations as ann
    coords = np.asarray(arrays['coords'])
    if (coords < 0).any():
        raise DataError(f'slide {slide} has patches without coordinates: annotations '
                        f'cannot label them')
    path = ann.find_annotation_file(folder, slide)
    if path is None:
        log.info('eval: no annotation file for %s in %s: its patches are "normal"', slide, folder)
        return np.full(len(coords), 'normal', dtype=object)
    centres = ann.patch_centres(coords, arrays['patch_size'])
    return ann.label_points(ann.read_annotations(path), centres)


def patch_sets(export_dir, splits_path, key='features', annotations=None):
    """{split: (embeddings, labels, slide ids)}; labels from annotations, export or slide."""
    if annotations and not os.path.isdir(annotations):
        raise DataError(f'annotations folder not found: {annotations}')
    splits = read_splits(splits_path)
    data = fmt.read_export(export_dir, slides=set(splits))
    require_in_export(splits_path, splits, data)
    parts = {s: ([], [], []) for s in SPLITS}
    for slide, arrays in data.items():
        split, slide_label = splits[slide]
        if key not in arrays:
            raise DataError(f'the export has no {key!r} for slide {slide} (projections are '
                            f'exported with --config.export.with_projection=True)')
        n = arrays[key].shape[0]
        if annotations:
            labels = annotation_labels(annotations, slide, arrays)
        elif 'labels' in arrays:
            labels = np.asarray(arrays['labels'], dtype=object)
        else:
            label = slide_label or arrays['label']
            if not label:
                raise DataError(f'slide {slide} has no label (splits file or manifest)')
            labels = np.full(n, label, dtype=object)
        for part, value in zip(parts[split], (arrays[key], labels, np.full(n, slide, object))):
            part.append(value)
    out = {split: (np.concatenate(x).astype(np.float32), np.concatenate(y).astype(str),
                   np.concatenate(g).astype(str)) for split, (x, y, g) in parts.items() if x}
    for split in ('train', 'test'):
        if split not in out:
            raise DataError(f'{splits_path} lists no {split} slide')
    return out


def run_knn(export_dir, splits_path, ks=(1,), positive_label=None, key='features',
            annotations=None):
    from clusiam_jax.eval.knn import knn_evaluate
    sets = patch_sets(export_dir, splits_path, key, annotations)
    (ref_x, ref_y, _), (query_x, query_y, _) = sets['train'], sets['test']
    result = knn_evaluate(ref_x, ref_y, query_x, query_y, ks=ks, positive_label=positive_label)
    return {'task': 'knn', 'n_reference': len(ref_y), 'n_query': len(query_y), **result}


def run_linear(export_dir, splits_path, positive_label=None, key='features', seed=0,
               annotations=None):
    from clusiam_jax.eval.linear import linear_probe
    sets = patch_sets(export_dir, splits_path, key, annotations)
    (train_x, train_y, train_g), (test_x, test_y, _) = sets['train'], sets['test']
    val_x, val_y, _ = sets.get('val', (None, None, None))
    result = linear_probe(train_x, train_y, test_x, test_y, val_x=val_x, val_y=val_y,
                          groups=train_g, seed=seed, positive_label=positive_label)
    result['val_scores'] = {str(k): v for k, v in result['val_scores'].items()}
    return {'task': 'linear', 'n_train': len(train_y), 'n_test': len(test_y), **result}


def log_slide_result(result):
    """Logs a slide task's test-set size, scores and intervals, and its caution as a warning."""
    counts = ', '.join(f'{n} {name}' for name, n in result['n_test_per_class'].items())
    scores = ', '.join(f'{name} {format_interval(ci)}'
                       for name, ci in result['confidence_intervals'].items())
    log.info('%s: %d test slides (%s): %s (95%% bootstrap intervals over test slides)',
             result['task'], result['n_test_slides'], counts, scores)
    if result['caution']:
        log.warning('%s: %s', result['task'], result['caution'])
    return result


def _slide_task(task, result, drop=()):
    """The logged result without `drop` (per-slide scores, history), which bloat its JSON line."""
    for part in (result, *result.get('runs', ())):
        for key in drop:
            part.pop(key, None)
    return log_slide_result({'task': task, **result})


def _trained(task, seeds, epochs):
    if not seeds:
        raise DataError(f'{task} needs at least one seed (--seeds 0,1,2)')
    if epochs < 1:
        raise DataError(f'{task} needs --epochs of at least 1; got {epochs}')


def run_dsmil(export_dir, splits_path, seeds=(0, 1, 2, 3, 4), epochs=200, bags='auto',
              augmented=False):
    """`bags`: auto (a multi-scale export's `cat`, else `features`) | features | cat;
    `augmented`: also train on the export's stain-augmented copies (export.augment_copies)."""
    from clusiam_jax.eval import dsmil
    _trained('dsmil', seeds, epochs)
    return _slide_task('dsmil', dsmil.run_dsmil(export_dir, splits_path, seeds,
                                                dsmil.DSMILConfig(epochs=epochs), bags,
                                                augmented),
                       ('history', 'test_scores'))


def run_abmil(export_dir, splits_path, seeds=(0, 1, 2, 3, 4), epochs=100):
    from clusiam_jax.eval import slide_models
    _trained('abmil', seeds, epochs)
    return _slide_task('abmil', slide_models.run_abmil(
        export_dir, splits_path, seeds, slide_models.ABMILConfig(epochs=epochs)))


def run_clusters(export_dir, splits_path, seed=0):
    from clusiam_jax.eval.slide_models import run_clusters
    return _slide_task('clusters', run_clusters(export_dir, splits_path, seed), ('test_probs',))


def run_meanpool(export_dir, splits_path, seed=0):
    from clusiam_jax.eval.slide_models import run_meanpool
    return _slide_task('meanpool', run_meanpool(export_dir, splits_path, seed), ('test_probs',))


def run_maps(export_dir, thumbnail=None, downsample=None, alpha=0.5, annotations=None, atlas=True):
    """The cluster maps, then (with `atlas`) the atlas index.html or None under 'atlas'."""
    from clusiam_jax.export.atlas import write_atlas
    from clusiam_jax.export.maps import draw_export_maps
    result = {'task': 'maps', 'written': draw_export_maps(export_dir, thumbnail, downsample,
                                                          alpha, annotations=annotations)}
    if atlas:
        drawn = write_atlas(export_dir)
        result['atlas'] = drawn.index if drawn is not None else None
    return result
