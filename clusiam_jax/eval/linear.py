"""Linear probe: logistic regression on standardized frozen embeddings, full-batch L-BFGS
from zero weights (strictly convex for weight decay > 0: no seed or order matters); the
weight decay is chosen on validation, never on test."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clusiam_jax.eval.metrics import classification_metrics

DEFAULT_WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def standardizer(train_x):
    """x -> float32 z-scores by `train_x`'s per-feature mean and std (floored: finite)."""
    x = np.asarray(train_x, np.float64)
    mean = x.mean(axis=0).astype(np.float32)
    std = np.maximum(x.std(axis=0), 1e-6).astype(np.float32)
    return lambda v: (np.asarray(v, np.float32) - mean) / std


def validation_split(labels, fraction=0.2, seed=0, groups=None):
    """Indices (train, val) holding out about `fraction`: whole `groups` (slides), else
    stratified by label with at least one sample per class left in train."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if groups is not None:
        unique_groups = np.unique(np.asarray(groups))
        shuffled = rng.permutation(unique_groups)
        n_val = min(max(int(round(fraction * unique_groups.size)), 1), unique_groups.size - 1)
        is_val = np.isin(np.asarray(groups), shuffled[:n_val])
    else:
        is_val = np.zeros(labels.shape[0], bool)
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            is_val[members[:min(int(round(fraction * members.size)), members.size - 1)]] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


@functools.partial(jax.jit, static_argnames=('num_classes', 'max_iter'))
def _fit_lbfgs(x, y, weight_decay, num_classes, max_iter, tol):
    def fun(params):
        ce = optax.softmax_cross_entropy_with_integer_labels(x @ params['w'] + params['b'], y)
        return ce.mean() + 0.5 * weight_decay * jnp.sum(params['w'] ** 2)  # bias not decayed

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)
    params = {'w': jnp.zeros((x.shape[1], num_classes), jnp.float32),
              'b': jnp.zeros((num_classes,), jnp.float32)}

    def step(carry):
        params, state, _, it = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        return optax.apply_updates(params, updates), state, optax.tree.norm(grad), it + 1

    init = (params, solver.init(params), jnp.array(jnp.inf, jnp.float32), jnp.array(0))
    # carry: (params, state, gradient norm, iterations)
    return jax.lax.while_loop(lambda c: (c[3] < max_iter) & (c[2] > tol), step, init)[0]


def fit_logistic_regression(x, y, num_classes, weight_decay, max_iter=500, tol=1e-5):
    """{w, b} minimizing mean CE(xW + b, y) + wd/2 |W|^2; y are class indices."""
    params = _fit_lbfgs(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32),
                        jnp.float32(weight_decay), num_classes=int(num_classes),
                        max_iter=int(max_iter), tol=jnp.float32(tol))
    return jax.device_get(params)


def fit_sweep(x, y, num_classes, weight_decays):
    """{weight decay: fit_logistic_regression's params}, in ascending order."""
    return {wd: fit_logistic_regression(x, y, num_classes, wd) for wd in sorted(weight_decays)}


def linear_probe(train_x, train_y, test_x, test_y, val_x=None, val_y=None,
                 weight_decays=DEFAULT_WEIGHT_DECAYS, groups=None, seed=0, positive_label=None):
    """Test classification_metrics with the weight decay best on val accuracy (larger on ties);
    without val, 20% of train (whole `groups`, e.g. slides; `seed` picks them) is held out."""
    train_x, train_y = np.asarray(train_x, np.float32), np.asarray(train_y)
    if val_x is None:
        tr, va = validation_split(train_y, 0.2, seed, groups)
        train_x, val_x = train_x[tr], train_x[va]
        train_y, val_y = train_y[tr], train_y[va]
    classes = np.unique(train_y)
    z = standardizer(train_x)

    def metrics(params, x, y):
        predicted = np.argmax(z(x) @ params['w'] + params['b'], axis=1)
        return classification_metrics(y, classes[predicted], positive_label=positive_label)

    fits = fit_sweep(z(train_x), np.searchsorted(classes, train_y), classes.size, weight_decays)
    val = {wd: metrics(params, val_x, val_y) for wd, params in fits.items()}
    best = max(val, key=lambda wd: (val[wd]['accuracy'], wd))
    return {'weight_decay': best, 'val_scores': {wd: m['accuracy'] for wd, m in val.items()},
            'val': val[best], 'test': metrics(fits[best], test_x, test_y),
            'classes': classes.tolist()}
