"""Slide-level evaluators beside DSMIL (docs/method.md §7): ABMIL, clusters, meanpool.

Every slide is one labelled sample; its patches come from an export of ours or from a
folder of CLAM-style `<slide_id>.h5` feature files, and the labels and splits from a
splits file (`slide_id,split,label`, eval/splits.py).

  abmil     gated attention MIL (Ilse et al., 2018) on the patch embeddings of a slide
  clusters  the slide as its composition over the K clusters: the fraction of its patches
            per cluster (`cluster_ids`) and the mean softmax of `cluster_logits`, [2K],
            with a logistic regression
  meanpool  the mean patch embedding of the slide with the same logistic regression: the
            floor a MIL method has to beat

Model selection uses the validation split only (ABMIL: the epoch; the logistic
regressions: the weight decay), by validation AUC with the lower validation loss breaking
ties; the test split is scored once. A splits file without val slides holds out 20% of
the train slides (stratified by class, picked by a seed) instead. Reported: accuracy and
balanced accuracy of the argmax class, and AUC: of class index 1 (the positive class)
for two classes, the mean one-vs-rest AUC over the classes for more.

Beside them (``slide_intervals``): the test-set size, per class, a caution when it is too
small to measure anything, and a 95% bootstrap interval over test slides for each score
(metrics.bootstrap_ci); for ABMIL's seeds, the interval of the seed mean.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from clusiam_jax.errors import DataError
from clusiam_jax.eval.dsmil import (
    _nanmean,
    _prepare,
    _torch_dense,
    dsmil_optimizer,
    pad_bag,
    per_class_auc,
)
from clusiam_jax.eval.linear import (
    fit_logistic_regression,
    fit_standardizer,
    standardize,
    validation_split,
)
from clusiam_jax.eval.metrics import (
    classification_metrics,
    mean_over_seeds,
    roc_auc,
    slide_scores_report,
)
from clusiam_jax.eval.splits import SPLITS, read_splits, require_in_export
from clusiam_jax.export.format import read_h5_array, slide_feature_files

# -------------------------------------------------------------------- data input


def _class_names(raw):
    # The convention of dsmil.class_splits: integer labels are class indices, other
    # labels are sorted names.
    if all(v.lstrip('-').isdigit() for v in raw):
        return [str(i) for i in range(max(int(v) for v in raw) + 1)]
    return sorted(set(raw))


def labelled_splits(splits_path, task, holdout_seed=0, val_fraction=0.2):
    """({split: [(slide_id, class index)]}, class names) from a splits file with labels.

    Without val slides, ``val_fraction`` of the train slides (stratified by class,
    ``holdout_seed`` picks them) become the validation split. DataError unless there
    are two or more classes and every class has a slide in train, val and test.
    """
    table = read_splits(splits_path)
    unlabeled = [slide for slide, (_, label) in table.items() if not label]
    if unlabeled:
        raise DataError(f'{splits_path}: {task} needs a label column; {len(unlabeled)} '
                        f'slides have none, e.g. {unlabeled[:3]}')
    names = _class_names([label for _, label in table.values()])
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({label for _, label in table.values()} - set(index))
    if unknown:
        raise DataError(f'{splits_path}: labels {unknown} are not class indices 0..'
                        f'{len(names) - 1}')
    if len(names) < 2:
        raise DataError(f'{splits_path}: every slide has label {names[0]!r}; {task} needs '
                        f'two classes or more')
    splits = {split: [] for split in SPLITS}
    for slide, (split, label) in table.items():
        splits[split].append((slide, index[label]))
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


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _read(files, slide, key, missing=None):
    """One array of a slide's HDF5 file; DataError naming the slide if it cannot be read
    (``missing``: the message when the file lacks ``key``)."""
    path = files[slide]
    try:
        return read_h5_array(path, key)
    except OSError as e:
        raise DataError(f'slide {slide}: cannot read {path} ({_first_line(e)})') from None
    except DataError:
        if missing is None:
            raise
        raise DataError(missing) from None


def slide_features(files, slide):
    """The patch embeddings [N, D] of a slide, checked: two-dimensional, N >= 1, finite."""
    x = _read(files, slide, 'features')
    if x.ndim != 2 or x.shape[0] == 0:
        raise DataError(f'slide {slide}: {files[slide]} holds features of shape '
                        f'{list(x.shape)}; expected [patches >= 1, dim]')
    if not np.isfinite(x).all():
        raise DataError(f'slide {slide}: {files[slide]} has non-finite features')
    return x


def mean_embedding(files, slide):
    """meanpool's slide vector: the mean patch embedding [D]."""
    return slide_features(files, slide).mean(axis=0, dtype=np.float64).astype(np.float32)


