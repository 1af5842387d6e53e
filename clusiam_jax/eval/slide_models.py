"""Slide-level evaluators beside DSMIL (docs/method.md §7), selected on validation only:
abmil (gated attention MIL on eval/mil.py's trainer); clusters and meanpool, a logistic
regression on each slide's cluster composition or mean patch embedding (MIL's floor)."""
import dataclasses
import operator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from clusiam_jax.errors import DataError
from clusiam_jax.eval import metrics, mil
from clusiam_jax.eval.linear import fit_sweep, standardizer, validation_split
from clusiam_jax.eval.splits import SPLITS, class_splits
from clusiam_jax.models.heads import TorchLinear


def labelled_splits(splits_path, task, holdout_seed=0, val_fraction=0.2):
    """class_splits, with `val_fraction` of train held out when there is no val; DataError
    unless two classes or more are each in train, val and test."""
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
        keep, held = validation_split(np.array([y for _, y in train]), val_fraction, holdout_seed)
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
    """clusters' slide vector [2K]: each cluster's share of patches, then the mean softmax."""
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
    """seed_mean_intervals of SLIDE_SCORES from each seed's test probabilities [n, C]."""
    per_seed = [(np.asarray(p, np.float64).reshape(len(labels), -1),) for p in probs_per_seed]
    return metrics.seed_mean_intervals(labels, class_names, metrics.SLIDE_SCORES, per_seed)


def _counts(splits):
    return {f'n_{split}': len(splits[split]) for split in SPLITS}


class GatedAttentionMIL(nn.Module):
    """Gated attention MIL (Ilse et al. 2018) on a padded bag [N, D], mask [N]: returns
    (classifier(sum a h) [C], attention a [N]); h = ReLU(W x), or x when hidden_dim is 0."""
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
        return TorchLinear(self.num_classes, True, name='classifier')(attention @ h), attention


@dataclasses.dataclass
class ABMILConfig:
    """CLAM's attention-MIL recipe, without dropout; the epoch chosen on validation."""
    epochs: int = 100
    lr: float = 2e-4
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 1e-5
    hidden_dim: int = 128     # 0: attention on the embeddings themselves
    attention_dim: int = 128
    min_bucket: int = 64


def _loss(outputs, label):
    return optax.softmax_cross_entropy_with_integer_labels(outputs[0], label)


def _select(labels, logits, _):
    return tuple(metrics.slide_metrics(labels, logits)[k] for k in ('auc', 'loss'))


_logits = operator.itemgetter(0)


def _steps(num_classes, config):
    return mil.steps(GatedAttentionMIL(num_classes, config.hidden_dim, config.attention_dim),
                     _loss, _logits, config.betas, config.weight_decay)


def abmil_attention(params, features, num_classes, config=None):
    """The attention weights [N] of a trained model (train_abmil's params) on a bag."""
    config = config or ABMILConfig()
    padded, mask = mil.pad_bag(features, config.min_bucket)
    _, attention = _steps(num_classes, config).apply(params, padded, mask)
    return np.asarray(attention)[:np.shape(features)[0]]


def train_abmil(train_bags, val_bags, test_bags, num_classes, config=None, seed=0):
    """Trains gated attention MIL (mil.train) on lists of (features [N, D], class index)."""
    config = config or ABMILConfig()
    if not test_bags:
        raise ValueError('ABMIL needs training, validation and test bags')
    fit = mil.train(_steps(num_classes, config), config,
                    {'train': train_bags, 'val': val_bags, 'test': test_bags},
                    np.int32, _select, seed)
    test_labels, test_logits, _ = fit['test']
    return {'seed': seed, 'best_epoch': fit['best_epoch'],
            'val': metrics.slide_metrics(*fit['val'][:2]),
            'test': metrics.slide_metrics(test_labels, test_logits),
            'test_probs': np.exp(metrics.log_softmax(test_logits)).tolist(),
            'history': fit['history'], 'params': fit['params']}


def run_abmil(export_dir, splits_path, seeds=(0, 1, 2, 3, 4), config=None):
    """ABMIL over seeds on per-slide features (an export or a CLAM folder), one splits file."""
    config = config or ABMILConfig()
    splits, names = labelled_splits(splits_path, 'abmil')
    sets = mil.read_slides(export_dir, splits_path, splits)
    bags = {split: list(zip(*sets[split])) for split in SPLITS}
    runs, probs = [], []
    for seed in seeds:
        result = train_abmil(bags['train'], bags['val'], bags['test'], len(names), config, seed)
        runs.append({k: result[k] for k in ('seed', 'best_epoch', 'val', 'test')})
        probs.append(result['test_probs'])
    summary = {key: metrics.seed_stats([r['test'][key] for r in runs])
               for key in metrics.SLIDE_SCORES}
    return {'class_names': names, **_counts(splits), 'config': dataclasses.asdict(config),
            'runs': runs, 'summary': summary, **slide_intervals(sets['test'][1], names, probs)}


SLIDE_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def slide_logistic_regression(sets, num_classes):
    """linear.py's fits on {split: (x [n, F], y [n])}; best val AUC, loss, then larger decay."""
    z = standardizer(sets['train'][0])
    data = {split: (z(x), np.asarray(y)) for split, (x, y) in sets.items()}
    fits = fit_sweep(*data['train'], num_classes, SLIDE_WEIGHT_DECAYS)
    val = {wd: metrics.slide_metrics(data['val'][1], data['val'][0] @ p['w'] + p['b'])
           for wd, p in fits.items()}
    best = max(val, key=lambda wd: (val[wd]['auc'] if np.isfinite(val[wd]['auc']) else -1.0,
                                    -val[wd]['loss'], wd))
    test_logits = data['test'][0] @ fits[best]['w'] + fits[best]['b']
    return {'weight_decay': float(best),
            'val_scores': {repr(float(wd)): {'auc': m['auc'], 'loss': m['loss']}
                           for wd, m in val.items()},
            'val': val[best], 'test': metrics.slide_metrics(data['test'][1], test_logits),
            'test_probs': np.exp(metrics.log_softmax(test_logits)).tolist()}


def _run_vector_task(task, describe, export_dir, splits_path, seed):
    splits, names = labelled_splits(splits_path, task, holdout_seed=seed)
    sets = mil.read_slides(export_dir, splits_path, splits, describe)
    arrays = {split: (np.stack(values), labels) for split, (values, labels) in sets.items()}
    result = slide_logistic_regression(arrays, len(names))
    return {'class_names': names, **_counts(splits), 'dim': arrays['train'][0].shape[1],
            **result, **slide_intervals(arrays['test'][1], names, [result['test_probs']])}


def run_meanpool(export_dir, splits_path, seed=0):
    """meanpool (`seed` picks the validation hold-out when the splits file has none)."""
    return _run_vector_task('meanpool', mean_embedding, export_dir, splits_path, seed)


def run_clusters(export_dir, splits_path, seed=0):
    """clusters; DataError for an export without cluster ids."""
    result = _run_vector_task('clusters', cluster_composition, export_dir, splits_path, seed)
    return {**result, 'num_clusters': result['dim'] // 2}
