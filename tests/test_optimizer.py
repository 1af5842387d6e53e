"""Coupled-decay SGD, fix_pred_lr, the per-epoch cosine and the EMA, by hand."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from clusiam_jax.train import optimizer
from tests.helpers import tiny_config


def params_and_grads():
    rng = np.random.default_rng(0)
    tree = lambda: {'encoder': {'w': rng.normal(size=(3, 2)).astype(np.float32)},
                    'predictor': {'w': rng.normal(size=(2,)).astype(np.float32)}}
    return tree(), [tree(), tree(), tree()]


def run(tx, params, grads):
    state = tx.init(params)
    history = []
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        history.append(params)
    return history


def test_sgd_matches_pytorch_coupled_decay_by_hand():
    params, grads = params_and_grads()
    lr, wd, m = 0.1, 1e-2, 0.9
    got = run(optimizer.coupled_sgd(lr, wd, m), params, grads)
    p = jax.tree.map(np.float64, params)
    buf = None
    for g, step_params in zip(grads, got):
        d = jax.tree.map(lambda gi, pi: gi + wd * pi, g, p)           # d = g + wd * p
        buf = d if buf is None else jax.tree.map(lambda b, di: m * b + di, buf, d)
        p = jax.tree.map(lambda pi, b: pi - lr * b, p, buf)           # p -= lr * buf
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     step_params, p)


def test_per_epoch_cosine_matches_formula():
    schedule = optimizer.per_epoch_cosine(0.2, steps_per_epoch=5, num_epochs=4)
    for step in range(20):
        epoch = step // 5
        want = 0.2 * 0.5 * (1 + math.cos(math.pi * epoch / 4))
        np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-6)


def test_initial_lr_scales_with_batch():
    c = tiny_config()
    c.train.batch_size, c.optim.base_lr = 512, 0.05
    assert optimizer.initial_lr(c) == 0.1


def test_fix_pred_lr_keeps_the_predictor_at_the_initial_lr():
    c = tiny_config('clusiam')
    c.train.num_epochs, c.optim.momentum, c.optim.weight_decay = 4, 0.0, 0.0
    params, grads = params_and_grads()
    lr0 = optimizer.initial_lr(c)
    for fixed in (True, False):
        c.optim.fix_pred_lr = fixed
        tx, schedule = optimizer.make_optimizer(c, steps_per_epoch=1)
        state = tx.init(params)
        for _ in range(3):  # the third step is in epoch 2: scheduled lr = lr0 / 2
            updates, state = tx.update(grads[0], state, params)
        lr_now = float(schedule(2))
        np.testing.assert_allclose(lr_now, lr0 * 0.5, rtol=1e-6)
        np.testing.assert_allclose(updates['encoder']['w'], -lr_now * grads[0]['encoder']['w'],
                                   rtol=1e-5)
        want_pred_lr = lr0 if fixed else lr_now
        np.testing.assert_allclose(updates['predictor']['w'],
                                   -want_pred_lr * grads[0]['predictor']['w'], rtol=1e-5)


def test_ema_update_and_cosine_schedule():
    target = {'a': jnp.array([1.0, 2.0])}
    online = {'a': jnp.array([3.0, -1.0])}
    out = optimizer.ema_update(target, online, 0.99)
    np.testing.assert_allclose(out['a'], 0.99 * np.array([1.0, 2.0]) + 0.01 * np.array([3.0, -1.0]),
                               rtol=1e-6)
    c = tiny_config('clubyol')
    c.ema.momentum, c.ema.schedule = 0.996, 'cosine'
    m = optimizer.ema_momentum(c, total_steps=100)
    np.testing.assert_allclose([float(m(0)), float(m(50)), float(m(100))],
                               [0.996, 0.998, 1.0], rtol=1e-6)
    c.ema.schedule = 'constant'
    assert float(optimizer.ema_momentum(c, 100)(37)) == np.float32(0.996)


def test_warmup_then_per_epoch_cosine():
    schedule = optimizer.per_epoch_cosine(0.4, steps_per_epoch=4, num_epochs=6, warmup_epochs=2)
    for step in range(24):
        if step < 8:
            want = 0.4 * (step + 1) / 8
        else:
            want = 0.4 * 0.5 * (1 + math.cos(math.pi * ((step - 8) // 4) / 4))
        np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-6)


def test_lars_adapts_kernels_and_leaves_biases_plain():
    c = tiny_config('clubyol')
    c.optim.name, c.optim.weight_decay, c.optim.momentum = 'lars', 1e-3, 0.9
    tx, schedule = optimizer.make_optimizer(c, steps_per_epoch=10)
    lr = float(schedule(0))
    rng = np.random.default_rng(1)
    params = {'encoder': {'kernel': rng.normal(size=(4, 3)).astype(np.float32),
                          'bias': rng.normal(size=(3,)).astype(np.float32)}}
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    w, g = params['encoder']['kernel'], grads['encoder']['kernel']
    d = g + 1e-3 * w                                    # decay on kernels only
    trust = 0.001 * np.linalg.norm(w) / np.linalg.norm(d)  # LARS trust ratio
    np.testing.assert_allclose(updates['encoder']['kernel'], -lr * trust * d, rtol=1e-4)
    np.testing.assert_allclose(updates['encoder']['bias'], -lr * grads['encoder']['bias'],
                               rtol=1e-5)
