"""Linear probe: multinomial logistic regression on frozen embeddings.

Features are standardized with statistics of the training part only. The model
is fitted full-batch with optax's L-BFGS (zoom line search) from zero weights:
the objective (mean cross-entropy + wd/2 |W|^2) is strictly convex for wd > 0,
so the result is deterministic and does not depend on a seed or batch order.
The weight decay is chosen on a validation split, never on the test split.
The training set lives on the device in full ([N, D] float32); subsample
beforehand if that does not fit.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clusiam_jax.eval.metrics import classification_metrics

DEFAULT_WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def fit_standardizer(x, eps=1e-6):
    """Per-feature (mean, std) of x; std floored so constant features stay finite."""
    x = np.asarray(x, dtype=np.float64)
    return x.mean(axis=0).astype(np.float32), np.maximum(x.std(axis=0), eps).astype(np.float32)


def standardize(x, stats):
    mean, std = stats
    return (np.asarray(x, dtype=np.float32) - mean) / std


def validation_split(labels, fraction=0.2, seed=0, groups=None):
    """Indices (train, val) holding out about ``fraction`` of the samples.

    With ``groups`` (e.g. slide ids) whole groups go to one side, so patches of
    one slide never sit on both sides. Without, the split is stratified by label
    (at least one sample per class stays in train).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if groups is not None:
        unique_groups = np.unique(np.asarray(groups))
        shuffled = rng.permutation(unique_groups)
        n_val = int(round(fraction * unique_groups.size))
        n_val = min(max(n_val, 1), unique_groups.size - 1)
        is_val = np.isin(np.asarray(groups), shuffled[:n_val])
    else:
        is_val = np.zeros(labels.shape[0], bool)
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            n_val = min(int(round(fraction * members.size)), members.size - 1)
            is_val[members[:n_val]] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _objective(params, x, y, weight_decay):
    logits = x @ params['w'] + params['b']
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    # The bias is not decayed, as usual for logistic regression.
    return ce + 0.5 * weight_decay * jnp.sum(params['w'] ** 2)


@functools.partial(jax.jit, static_argnames=('num_classes', 'max_iter'))
def _fit_lbfgs(x, y, weight_decay, num_classes, max_iter, tol):
    fun = functools.partial(_objective, x=x, y=y, weight_decay=weight_decay)
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)
    params = {'w': jnp.zeros((x.shape[1], num_classes), jnp.float32),
              'b': jnp.zeros((num_classes,), jnp.float32)}

    def step(carry):
        params, state, _, it = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                       value_fn=fun)
        return optax.apply_updates(params, updates), state, optax.tree.norm(grad), it + 1

    def not_done(carry):
        _, _, grad_norm, it = carry
        return (it < max_iter) & (grad_norm > tol)

    init = (params, solver.init(params), jnp.array(jnp.inf, jnp.float32), jnp.array(0))
    params, _, grad_norm, iters = jax.lax.while_loop(not_done, step, init)
    return params, grad_norm, iters


def fit_logistic_regression(x, y, num_classes, weight_decay, max_iter=500, tol=1e-5):
    """Fits W, b minimizing mean CE(xW + b, y) + wd/2 |W|^2; y are class indices."""
    params, _, _ = _fit_lbfgs(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32),
                              jnp.float32(weight_decay), num_classes=int(num_classes),
                              max_iter=int(max_iter), tol=jnp.float32(tol))
    return jax.device_get(params)


def predict(params, x):
    """Class indices of the argmax logits."""
    return np.argmax(np.asarray(x, np.float32) @ params['w'] + params['b'], axis=1)


def linear_probe(train_x, train_y, test_x, test_y, val_x=None, val_y=None,
                 weight_decays=DEFAULT_WEIGHT_DECAYS, val_fraction=0.2, groups=None,
                 seed=0, selection_metric='accuracy', positive_label=None,
                 max_iter=500):
    """Linear-probe metrics on test, with the weight decay chosen on validation.

    Args:
      train_x, train_y: training embeddings [N, D] and labels (ints or strings).
      test_x, test_y: test embeddings and labels; used once, after selection.
      val_x, val_y: validation set; if absent, ``val_fraction`` of the training
        set is held out (whole ``groups``, e.g. slides, when given; ``seed``
        picks them).
      weight_decays: the sweep; ties in the selection metric go to the larger.
      selection_metric: a key of ``classification_metrics`` (e.g. "accuracy",
        "balanced_accuracy", "macro_f1").

    Returns:
      dict: ``weight_decay`` (chosen), ``val_scores`` {wd: score},
      ``val`` and ``test`` metric dicts, ``classes``.
    """
    train_x = np.asarray(train_x, np.float32)
    train_y = np.asarray(train_y)
    if val_x is None:
        tr, va = validation_split(train_y, val_fraction, seed, groups)
        train_x, val_x = train_x[tr], train_x[va]
        train_y, val_y = train_y[tr], train_y[va]
    classes = np.unique(train_y)
    codes = np.searchsorted(classes, train_y)
    stats = fit_standardizer(train_x)
    train_z = standardize(train_x, stats)
    val_z = standardize(val_x, stats)

    val_scores, val_metrics, fitted = {}, {}, {}
    for wd in sorted(weight_decays):
        params = fit_logistic_regression(train_z, codes, classes.size, wd, max_iter)
        metrics = classification_metrics(np.asarray(val_y), classes[predict(params, val_z)],
                                         positive_label=positive_label)
        val_scores[wd], val_metrics[wd], fitted[wd] = metrics[selection_metric], metrics, params
    # Ascending sweep + ">=" picks the largest wd among equal scores (the most
    # regularized model that does as well).
    best_wd = None
    for wd in sorted(val_scores):
        if best_wd is None or val_scores[wd] >= val_scores[best_wd]:
            best_wd = wd
    test_pred = classes[predict(fitted[best_wd], standardize(test_x, stats))]
    return {
        'weight_decay': best_wd,
        'val_scores': val_scores,
        'val': val_metrics[best_wd],
        'test': classification_metrics(np.asarray(test_y), test_pred,
                                       positive_label=positive_label),
        'classes': classes.tolist(),
    }