def cluster_composition(files, slide):
    """clusters' slide vector [2K]: per cluster, the fraction of the slide's patches
    assigned to it (`cluster_ids`), then the mean softmax of their `cluster_logits`."""
    missing = (f'slide {slide}: {files[slide]} has no cluster_ids / cluster_logits (a model '
               f'without a cluster head?); clusters needs them, meanpool and abmil do not')
    ids = _read(files, slide, 'cluster_ids', missing)
    logits = _read(files, slide, 'cluster_logits', missing).astype(np.float64)
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


def read_slides(export_dir, splits_path, splits, describe):
    """{split: ([describe(files, slide) per slide], labels [n])} over the listed slides;
    DataError naming the slides the export lacks, or when their vectors differ in size."""
    files = slide_feature_files(str(export_dir))
    require_in_export(splits_path, [slide for rows in splits.values() for slide, _ in rows],
                      files)
    out = {split: ([describe(files, slide) for slide, _ in rows],
                   np.array([label for _, label in rows], np.int64))
           for split, rows in splits.items()}
    sizes = {np.shape(v)[-1] for values, _ in out.values() for v in values}
    if len(sizes) > 1:
        raise DataError(f'{export_dir}: the slides have vectors of different sizes '
                        f'{sorted(sizes)}; evaluate features of one model')
    return out


# ----------------------------------------------------------------------- metrics


def _log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def slide_auc(labels, probs):
    """AUC of class 1 for two classes; the mean one-vs-rest AUC over classes for more."""
    probs = np.asarray(probs)
    if probs.shape[1] == 2:
        return roc_auc(np.asarray(labels) == 1, probs[:, 1])
    return _nanmean(per_class_auc(labels, probs))


def slide_metrics(labels, logits):
    """accuracy, balanced_accuracy (argmax class), auc and mean cross-entropy ``loss``."""
    labels = np.asarray(labels)
    log_probs = _log_softmax(logits)
    predicted = np.argmax(log_probs, axis=1)
    counts = classification_metrics(labels, predicted, labels=np.arange(log_probs.shape[1]))
    return {'n': int(labels.size), 'accuracy': counts['accuracy'],
            'balanced_accuracy': counts['balanced_accuracy'],
            'auc': slide_auc(labels, np.exp(log_probs)),
            'loss': float(-np.mean(log_probs[np.arange(labels.size), labels]))}


def _argmax_accuracy(labels, probs):
    return float(np.mean(np.argmax(probs, axis=1) == labels))


def _argmax_balanced_accuracy(labels, probs):
    """classification_metrics' balanced accuracy (mean recall over the classes present)
    of the argmax class, in a few array operations (the bootstrap calls it often)."""
    c = probs.shape[1]
    support = np.bincount(labels, minlength=c)
    hits = np.bincount(labels[np.argmax(probs, axis=1) == labels], minlength=c)
    present = support > 0
    return float(np.mean(hits[present] / support[present])) if present.any() else \
        float('nan')


# name: (score(labels, probs), needs every class); the scores of ``slide_metrics``.
SLIDE_SCORES = {'accuracy': (_argmax_accuracy, False),
                'balanced_accuracy': (_argmax_balanced_accuracy, True),
                'auc': (slide_auc, True)}


