"""DSMIL slide-level evaluation (docs/method.md §7), written from its description.

A bag is one slide: its patch embeddings [N, D]. The model scores instances
with a linear classifier, takes per class the highest-scoring ("critical")
instance, attends from every instance to it, and classifies the attention-pooled
bag embedding.

The bag classifier of the original is a Conv1d over the C rows of the bag
embedding with kernel size = feature size; that is exactly a dense map from the
flattened C*D bag embedding to C logits, which is what is used here (one
``nn.Dense`` over the flattened [C, D] matrix, PyTorch's default init with
fan_in = C*D, as for that Conv1d).

Bags have different sizes. Each is zero-padded to a size from a short geometric
ladder (``bucket_length``) with a mask, so jit compiles a handful of shapes. The
mask enters the max over instances, the critical-instance argmax and the
attention softmax; padded rows have zero features and zero attention, so a
bag's outputs do not depend on its padding.

Selection discipline: the best epoch and the per-class decision thresholds are
chosen on the validation split; the test split is evaluated once, with them.

Two accuracies, named for what they are (``ACCURACIES``): ``accuracy_argmax``, the class
with the highest score, the rule of abmil, clusters and meanpool and the one to report;
and ``accuracy_val_thresholds``, DSMIL's own rule (each class called when its score
passes its threshold, right only when exactly the true class is called) with thresholds
chosen on validation. DSMIL's published scripts choose those thresholds on the very
split they score, which makes their accuracy optimistic; this one is not, but it is
not theirs either. Beside every test score: a 95% bootstrap interval over test slides
of the seed mean, and the test-set size (metrics.slide_scores_report).
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from clusiam_jax.errors import DataError
from clusiam_jax.eval.metrics import (
    mean_over_seeds,
    roc_auc,
    slide_scores_report,
    youden_threshold,
)
from clusiam_jax.eval.splits import read_splits, require_in_export
from clusiam_jax.export.format import read_h5_array, slide_feature_files

# --------------------------------------------------------------------------- model

def _torch_bias_init(fan_in):
    """PyTorch's default Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _torch_dense(features, fan_in, name):
    # variance_scaling(1/3, fan_in, uniform) has bound sqrt(1/fan_in), which is
    # PyTorch's default (kaiming_uniform with a=sqrt(5)) weight init.
    return nn.Dense(features, name=name,
                    kernel_init=nn.initializers.variance_scaling(1.0 / 3, 'fan_in', 'uniform'),
                    bias_init=_torch_bias_init(fan_in))


class DSMIL(nn.Module):
    """DSMIL on one (padded) bag.

    Call with feats [N, D] and mask [N] (True = real instance; at least one).
    Returns (bag_logits [C], max_instance_logits [C], extras) where extras has
    ``instance_logits`` [N, C], ``attention`` [N, C] (zero on padding) and
    ``critical`` [C] (index of each class's critical instance).
    """
    num_classes: int
    query_dim: int = 128

    @nn.compact
    def __call__(self, feats, mask):
        n, dim = feats.shape
        c = self.num_classes
        instance_logits = _torch_dense(c, dim, 'instance_classifier')(feats)
        q = nn.relu(_torch_dense(self.query_dim, dim, 'query_1')(feats))
        q = jnp.tanh(_torch_dense(self.query_dim, self.query_dim, 'query_2')(q))

        masked_scores = jnp.where(mask[:, None], instance_logits, -jnp.inf)
        critical = jnp.argmax(masked_scores, axis=0)                      # [C]
        max_instance_logits = jnp.max(masked_scores, axis=0)              # [C]
        q_critical = q[critical]                                          # [C, Q]
        attn_logits = q @ q_critical.T / jnp.sqrt(jnp.float32(self.query_dim))
        attn_logits = jnp.where(mask[:, None], attn_logits, -jnp.inf)
        attention = jax.nn.softmax(attn_logits, axis=0)                   # [N, C]
        bag_embedding = attention.T @ feats                               # [C, D]
        bag_logits = _torch_dense(c, c * dim, 'bag_classifier')(bag_embedding.reshape(-1))
        extras = {'instance_logits': instance_logits, 'attention': attention,
                  'critical': critical}
        return bag_logits, max_instance_logits, extras


