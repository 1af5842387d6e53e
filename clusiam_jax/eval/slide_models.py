"""Slide-level evaluators beside DSMIL (docs/method.md §7):

  abmil     gated attention MIL (Ilse et al., 2018) on a slide's patch embeddings, on the
            MIL trainer of eval/mil.py
  clusters  the slide as its composition over the K clusters, [2K]: the fraction of its
            patches per cluster (`cluster_ids`) and the mean softmax of `cluster_logits`,
            with a logistic regression
  meanpool  the mean patch embedding with the same logistic regression: the floor a MIL
            method has to beat

Selection uses validation only (ABMIL: the epoch; the regressions: the weight decay),
higher AUC first, lower loss on ties; a splits file without val slides holds out 20% of
the train slides (stratified by class, picked by a seed). Reported: accuracy and balanced
accuracy of the argmax class, and AUC (of class 1 for two classes, the mean one-vs-rest
AUC for more), each with a bootstrap interval over test slides (for ABMIL's seeds, of
their mean), the test-set size and a caution when it is too small.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from clusiam_jax.errors import DataError
from clusiam_jax.eval import mil
from clusiam_jax.eval.linear import (
    fit_logistic_regression,
    fit_standardizer,
    standardize,
    validation_split,
)
from clusiam_jax.eval.metrics import (
    SLIDE_SCORES,
    log_softmax,
    seed_mean_intervals,
    seed_stats,
    slide_metrics,
)
from clusiam_jax.eval.splits import SPLITS, class_splits
from clusiam_jax.models.heads import TorchLinear

def labelled_splits(splits_path, task, holdout_seed=0, val_fraction=0.2):
    """splits.class_splits, with `val_fraction` of the train slides (stratified by
    class, `holdout_seed` picks them) as validation when there are no val slides.
    DataError unless there are two classes or more, each in train, val and test."""
    splits, names = class_splits(splits_path, task)
    if len(names) < 2:
        raise DataError(f'{splits_path}: every slide has label {names[0]!r}; {task} needs '
                        f'two classes or more')
    for split in ('train', 'test'):
        if not splits[split]:
            raise DataError(f'{splits_path} lists no {split} slide')
    where = str(splits_path)
    if not splits['val']:
        train = splits['train']
        keep, held = validation_split(np.array([label for _, label in train]), val_fraction,
                                      holdout_seed)
        splits['train'] = [train[i] for i in keep]
        splits['val'] = [train[i] for i in held]
        where = (f'{splits_path} (it has no val slides: {len(held)} of its train slides '
                 f'were held out for validation)')
    for split in SPLITS:
        present = {label for _, label in splits[split]}
        missing = [name for i, name in enumerate(names) if i not in present]
        if missing:
            raise DataError(f'{where}: no {split} slide of class {", ".join(missing)}; '
                            f'{task} needs every class in train, val and test')
    return splits, names


def mean_embedding(files, slide):
    """meanpool's slide vector: the mean patch embedding [D]."""
    return mil.slide_features(files, slide).mean(axis=0, dtype=np.float64).astype(np.float32)


def cluster_composition(files, slide):
    """clusters' slide vector [2K]: per cluster, the fraction of the slide's patches
    assigned to it (`cluster_ids`), then the mean softmax of their `cluster_logits`."""
    missing = (f'slide {slide}: {files[slide]} has no cluster_ids / cluster_logits (a model '
               f'without a cluster head?); clusters needs them, meanpool and abmil do not')
    ids = mil.read_array(files, slide, 'cluster_ids', missing)
    logits = mil.read_array(files, slide, 'cluster_logits', missing).astype(np.float64)
    if logits.ndim != 2 or logits.shape[0] == 0 or ids.shape != (logits.shape[0],):
        raise DataError(f'slide {slide}: {files[slide]} holds cluster_ids of shape '
                        f'{list(ids.shape)} and cluster_logits of shape '
                        f'{list(logits.shape)}; expected [N] and [N >= 1, K]')
    k = logits.shape[1]
    ids = np.rint(ids).astype(np.int64)
    if ids.min() < 0 or ids.max() >= k or not np.isfinite(logits).all():
        raise DataError(f'slide {slide}: {files[slide]} has cluster ids outside 0..{k - 1} '
                        f'or non-finite cluster logits')
    hard = np.bincount(ids, minlength=k) / ids.size
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    soft = (z / z.sum(axis=1, keepdims=True)).mean(axis=0)
    return np.concatenate([hard, soft]).astype(np.float32)


