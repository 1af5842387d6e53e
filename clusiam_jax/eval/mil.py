"""The one trainer of multiple-instance models (docs/method.md §7): DSMIL and ABMIL are a
module, a loss and a score. Bags are zero-padded to a ladder of lengths: few jit shapes."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clusiam_jax.errors import DataError
from clusiam_jax.eval.splits import require_in_export
from clusiam_jax.export.format import read_h5_array, slide_feature_files


def bucket_length(n, min_size=64):
    """Smallest size >= n on the ladder min_size, x sqrt(2), ... (multiples of 8)."""
    if n < 1:
        raise ValueError('a bag needs at least one instance')
    size = min_size
    while size < n:
        size = int(math.ceil(size * math.sqrt(2) / 8.0) * 8)
    return size


def pad_bag(features, min_size=64):
    """(padded features [L, D], mask [L]) with L = bucket_length(N)."""
    features = np.asarray(features, np.float32)
    n = len(features)
    length = bucket_length(n, min_size)
    return np.pad(features, ((0, length - n), (0, 0))), np.arange(length) < n


def adam_l2(betas, weight_decay):
    """PyTorch's Adam(weight_decay): L2 added to the gradient, not AdamW; the step applies
    the learning rate, so one compiled step serves every schedule."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.scale_by_adam(b1=betas[0], b2=betas[1], eps=1e-8))


class Steps:
    """Jitted steps of a module with `loss(outputs, target)` and `score(outputs)`."""

    def __init__(self, model, loss, score, optimizer):
        self.optimizer = optimizer
        self.apply = jax.jit(lambda params, *bag: model.apply({'params': params}, *bag))

        def train_step(params, opt_state, feats, mask, target, lr):
            value, grads = jax.value_and_grad(
                lambda p: loss(model.apply({'params': p}, feats, mask), target))(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return jax.tree.map(lambda p, u: p - lr * u, params, updates), opt_state, value

        def eval_step(params, feats, mask, target):
            outputs = model.apply({'params': params}, feats, mask)
            return score(outputs), loss(outputs, target)

        # Jitted: eager init would compile every primitive separately.
        self.init = jax.jit(model.init)
        self.train_step = jax.jit(train_step, donate_argnums=(0, 1))
        self.eval_step = jax.jit(eval_step)

    def evaluate(self, params, bags):
        """(scores, losses) gathered on the host (jnp.stack would compile once per list length)."""
        out = jax.device_get([self.eval_step(params, *bag[:2], bag[3]) for bag in bags])
        return np.stack([s for s, _ in out]), np.array([loss for _, loss in out])


@functools.lru_cache(maxsize=16)
def steps(model, loss, score, betas, weight_decay):
    """Cached: jit caches per function object, so seeds (and tests) compile each bucket once."""
    return Steps(model, loss, score, adam_l2(tuple(betas), float(weight_decay)))


def device_bags(bags, min_bucket, target):
    """[(padded features, mask, label, target(label))] on the device."""
    return [(jnp.asarray(padded), jnp.asarray(mask), int(label), target(int(label)))
            for (padded, mask), label in ((pad_bag(x, min_bucket), y) for x, y in bags)]


def train(trainer, config, bags, target, select, seed=0, learning_rate=None):
    """Trains on bags['train'] ([(features [N, D], class index)]) one bag per step, at
    `learning_rate(epoch)` (default config.lr); keeps the epoch best on bags['val'] by `select`
    -> (auc, loss): higher AUC (NaN worst), then lower loss; scores bags['test'] with it."""
    if not bags['train'] or not bags['val']:
        raise ValueError('multiple-instance training needs training and validation bags')
    dim = np.shape(bags['train'][0][0])[1]
    train_set, val = (device_bags(bags[s], config.min_bucket, target) for s in ('train', 'val'))
    val_labels = np.array([bag[2] for bag in val])
    params = trainer.init(jax.random.PRNGKey(seed), jnp.zeros((config.min_bucket, dim)),
                          jnp.ones((config.min_bucket,), bool))['params']
    opt_state = trainer.optimizer.init(params)
    order = np.random.default_rng(seed)
    best, history = None, []
    for epoch in range(1, config.epochs + 1):
        lr = np.float32(config.lr if learning_rate is None else learning_rate(epoch - 1))
        losses = []
        for i in order.permutation(len(train_set)):
            feats, mask, _, y = train_set[i]
            params, opt_state, loss = trainer.train_step(params, opt_state, feats, mask, y, lr)
            losses.append(loss)
        scores, val_losses = trainer.evaluate(params, val)
        auc, val_loss = select(val_labels, scores, val_losses)
        history.append({'epoch': epoch, 'train_loss': float(np.mean(jax.device_get(losses))),
                        'val_loss': val_loss, 'val_auc': auc})
        key = (auc if np.isfinite(auc) else -1.0, -val_loss)
        if best is None or key > best['key']:
            # A real copy: on CPU device_get may alias buffers the next (donating) step reuses.
            kept = jax.tree.map(lambda a: np.array(a, copy=True), params)
            best = {'key': key, 'epoch': epoch, 'params': kept,
                    'val': (val_labels, scores, val_losses)}
    out = {'best_epoch': best['epoch'], 'params': best['params'], 'history': history,
           'val': best['val']}
    if bags.get('test'):
        test = device_bags(bags['test'], config.min_bucket, target)
        out['test'] = (np.array([bag[2] for bag in test]), *trainer.evaluate(best['params'], test))
    return out


def read_array(files, slide, key, missing=None):
    """One array of a slide's HDF5 file; DataError naming the slide (or `missing`) if unreadable."""
    try:
        return read_h5_array(files[slide], key)
    except OSError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f'slide {slide}: cannot read {files[slide]} ({first})') from None
    except DataError:
        if missing is None:
            raise
        raise DataError(missing) from None


def slide_features(files, slide, key='features', ndim=2):
    """The patch embeddings [N, D] of a slide (`key`: another array of them, e.g. the
    multi-scale `cat`; ndim 3: augmented copies [N, K, D]), checked: N >= 1, finite."""
    x = read_array(files, slide, key)
    if x.ndim != ndim or x.shape[0] == 0:
        expected = '[patches >= 1, copies, dim]' if ndim == 3 else '[patches >= 1, dim]'
        raise DataError(f'slide {slide}: {files[slide]} holds {key} of shape '
                        f'{list(x.shape)}; expected {expected}')
    if not np.isfinite(x).all():
        raise DataError(f'slide {slide}: {files[slide]} has non-finite {key}')
    return x


def read_slides(export_dir, splits_path, splits, describe=slide_features):
    """{split: ([describe(files, slide)], labels [n])} from an export or a CLAM-style folder."""
    files = slide_feature_files(str(export_dir))
    require_in_export(splits_path, [s for rows in splits.values() for s, _ in rows], files)
    out = {split: ([describe(files, slide) for slide, _ in rows],
                   np.array([label for _, label in rows], np.int64))
           for split, rows in splits.items()}
    sizes = {np.shape(v)[-1] for values, _ in out.values() for v in values}
    if len(sizes) > 1:
        raise DataError(f'{export_dir}: the slides have vectors of different sizes '
                        f'{sorted(sizes)}; evaluate features of one model')
    return out