def slide_intervals(labels, class_names, probs_per_seed):
    """n_test_slides, n_test_per_class, caution, and a bootstrap interval over the test
    slides of each score (metrics.slide_scores_report) from the test probabilities of
    each seed [seeds][n, C]: each resample scores every seed and takes their mean, as the
    summary does, so the estimate is the reported (seed-mean) score."""
    labels = np.asarray(labels, np.int64)
    probs = [np.asarray(p, np.float64).reshape(labels.size, -1) for p in probs_per_seed]

    def seed_mean(score):
        return lambda idx: mean_over_seeds([score(labels[idx], p[idx]) for p in probs])
    scores = {name: (seed_mean(score), per_class)
              for name, (score, per_class) in SLIDE_SCORES.items()}
    return slide_scores_report(labels, class_names, scores, n_seeds=len(probs))


def _selection_key(metrics):
    """Higher validation AUC first (NaN counts as worst), lower validation loss breaks ties."""
    auc = metrics['auc']
    return (auc if np.isfinite(auc) else -1.0, -metrics['loss'])


def summarize_runs(runs, keys=('accuracy', 'balanced_accuracy', 'auc')):
    """Mean and std (population) over seeds of the test metrics."""
    out = {}
    for key in keys:
        values = np.array([r['test'][key] for r in runs], np.float64)
        out[key] = {'mean': _nanmean(values),
                    'std': float(np.nanstd(values)) if np.isfinite(values).any() else
                    float('nan'),
                    'values': values.tolist()}
    return out


# ------------------------------------------------------------------------ ABMIL


class GatedAttentionMIL(nn.Module):
    """Gated attention MIL on one (padded) bag [N, D] with mask [N] (True = real).

        h_i = ReLU(W_h x_i + b)                      (skipped when hidden_dim is 0)
        a_i = softmax_i( w . (tanh(V h_i) * sigmoid(U h_i)) )   over the real instances
        logits = classifier(sum_i a_i h_i)           (C classes)

    Returns (logits [C], attention [N], zero on padding). Dense layers use PyTorch's
    default initialization, as CLAM's and Ilse et al.'s models do.
    """
    num_classes: int
    hidden_dim: int = 128
    attention_dim: int = 128

    @nn.compact
    def __call__(self, feats, mask):
        h = feats
        if self.hidden_dim:
            h = nn.relu(_torch_dense(self.hidden_dim, feats.shape[1], 'embed')(feats))
        width = h.shape[1]
        v = jnp.tanh(_torch_dense(self.attention_dim, width, 'attention_V')(h))
        u = jax.nn.sigmoid(_torch_dense(self.attention_dim, width, 'attention_U')(h))
        scores = _torch_dense(1, self.attention_dim, 'attention_w')(v * u)[:, 0]
        attention = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf))
        logits = _torch_dense(self.num_classes, width, 'classifier')(attention @ h)
        return logits, attention


@dataclasses.dataclass
class ABMILConfig:
    """Training recipe, as in CLAM's published commands for attention MIL: Adam, lr 2e-4,
    weight decay 1e-5 added to the gradient (PyTorch Adam, not AdamW), a constant lr, one
    bag per step in a shuffled order. No dropout; the epoch is chosen on validation
    instead of CLAM's early stopping."""
    epochs: int = 100
    lr: float = 2e-4
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 1e-5
    hidden_dim: int = 128     # 0: attention on the embeddings themselves
    attention_dim: int = 128
    min_bucket: int = 64


class _ABMILTrainer:
    """Jitted init / train / eval steps for one model and optimizer (one compile per
    bucket length)."""

    def __init__(self, model, optimizer):
        self.model = model
        self.optimizer = optimizer

        def loss_fn(params, feats, mask, label):
            logits, _ = model.apply({'params': params}, feats, mask)
            return optax.softmax_cross_entropy_with_integer_labels(logits, label)

        def train_step(params, opt_state, feats, mask, label, lr):
            loss, grads = jax.value_and_grad(loss_fn)(params, feats, mask, label)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = jax.tree.map(lambda p, g: p - lr * g, params, updates)
            return params, opt_state, loss

        self.init = jax.jit(model.init)
        self.train_step = jax.jit(train_step, donate_argnums=(0, 1))
        self.apply = jax.jit(lambda params, feats, mask: model.apply({'params': params},
                                                                     feats, mask))

    def logits(self, params, bags):
        """[B, C] logits of padded device bags, gathered on the host."""
        return np.stack(jax.device_get([self.apply(params, feats, mask)[0]
                                        for feats, mask, _ in bags]))