def dsmil_loss(bag_logits, max_instance_logits, targets):
    """0.5 * BCE(bag) + 0.5 * BCE(max over instances), each a mean over classes."""
    bce = optax.sigmoid_binary_cross_entropy
    return (0.5 * bce(bag_logits, targets).mean()
            + 0.5 * bce(max_instance_logits, targets).mean())


def dsmil_score(bag_logits, max_instance_logits):
    """Per-class bag score: the mean of the two sigmoids."""
    return 0.5 * (jax.nn.sigmoid(bag_logits) + jax.nn.sigmoid(max_instance_logits))


# ----------------------------------------------------------------------- padding

SQRT2 = math.sqrt(2)


def bucket_length(n, min_size=64, growth=SQRT2):
    """Smallest size >= n on the ladder min_size, x growth, ... (multiples of 8).

    A sqrt(2) ladder wastes at most ~41% on padding and gives ~2 shapes per
    doubling of bag size, so jit compiles only a few times.
    """
    if n < 1:
        raise ValueError('a bag needs at least one instance')
    size = min_size
    while size < n:
        size = int(math.ceil(size * growth / 8.0) * 8)
    return size


def pad_bag(features, min_size=64):
    """(padded features [L, D], mask [L]) with L = bucket_length(N)."""
    features = np.asarray(features, np.float32)
    n, dim = features.shape
    length = bucket_length(n, min_size)
    padded = np.zeros((length, dim), np.float32)
    padded[:n] = features
    mask = np.zeros((length,), bool)
    mask[:n] = True
    return padded, mask


# ---------------------------------------------------------------------- training

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


def dsmil_optimizer(config):
    """Adam with coupled weight decay (PyTorch Adam's weight_decay), before the lr.

    The learning rate is applied by the train step (``epoch_learning_rate``),
    so one compiled step serves every schedule length and base lr.
    """
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.scale_by_adam(b1=config.betas[0], b2=config.betas[1], eps=1e-8),
    )


def epoch_learning_rate(config, epoch):
    """Cosine annealing set once per epoch (0-based), from lr down to eta_min."""
    cosine = 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
    return config.eta_min + (config.lr - config.eta_min) * cosine


@functools.lru_cache(maxsize=16)
def _trainer(num_classes, query_dim, betas, weight_decay):
    """A _Trainer shared by runs with the same model and optimizer.

    jit caches compiled code per function object; reusing the trainer lets
    several seeds (and tests) pay each bucket's compile only once.
    """
    config = DSMILConfig(betas=betas, weight_decay=weight_decay)
    return _Trainer(DSMIL(num_classes=num_classes, query_dim=query_dim),
                    dsmil_optimizer(config))


def _one_hot(label, num_classes):
    return np.eye(num_classes, dtype=np.float32)[label]


class _Trainer:
    """Jitted train/eval steps for one model + optimizer (one compile per bucket)."""

    def __init__(self, model, optimizer):
        self.model = model
        self.optimizer = optimizer

        def loss_fn(params, feats, mask, targets):
            bag, inst, _ = model.apply({'params': params}, feats, mask)
            return dsmil_loss(bag, inst, targets)

        def train_step(params, opt_state, feats, mask, targets, lr):
            loss, grads = jax.value_and_grad(loss_fn)(params, feats, mask, targets)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
            return params, opt_state, loss

        def eval_step(params, feats, mask, targets):
            bag, inst, _ = model.apply({'params': params}, feats, mask)
            return dsmil_score(bag, inst), dsmil_loss(bag, inst, targets)

        # Jitted: eager init would compile every primitive separately (seconds).
        self.init = jax.jit(model.init)
        self.train_step = jax.jit(train_step, donate_argnums=(0, 1))
        self.eval_step = jax.jit(eval_step)

    def evaluate(self, params, bags, num_classes):
        """(scores [B, C], mean loss) over padded device bags."""
        scores, losses = [], []
        for feats, mask, label in bags:
            score, loss = self.eval_step(params, feats, mask, _one_hot(label, num_classes))
            scores.append(score)
            losses.append(loss)
        # Gathered on the host: jnp.stack would compile once per list length.
        return np.stack(jax.device_get(scores)), float(np.mean(jax.device_get(losses)))