def slide_intervals(labels, class_names, probs_per_seed):
    """Test-set size, caution and bootstrap intervals of the seed mean of SLIDE_SCORES,
    from the test probabilities of each seed [seeds][n, C]."""
    per_seed = [(np.asarray(p, np.float64).reshape(len(labels), -1),) for p in probs_per_seed]
    return seed_mean_intervals(labels, class_names, SLIDE_SCORES, per_seed)


def _counts(splits):
    return {f'n_{split}': len(splits[split]) for split in SPLITS}


# ------------------------------------------------------------------------ ABMIL


class GatedAttentionMIL(nn.Module):
    """Gated attention MIL on one (padded) bag [N, D] with mask [N] (True = real):

        h_i = ReLU(W_h x_i + b)                      (skipped when hidden_dim is 0)
        a_i = softmax_i( w . (tanh(V h_i) * sigmoid(U h_i)) )   over the real instances
        logits = classifier(sum_i a_i h_i)           (C classes)

    Returns (logits [C], attention [N], zero on padding).
    """
    num_classes: int
    hidden_dim: int = 128
    attention_dim: int = 128

    @nn.compact
    def __call__(self, feats, mask):
        h = feats
        if self.hidden_dim:
            h = nn.relu(TorchLinear(self.hidden_dim, True, name='embed')(feats))
        v = jnp.tanh(TorchLinear(self.attention_dim, True, name='attention_V')(h))
        u = jax.nn.sigmoid(TorchLinear(self.attention_dim, True, name='attention_U')(h))
        scores = TorchLinear(1, True, name='attention_w')(v * u)[:, 0]
        attention = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf))
        logits = TorchLinear(self.num_classes, True, name='classifier')(attention @ h)
        return logits, attention


@dataclasses.dataclass
class ABMILConfig:
    """CLAM's published recipe for attention MIL: Adam, lr 2e-4, weight decay 1e-5 added
    to the gradient, a constant lr, one bag per step; no dropout, and the epoch chosen on
    validation instead of CLAM's early stopping."""
    epochs: int = 100
    lr: float = 2e-4
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 1e-5
    hidden_dim: int = 128     # 0: attention on the embeddings themselves
    attention_dim: int = 128
    min_bucket: int = 64


def _loss(outputs, label):
    return optax.softmax_cross_entropy_with_integer_labels(outputs[0], label)


def _logits(outputs):
    return outputs[0]


def _select(labels, logits, _):
    metrics = slide_metrics(labels, logits)
    return metrics['auc'], metrics['loss']


def _steps(num_classes, config):
    model = GatedAttentionMIL(int(num_classes), int(config.hidden_dim),
                              int(config.attention_dim))
    return mil.steps(model, _loss, _logits, config.betas, config.weight_decay)


def abmil_attention(params, features, num_classes, config=None):
    """The attention weights [N] of a trained model (train_abmil's params) on a bag."""
    config = config or ABMILConfig()
    padded, mask = mil.pad_bag(features, config.min_bucket)
    _, attention = _steps(num_classes, config).apply(params, padded, mask)
    return np.asarray(attention)[:np.shape(features)[0]]


def train_abmil(train_bags, val_bags, test_bags, num_classes, config=None, seed=0,
                log_fn=None):
    """Trains gated attention MIL (mil.train) on lists of (features [N, D], class index).

    Returns {seed, best_epoch, val and test (slide_metrics), test_probs [B, C], history,
    params}.
    """
    config = config or ABMILConfig()
    if not test_bags:
        raise ValueError('ABMIL needs training, validation and test bags')
    fit = mil.train(_steps(num_classes, config), config,
                    {'train': train_bags, 'val': val_bags, 'test': test_bags},
                    np.int32, _select, seed, log_fn=log_fn)
    test_labels, test_logits, _ = fit['test']
    return {'seed': seed, 'best_epoch': fit['best_epoch'],
            'val': slide_metrics(*fit['val'][:2]),
            'test': slide_metrics(test_labels, test_logits),
            'test_probs': np.exp(log_softmax(test_logits)).tolist(),
            'history': fit['history'], 'params': fit['params']}