@functools.lru_cache(maxsize=16)
def _abmil_trainer(num_classes, hidden_dim, attention_dim, betas, weight_decay):
    # Shared by runs with the same model and optimizer: jit caches per function object,
    # so seeds (and tests) compile each bucket once.
    model = GatedAttentionMIL(num_classes, hidden_dim, attention_dim)
    config = ABMILConfig(betas=betas, weight_decay=weight_decay)
    return _ABMILTrainer(model, dsmil_optimizer(config))


def _trainer_for(num_classes, config):
    return _abmil_trainer(int(num_classes), int(config.hidden_dim),
                          int(config.attention_dim), tuple(config.betas),
                          float(config.weight_decay))


def abmil_attention(params, features, num_classes, config=None):
    """The attention weights [N] of a trained model (``train_abmil``'s params) on a bag."""
    config = config or ABMILConfig()
    padded, mask = pad_bag(features, config.min_bucket)
    _, attention = _trainer_for(num_classes, config).apply(params, padded, mask)
    return np.asarray(attention)[:np.shape(features)[0]]


def train_abmil(train_bags, val_bags, test_bags, num_classes, config=None, seed=0,
                log_fn=None):
    """Trains gated attention MIL; keeps the epoch best on validation; scores test once.

    Args:
      *_bags: lists of (features [N, D], class index).
      config: ABMILConfig.
      seed: initializes the model and orders the training bags each epoch.
      log_fn: optional callable(dict), once per epoch.

    Returns:
      dict: ``seed``, ``best_epoch`` (1-based), ``val`` and ``test`` (``slide_metrics``),
      ``test_probs`` [B, C], ``history`` (per epoch: train loss, val loss, val AUC) and
      ``params`` (of the kept epoch, on the host).
    """
    config = config or ABMILConfig()
    if not train_bags or not val_bags or not test_bags:
        raise ValueError('ABMIL needs training, validation and test bags')
    trainer = _trainer_for(num_classes, config)
    dim = np.shape(train_bags[0][0])[1]
    train, val, test = (_prepare(bags, config.min_bucket)
                        for bags in (train_bags, val_bags, test_bags))
    val_labels = np.array([label for _, _, label in val])
    params = trainer.init(jax.random.PRNGKey(seed), jnp.zeros((config.min_bucket, dim)),
                          jnp.ones((config.min_bucket,), bool))['params']
    opt_state = trainer.optimizer.init(params)
    order = np.random.default_rng(seed)
    lr = np.float32(config.lr)
    best, history = None, []
    for epoch in range(1, config.epochs + 1):
        losses = []
        for i in order.permutation(len(train)):
            feats, mask, label = train[i]
            params, opt_state, loss = trainer.train_step(params, opt_state, feats, mask,
                                                         np.int32(label), lr)
            losses.append(loss)
        val_metrics = slide_metrics(val_labels, trainer.logits(params, val))
        record = {'epoch': epoch, 'train_loss': float(np.mean(jax.device_get(losses))),
                  'val_loss': val_metrics['loss'], 'val_auc': val_metrics['auc']}
        history.append(record)
        if log_fn is not None:
            log_fn(record)
        key = _selection_key(val_metrics)
        if best is None or key > best['key']:
            # A real host copy: the next (donating) step may reuse the device buffers.
            kept = jax.tree.map(lambda a: np.array(a, copy=True), params)
            best = {'key': key, 'epoch': epoch, 'params': kept, 'val': val_metrics}
    test_logits = trainer.logits(best['params'], test)
    test_labels = np.array([label for _, _, label in test])
    return {'seed': seed, 'best_epoch': best['epoch'], 'val': best['val'],
            'test': slide_metrics(test_labels, test_logits),
            'test_probs': np.exp(_log_softmax(test_logits)).tolist(),
            'history': history, 'params': best['params']}