def _prepare(bags, min_bucket):
    out = []
    for features, label in bags:
        padded, mask = pad_bag(features, min_bucket)
        out.append((jnp.asarray(padded), jnp.asarray(mask), int(label)))
    return out


def per_class_auc(labels, scores):
    """AUC of scores[:, c] for "label == c", for every class c (NaN if undefined)."""
    labels = np.asarray(labels)
    return [roc_auc(labels == c, scores[:, c]) for c in range(scores.shape[1])]


def _nanmean(values):
    values = np.asarray(values, np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float('nan')


def classify(scores, thresholds):
    """Multi-hot decisions: class c is called when scores[:, c] >= thresholds[c]."""
    return np.asarray(scores) >= np.asarray(thresholds)[None, :]


ACCURACIES = {
    'accuracy_argmax': 'the class with the highest score is the prediction; the rule of '
                       'abmil, clusters and meanpool, no threshold: report this one',
    'accuracy_val_thresholds': "DSMIL's rule: every class whose score reaches its "
                               "threshold (Youden's J on validation) is called, right only "
                               "when exactly the true class is; DSMIL's published scripts "
                               "choose the thresholds on the split they score (optimistic)"
                               ', here they come from validation',
}


def argmax_accuracy(labels, scores):
    """The share of bags whose highest-scoring class is their label."""
    return float(np.mean(np.argmax(scores, axis=1) == np.asarray(labels)))


def bag_accuracy(labels, scores, thresholds):
    """DSMIL's accuracy: the thresholded multi-hot vector must equal the one-hot label."""
    decisions = classify(scores, thresholds)
    targets = np.eye(scores.shape[1], dtype=bool)[np.asarray(labels)]
    return float(np.mean(np.all(decisions == targets, axis=1)))


def train_dsmil(train_bags, val_bags, test_bags, num_classes, config=None, seed=0,
                log_fn=None):
    """Trains DSMIL, selects epoch and thresholds on validation, evaluates test once.

    Args:
      *_bags: lists of (features [N, D], label int in [0, num_classes)).
      num_classes: C; labels are one-hot targets over C sigmoid outputs.
      config: DSMILConfig (defaults: docs/method.md §7).
      seed: initializes the model and orders the training bags each epoch.
      log_fn: optional callable(dict) called once per epoch.

    Returns:
      dict: ``best_epoch`` (1-based), ``thresholds`` [C] (Youden on validation),
      ``val`` and ``test`` dicts with ``accuracy_val_thresholds`` (``bag_accuracy`` with
      those thresholds), ``accuracy_argmax`` (see ``ACCURACIES``),
      ``auc`` (per class), ``mean_auc``, ``loss``; ``test_scores`` [B, C];
      ``history`` (per epoch: train loss, val loss, val mean AUC); ``params``.
    """
    config = config or DSMILConfig()
    if not train_bags or not val_bags:
        raise ValueError('DSMIL needs training and validation bags')
    dim = np.shape(train_bags[0][0])[1]
    trainer = _trainer(num_classes, config.query_dim, tuple(config.betas),
                       float(config.weight_decay))
    optimizer = trainer.optimizer
    train = _prepare(train_bags, config.min_bucket)
    val = _prepare(val_bags, config.min_bucket)
    val_labels = np.array([label for _, _, label in val])

    init_key = jax.random.PRNGKey(seed)
    params = trainer.init(init_key, jnp.zeros((config.min_bucket, dim)),
                          jnp.ones((config.min_bucket,), bool))['params']
    opt_state = optimizer.init(params)
    order_rng = np.random.default_rng(seed)

    best = None
    history = []
    for epoch in range(1, config.epochs + 1):
        losses = []
        lr = np.float32(epoch_learning_rate(config, epoch - 1))
        for i in order_rng.permutation(len(train)):
            feats, mask, label = train[i]
            params, opt_state, loss = trainer.train_step(
                params, opt_state, feats, mask, _one_hot(label, num_classes), lr)
            losses.append(loss)
        val_scores, val_loss = trainer.evaluate(params, val, num_classes)
        val_auc = _nanmean(per_class_auc(val_labels, val_scores))
        record = {'epoch': epoch, 'train_loss': float(np.mean(jax.device_get(losses))),
                  'val_loss': val_loss, 'val_mean_auc': val_auc}
        history.append(record)
        if log_fn is not None:
            log_fn(record)
        # Higher validation AUC first, lower validation loss breaks ties (AUC
        # saturates on small validation sets); NaN AUC counts as worst.
        key = (val_auc if np.isfinite(val_auc) else -1.0, -val_loss)
        if best is None or key > best['key']:
            # A real host copy: on CPU device_get may alias the buffers that
            # the next (donating) train step reuses.
            kept = jax.tree.map(lambda a: np.array(a, copy=True), params)
            best = {'key': key, 'epoch': epoch, 'params': kept,
                    'val_scores': val_scores, 'val_loss': val_loss}

    thresholds = np.array([youden_threshold(val_labels == c, best['val_scores'][:, c])
                           for c in range(num_classes)])

    def summarize(labels, scores, loss):
        aucs = per_class_auc(labels, scores)
        return {'accuracy_val_thresholds': bag_accuracy(labels, scores, thresholds),
                'accuracy_argmax': argmax_accuracy(labels, scores),
                'auc': aucs, 'mean_auc': _nanmean(aucs), 'loss': loss}

    result = {'best_epoch': best['epoch'], 'thresholds': thresholds.tolist(),
              'val': summarize(val_labels, best['val_scores'], best['val_loss']),
              'history': history, 'params': best['params']}
    if test_bags:
        test = _prepare(test_bags, config.min_bucket)
        test_labels = np.array([label for _, _, label in test])
        test_scores, test_loss = trainer.evaluate(best['params'], test, num_classes)
        result['test'] = summarize(test_labels, test_scores, test_loss)
        result['test_scores'] = test_scores
    return result


def summarize_seeds(results):
    """Mean and std (population) over seeds of the test accuracies and per-class AUC."""
    def stats(values):
        values = np.asarray(values, np.float64)
        return {'mean': float(np.nanmean(values)), 'std': float(np.nanstd(values)),
                'values': values.tolist()}

    tests = [r['test'] for r in results]
    num_classes = len(tests[0]['auc'])
    return {
        'accuracy_argmax': stats([t['accuracy_argmax'] for t in tests]),
        'accuracy_val_thresholds': stats([t['accuracy_val_thresholds'] for t in tests]),
        'mean_auc': stats([t['mean_auc'] for t in tests]),
        'auc': [stats([t['auc'][c] for t in tests]) for c in range(num_classes)],
        'best_epoch': [r['best_epoch'] for r in results],
    }


# -------------------------------------------------------------------- data input

def class_splits(splits_path, class_names=None):
    """{split: [(slide_id, label index)]} and the class names, from a splits file with
    labels (eval/splits.py). Labels that are all integers are class indices; otherwise
    the names are sorted (or taken in the order of `class_names`) and mapped to 0..C-1."""
    table = read_splits(splits_path)
    unlabeled = [slide for slide, (_, label) in table.items() if not label]
    if unlabeled:
        raise DataError(f'{splits_path}: slide-level evaluation needs a label column; '
                        f'{len(unlabeled)} slides have none, e.g. {unlabeled[:3]}')
    raw = [label for _, label in table.values()]
    if class_names is None:
        if all(v.lstrip('-').isdigit() for v in raw):
            class_names = [str(i) for i in range(max(int(v) for v in raw) + 1)]
        else:
            class_names = sorted(set(raw))
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(raw) - set(index))
    if unknown:
        raise DataError(f'{splits_path}: labels {unknown} are not among {class_names}')
    splits = {'train': [], 'val': [], 'test': []}
    for slide, (split, label) in table.items():
        splits[split].append((slide, index[label]))
    for split in ('train', 'val'):
        if not splits[split]:
            raise DataError(f'{splits_path} lists no {split} slide (DSMIL chooses its epoch '
                            f'and thresholds on val)')
    return splits, list(class_names)