def run_abmil(export_dir, splits_path, seeds=(0, 1, 2, 3, 4), config=None, log_fn=None):
    """ABMIL over several seeds on per-slide HDF5 features (an export of ours or a CLAM
    folder), all on the same splits (a validation hold-out is drawn once, with seed 0).
    Returns {class_names, n_train, n_val, n_test, config, runs (per seed: seed,
    best_epoch, val, test), summary (seed_stats of the test metrics), and slide_intervals'
    block}."""
    config = config or ABMILConfig()
    splits, names = labelled_splits(splits_path, 'abmil')
    sets = mil.read_slides(export_dir, splits_path, splits)
    bags = {split: list(zip(*sets[split])) for split in SPLITS}
    runs, probs = [], []
    for seed in seeds:
        result = train_abmil(bags['train'], bags['val'], bags['test'], len(names), config,
                             seed=seed, log_fn=log_fn)
        runs.append({k: result[k] for k in ('seed', 'best_epoch', 'val', 'test')})
        probs.append(result['test_probs'])
    summary = {key: seed_stats([r['test'][key] for r in runs]) for key in SLIDE_SCORES}
    return {'class_names': names, **_counts(splits), 'config': dataclasses.asdict(config),
            'runs': runs, 'summary': summary,
            **slide_intervals(sets['test'][1], names, probs)}


# ------------------------------------------------- logistic regression on a vector

SLIDE_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def slide_logistic_regression(sets, num_classes, weight_decays=SLIDE_WEIGHT_DECAYS):
    """Logistic regression (linear.py's fit, on features standardized with train
    statistics) on {split: (vectors [n, F], class indices [n])}; the weight decay best on
    val (AUC, then loss; the larger on ties) wins.

    Returns {weight_decay, val_scores ({wd: {auc, loss}}), val, test, test_probs}.
    """
    stats = fit_standardizer(np.asarray(sets['train'][0], np.float32))
    z = {split: (standardize(x, stats), np.asarray(y)) for split, (x, y) in sets.items()}
    best, scores = None, {}
    for wd in sorted(weight_decays):
        params = fit_logistic_regression(z['train'][0], z['train'][1], num_classes, wd)
        val = slide_metrics(z['val'][1], z['val'][0] @ params['w'] + params['b'])
        scores[repr(float(wd))] = {'auc': val['auc'], 'loss': val['loss']}
        key = (val['auc'] if np.isfinite(val['auc']) else -1.0, -val['loss'])
        if best is None or key >= best['key']:
            best = {'key': key, 'wd': float(wd), 'val': val, 'params': params}
    test_logits = z['test'][0] @ best['params']['w'] + best['params']['b']
    return {'weight_decay': best['wd'], 'val_scores': scores, 'val': best['val'],
            'test': slide_metrics(z['test'][1], test_logits),
            'test_probs': np.exp(log_softmax(test_logits)).tolist()}


def _run_vector_task(task, describe, export_dir, splits_path, seed):
    splits, names = labelled_splits(splits_path, task, holdout_seed=seed)
    sets = mil.read_slides(export_dir, splits_path, splits, describe)
    arrays = {split: (np.stack(values), labels) for split, (values, labels) in sets.items()}
    result = slide_logistic_regression(arrays, len(names))
    return {'class_names': names, **_counts(splits), 'dim': arrays['train'][0].shape[1],
            **result, **slide_intervals(arrays['test'][1], names, [result['test_probs']])}


def run_meanpool(export_dir, splits_path, seed=0):
    """meanpool: the mean patch embedding per slide + the validation-tuned logistic
    regression (`seed` picks the validation hold-out when the splits file has none)."""
    return _run_vector_task('meanpool', mean_embedding, export_dir, splits_path, seed)


def run_clusters(export_dir, splits_path, seed=0):
    """clusters: each slide's hard and soft cluster composition [2K] + the validation-tuned
    logistic regression; DataError for an export without cluster ids."""
    result = _run_vector_task('clusters', cluster_composition, export_dir, splits_path,
                              seed)
    return {**result, 'num_clusters': result['dim'] // 2}
