"""DSMIL (docs/method.md §7) on eval/mil.py's trainer. The original's bag classifier, a Conv1d
with kernel size = feature size over the C rows, is a Linear over the flattened C*D."""
import dataclasses
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from clusiam_jax.errors import DataError
from clusiam_jax.eval import metrics, mil
from clusiam_jax.eval.splits import class_splits
from clusiam_jax.export import format as fmt
from clusiam_jax.models.heads import TorchLinear

log = logging.getLogger('clusiam_jax')


class DSMIL(nn.Module):
    """DSMIL on a padded bag: feats [N, D], mask [N] (True = real; one at least). Returns
    (bag_logits [C], max_instance_logits [C], extras: instance_logits, attention, critical)."""
    num_classes: int
    query_dim: int = 128

    @nn.compact
    def __call__(self, feats, mask):
        c = self.num_classes
        instance_logits = TorchLinear(c, True, name='instance_classifier')(feats)
        q = nn.relu(TorchLinear(self.query_dim, True, name='query_1')(feats))
        q = jnp.tanh(TorchLinear(self.query_dim, True, name='query_2')(q))
        masked_scores = jnp.where(mask[:, None], instance_logits, -jnp.inf)
        critical = jnp.argmax(masked_scores, axis=0)                      # [C]
        max_instance_logits = jnp.max(masked_scores, axis=0)              # [C]
        attn_logits = q @ q[critical].T / jnp.sqrt(jnp.float32(self.query_dim))
        attention = jax.nn.softmax(jnp.where(mask[:, None], attn_logits, -jnp.inf), axis=0)
        bag_embedding = attention.T @ feats                               # [C, D]
        bag_logits = TorchLinear(c, True, name='bag_classifier')(bag_embedding.reshape(-1))
        extras = {'instance_logits': instance_logits, 'attention': attention, 'critical': critical}
        return bag_logits, max_instance_logits, extras


def dsmil_loss(outputs, targets):
    """0.5 * BCE(bag) + 0.5 * BCE(max over instances), each a mean over classes."""
    bag_logits, max_instance_logits = outputs[:2]
    bce = optax.sigmoid_binary_cross_entropy
    return 0.5 * bce(bag_logits, targets).mean() + 0.5 * bce(max_instance_logits, targets).mean()


def dsmil_score(outputs):
    """Per-class bag score: the mean of the sigmoids of the bag and max-instance logits."""
    return 0.5 * (jax.nn.sigmoid(outputs[0]) + jax.nn.sigmoid(outputs[1]))


@dataclasses.dataclass
class DSMILConfig:
    """Training recipe; the defaults are docs/method.md §7 (eta_min from DSMIL's code)."""
    epochs: int = 200
    lr: float = 2e-4
    betas: tuple = (0.5, 0.9)
    weight_decay: float = 5e-3   # coupled L2 (PyTorch Adam), not AdamW
    eta_min: float = 5e-6        # floor of the per-epoch cosine schedule
    query_dim: int = 128
    min_bucket: int = 64


def epoch_learning_rate(config, epoch):
    """Cosine annealing set once per epoch (0-based), from lr down to eta_min."""
    cosine = 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
    return config.eta_min + (config.lr - config.eta_min) * cosine


ACCURACIES = {
    'accuracy_argmax': 'the highest-scoring class is the prediction, no threshold (the rule '
                       'of abmil, clusters and meanpool): report this one',
    'accuracy_val_thresholds': "DSMIL's rule: every class whose score reaches its threshold "
                               "(Youden's J, here on validation; DSMIL's scripts choose it on "
                               'the split they score: optimistic) is called, right only when '
                               'exactly the true class is'}


def bag_accuracy(labels, scores, thresholds):
    """DSMIL's accuracy: the thresholded multi-hot vector must equal the one-hot label."""
    decisions = np.asarray(scores) >= np.asarray(thresholds)[None, :]
    targets = np.eye(scores.shape[1], dtype=bool)[np.asarray(labels)]
    return float(np.mean(np.all(decisions == targets, axis=1)))


def _select(labels, scores, losses):
    return metrics.nanmean(metrics.per_class_auc(labels, scores)), float(np.mean(losses))


def train_dsmil(train_bags, val_bags, test_bags, num_classes, config=None, seed=0):
    """Trains DSMIL (mil.train) on one-hot targets; thresholds [C]: Youden's on validation."""
    config = config or DSMILConfig()
    trainer = mil.steps(DSMIL(num_classes, config.query_dim), dsmil_loss, dsmil_score,
                        config.betas, config.weight_decay)
    eye = np.eye(num_classes, dtype=np.float32)
    fit = mil.train(trainer, config, {'train': train_bags, 'val': val_bags, 'test': test_bags},
                    lambda label: eye[label], _select, seed,
                    lambda epoch: epoch_learning_rate(config, epoch))
    val_labels, val_scores, _ = fit['val']
    thresholds = np.array([metrics.youden_threshold(val_labels == c, val_scores[:, c])
                           for c in range(num_classes)])

    def summarize(labels, scores, losses):
        aucs = metrics.per_class_auc(labels, scores)
        return {'accuracy_val_thresholds': bag_accuracy(labels, scores, thresholds),
                'accuracy_argmax': metrics.argmax_accuracy(labels, scores),
                'auc': aucs, 'mean_auc': metrics.nanmean(aucs), 'loss': float(np.mean(losses))}

    result = {'best_epoch': fit['best_epoch'], 'thresholds': thresholds.tolist(),
              'val': summarize(*fit['val']), 'history': fit['history'], 'params': fit['params']}
    if 'test' in fit:
        result['test'] = summarize(*fit['test'])
        result['test_scores'] = fit['test'][1]
    return result