def run_abmil(splits_path, features, seeds=(0, 1, 2, 3, 4), config=None, log_fn=None):
    """ABMIL over several seeds on per-slide HDF5 features (an export of ours or a CLAM
    folder). Every seed trains on the same splits (a validation hold-out, when the
    splits file has no val slides, is drawn once, with seed 0).

    Returns {class_names, n_train, n_val, n_test, config, runs (per seed: seed, best_epoch,
    val, test), summary (mean/std over seeds of the test metrics), and
    ``slide_intervals``' n_test_slides, n_test_per_class, caution, confidence_intervals
    (of the seed means) and bootstrap}.
    """
    config = config or ABMILConfig()
    splits, names = labelled_splits(splits_path, 'abmil')
    sets = read_slides(features, splits_path, splits, slide_features)
    bags = {split: list(zip(*sets[split])) for split in SPLITS}
    runs, probs = [], []
    for seed in seeds:
        result = train_abmil(bags['train'], bags['val'], bags['test'], len(names), config,
                             seed=seed, log_fn=log_fn)
        runs.append({k: result[k] for k in ('seed', 'best_epoch', 'val', 'test')})
        probs.append(result['test_probs'])
    return {'class_names': names, **_counts(splits), 'config': dataclasses.asdict(config),
            'runs': runs, 'summary': summarize_runs(runs),
            **slide_intervals(sets['test'][1], names, probs)}


# ------------------------------------------------- logistic regression on a vector

SLIDE_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def slide_logistic_regression(sets, num_classes, weight_decays=SLIDE_WEIGHT_DECAYS):
    """Logistic regression on one vector per slide, weight decay chosen on validation.

    ``sets``: {split: (vectors [n, F], class indices [n])} with train, val and test.
    Features are standardized with train statistics; the fit is linear.py's (L-BFGS from
    zero weights, deterministic). The weight decay with the best ``_selection_key`` on
    val wins, the larger on exact ties.

    Returns {weight_decay, val_scores ({wd: {auc, loss}}), val, test, test_probs}.
    """
    stats = fit_standardizer(np.asarray(sets['train'][0], np.float32))
    z = {split: (standardize(x, stats), np.asarray(y)) for split, (x, y) in sets.items()}
    best, scores = None, {}
    for wd in sorted(weight_decays):
        params = fit_logistic_regression(z['train'][0], z['train'][1], num_classes, wd)
        val = slide_metrics(z['val'][1], z['val'][0] @ params['w'] + params['b'])
        scores[repr(float(wd))] = {'auc': val['auc'], 'loss': val['loss']}
        if best is None or _selection_key(val) >= best['key']:
            best = {'key': _selection_key(val), 'wd': float(wd), 'val': val, 'params': params}
    test_logits = z['test'][0] @ best['params']['w'] + best['params']['b']
    return {'weight_decay': best['wd'], 'val_scores': scores, 'val': best['val'],
            'test': slide_metrics(z['test'][1], test_logits),
            'test_probs': np.exp(_log_softmax(test_logits)).tolist()}


def _counts(splits):
    return {f'n_{split}': len(splits[split]) for split in SPLITS}


def _run_vector_task(task, describe, splits_path, features, seed):
    splits, names = labelled_splits(splits_path, task, holdout_seed=seed)
    sets = read_slides(features, splits_path, splits, describe)
    arrays = {split: (np.stack(values), labels) for split, (values, labels) in sets.items()}
    result = slide_logistic_regression(arrays, len(names))
    return {'class_names': names, **_counts(splits), 'dim': arrays['train'][0].shape[1],
            **result, **slide_intervals(arrays['test'][1], names, [result['test_probs']])}


def run_meanpool(splits_path, features, seed=0):
    """meanpool: the mean patch embedding per slide + the validation-tuned logistic
    regression (``seed`` picks the validation hold-out when the splits file has none)."""
    return _run_vector_task('meanpool', mean_embedding, splits_path, features, seed)


def run_clusters(splits_path, export_dir, seed=0):
    """clusters: each slide's hard and soft cluster composition [2K] + the validation-tuned
    logistic regression; DataError for an export without cluster ids."""
    result = _run_vector_task('clusters', cluster_composition, splits_path, export_dir, seed)
    return {**result, 'num_clusters': result['dim'] // 2}