def run_dsmil(splits_path, features, seeds=(0, 1, 2, 3, 4), config=None,
              class_names=None, log_fn=None):
    """DSMIL over several seeds on per-slide HDF5 features (`features`: an export of
    ours or a folder of CLAM-style `<slide_id>.h5`, export/format.py).

    Returns {"class_names", "seeds", "runs" (per seed, without params),
    "summary" (mean/std over seeds), "accuracies" (what each accuracy is,
    ``ACCURACIES``), and ``dsmil_intervals``' n_test_slides, n_test_per_class, caution,
    confidence_intervals and bootstrap}.
    """
    splits, class_names = class_splits(splits_path, class_names)
    files = slide_feature_files(features)
    require_in_export(splits_path, [s for rows in splits.values() for s, _ in rows], files)
    cache = {}

    def bags(split):
        out = []
        for slide_id, label in splits[split]:
            if slide_id not in cache:
                cache[slide_id] = read_h5_array(files[slide_id])
            out.append((cache[slide_id], label))
        return out

    train_bags, val_bags, test_bags = bags('train'), bags('val'), bags('test')
    runs = []
    for seed in seeds:
        result = train_dsmil(train_bags, val_bags, test_bags, len(class_names), config,
                             seed=seed, log_fn=log_fn)
        result.pop('params')
        result['seed'] = seed
        result['test_scores'] = np.asarray(result.get('test_scores', [])).tolist()
        runs.append(result)
    test_labels = [label for _, label in test_bags]
    return {'class_names': class_names, 'seeds': list(seeds), 'runs': runs,
            'summary': summarize_seeds(runs) if test_bags else None,
            'accuracies': dict(ACCURACIES),
            **dsmil_intervals(test_labels, class_names, runs)}