BAGS = ('auto', 'features', 'cat')


def _holds(path, key) -> bool:
    try:
        with fmt.open_h5(path) as f:
            return key in f
    except fmt.UNREADABLE:
        return False   # reading the bags names the unreadable file


def bag_key(export_dir, slides, bags='auto') -> str:
    """Which array a slide's bag is: `cat` (a multi-scale export's patch features followed by
    their coarser parents', DSMIL's multi-scale bags) or `features`; 'auto': `cat` when every
    listed slide's file holds it."""
    if bags not in BAGS:
        raise DataError(f'dsmil bags must be one of {", ".join(BAGS)}; got {bags!r}')
    if bags != 'auto':
        return bags
    files = fmt.slide_feature_files(str(export_dir))
    having = [s for s in slides if s in files and _holds(files[s], fmt.CAT)]
    if having and len(having) < len(slides):
        missing = next(s for s in slides if s not in having)
        raise DataError(f'{export_dir}: {len(having)} of {len(slides)} slides have multi-scale '
                        f'bags ({fmt.CAT}) and slide {missing} has not: export them all with '
                        f'the same export.mpps, or pass bags=features')
    return fmt.CAT if having else 'features'


def _with_copies(key):
    """describe(files, slide) -> [1 + K, N, D]: the bag and its K stain-augmented copies."""
    def describe(files, slide):
        plain = mil.slide_features(files, slide, key)
        copies = mil.slide_features(files, slide, key + fmt.AUGMENTED, ndim=3)
        if copies.shape[0] != plain.shape[0] or copies.shape[2] != plain.shape[1]:
            raise DataError(f'slide {slide}: {files[slide]} holds {key}{fmt.AUGMENTED} of '
                            f'shape {list(copies.shape)} for {key} of {list(plain.shape)}')
        return np.concatenate([plain[None], copies.transpose(1, 0, 2)])
    return describe


def run_dsmil(export_dir, splits_path, seeds=(0, 1, 2, 3, 4), config=None, bags='auto',
              augmented=False):
    """DSMIL over seeds on per-slide features (an export or a CLAM folder), one splits file.
    `bags`: bag_key's; `augmented`: train on each slide's bag and its stain-augmented copies
    (export.augment_copies) as as many bags, validate and test on the plain ones."""
    splits, class_names = class_splits(splits_path, 'dsmil')
    for split in ('train', 'val'):
        if not splits[split]:
            raise DataError(f'{splits_path} lists no {split} slide (DSMIL chooses its epoch '
                            f'and thresholds on val)')
    bag = bag_key(export_dir, [s for rows in splits.values() for s, _ in rows], bags)
    describe = (_with_copies(bag) if augmented else
                lambda files, slide: mil.slide_features(files, slide, bag))
    sets = mil.read_slides(export_dir, splits_path, splits, describe)
    by_split = {split: list(zip(*sets[split])) for split in sets}
    if augmented:   # every copy a training bag; the plain bag for choosing and scoring
        by_split = {split: [(v, y) for x, y in rows
                            for v in (x if split == 'train' else x[:1])]
                    for split, rows in by_split.items()}
    log.info('dsmil: bags of %s%s (%d training bags)', bag,
             ' and its stain-augmented copies' if augmented else '', len(by_split['train']))
    runs = []
    for seed in seeds:
        result = train_dsmil(by_split['train'], by_split['val'], by_split['test'],
                             len(class_names), config, seed=seed)
        result.pop('params')
        result['seed'] = seed
        result['test_scores'] = np.asarray(result.get('test_scores', [])).tolist()
        runs.append(result)
    summary = None
    if by_split['test']:
        tests = [r['test'] for r in runs]
        summary = {key: metrics.seed_stats([t[key] for t in tests])
                   for key in ('accuracy_argmax', 'accuracy_val_thresholds', 'mean_auc')}
        summary['auc'] = [metrics.seed_stats(values) for values in zip(*(t['auc'] for t in tests))]
        summary['best_epoch'] = [r['best_epoch'] for r in runs]
    labels = sets['test'][1]
    per_seed = [(np.asarray(r.get('test_scores', []), np.float64).reshape(
        len(labels), len(class_names)), np.asarray(r['thresholds'])) for r in runs]
    scores = {'accuracy_argmax': (lambda y, s, t: metrics.argmax_accuracy(y, s), False),
              'accuracy_val_thresholds': (bag_accuracy, False),
              'mean_auc': (lambda y, s, t: metrics.nanmean(metrics.per_class_auc(y, s)), True)}
    for c, name in enumerate(class_names):
        scores[f'auc_{name}'] = (lambda y, s, t, c=c: metrics.roc_auc(y == c, s[:, c]), True)
    return {'class_names': class_names, 'seeds': list(seeds), 'runs': runs, 'bags': bag,
            'augmented': bool(augmented),
            'summary': summary, 'accuracies': dict(ACCURACIES),
            **metrics.seed_mean_intervals(labels, class_names, scores, per_seed)}