def dsmil_intervals(labels, class_names, runs):
    """n_test_slides, n_test_per_class, caution and a bootstrap interval over the test
    slides (metrics.slide_scores_report) of each summary score: both accuracies,
    ``mean_auc`` and ``auc_<class>``. Each resample scores every seed (its test scores and
    thresholds) on the same slides and takes their mean, as the summary does."""
    labels = np.asarray(labels, np.int64)
    seeds = [(np.asarray(r.get('test_scores', []), np.float64).reshape(labels.size,
                                                                      len(class_names)),
              np.asarray(r['thresholds'])) for r in runs]

    def seed_mean(score):
        return lambda idx: mean_over_seeds([score(labels[idx], s[idx], t) for s, t in seeds])

    scores = {
        'accuracy_argmax': (seed_mean(lambda y, s, t: argmax_accuracy(y, s)), False),
        'accuracy_val_thresholds': (seed_mean(bag_accuracy), False),
        'mean_auc': (seed_mean(lambda y, s, t: _nanmean(per_class_auc(y, s))), True),
    }
    for c, name in enumerate(class_names):
        scores[f'auc_{name}'] = (seed_mean(lambda y, s, t, c=c: roc_auc(y == c, s[:, c])),
                                 True)
    return slide_scores_report(labels, class_names, scores, n_seeds=len(runs))
