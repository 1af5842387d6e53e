"""The train step: per-view BatchNorm, the EMA target and its own BN statistics, and
sharding invariance (1 device vs 8 simulated devices)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusiam_jax.models import build_target_encoder
from clusiam_jax.models.preprocess import normalize_input
from clusiam_jax.train.step import apply_per_view
from clusiam_jax.train.trainer import build_trainer
from tests.helpers import SyntheticLoader, mesh_of, tiny_config

STEPS_PER_EPOCH = 3


def build(method, mesh):
    c = tiny_config(method)
    trainer = build_trainer(c, mesh, STEPS_PER_EPOCH, SyntheticLoader.mean, SyntheticLoader.std)
    return c, trainer


def batches(c, n):
    it = SyntheticLoader(STEPS_PER_EPOCH, c.train.num_epochs, c.train.batch_size,
                         c.data.image_size).iterator()
    return [next(it) for _ in range(n)]


@pytest.fixture(scope='module')
def clubyol_two_steps():
    """State before and after the second step of a tiny CluBYOL (no donation: kept)."""
    c, trainer = build('clubyol', mesh_of(1))
    step = jax.jit(trainer.step_fn)
    b1, b2 = batches(c, 2)
    state1, _ = step(trainer.init_state(), b1)
    state2, metrics = step(state1, b2)
    return c, trainer.network, state1, state2, b2, metrics


def views_of(batch, network):
    return [normalize_input(batch[k], SyntheticLoader.mean, SyntheticLoader.std, network.dtype)
            for k in ('view1', 'view2')]


def test_ema_target_follows_the_formula(clubyol_two_steps):
    _, _, before, after, _, metrics = clubyol_two_steps
    m = float(metrics['ema_momentum'])
    assert m == np.float32(0.99)
    want = jax.tree.map(lambda t, o: m * t + (1 - m) * o, before.target_params,
                        after.params['encoder'])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 after.target_params, want)
    # And the target really lags: it is not the online encoder.
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                                         after.target_params, after.params['encoder']))
    assert max(diffs) > 1e-6


def test_target_batch_stats_come_from_its_own_forward(clubyol_two_steps):
    _, network, before, after, batch, _ = clubyol_two_steps
    target = build_target_encoder(network)
    _, want = jax.jit(lambda p, s, v: apply_per_view(target, p, s, v))(
        before.target_params, before.target_batch_stats, views_of(batch, network))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 after.target_batch_stats, want)
    # Not an EMA of the online statistics.
    ema_of_online = jax.tree.map(lambda t, o: 0.99 * t + 0.01 * o, before.target_batch_stats,
                                 after.batch_stats['encoder'])
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                                         after.target_batch_stats, ema_of_online))
    assert max(diffs) > 1e-4


def stem_moments(params, x):
    """Mean and biased variance over N, H, W of the stem convolution (7x7/2, pad 3)."""
    kernel = params['encoder']['backbone']['conv1']['kernel']
    y = jax.lax.conv_general_dilated(x, kernel, (2, 2), ((3, 3), (3, 3)),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                     precision=jax.lax.Precision.HIGHEST)
    return np.asarray(y.mean((0, 1, 2))), np.asarray(y.var((0, 1, 2)))


def test_batchnorm_runs_once_per_view(clubyol_two_steps):
    """Running stats update twice per step, view 1 first; not one concatenated batch."""
    _, network, before, after, batch, _ = clubyol_two_steps
    v1, v2 = views_of(batch, network)
    (mu1, var1), (mu2, var2) = stem_moments(before.params, v1), stem_moments(before.params, v2)
    old = before.batch_stats['encoder']['backbone']['bn1']
    new = after.batch_stats['encoder']['backbone']['bn1']
    # PyTorch semantics: the running variance averages the unbiased batch variance.
    n = v1.shape[0] * (v1.shape[1] // 2) * (v1.shape[2] // 2)
    var1, var2 = var1 * n / (n - 1), var2 * n / (n - 1)
    per_view_mean = 0.9 * (0.9 * old['mean'] + 0.1 * mu1) + 0.1 * mu2
    per_view_var = 0.9 * (0.9 * old['var'] + 0.1 * var1) + 0.1 * var2
    np.testing.assert_allclose(new['mean'], per_view_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new['var'], per_view_var, rtol=1e-4, atol=1e-5)
    mu_cat, var_cat = stem_moments(before.params, jnp.concatenate([v1, v2]))
    concatenated_var = 0.9 * old['var'] + 0.1 * var_cat * (2 * n) / (2 * n - 1)
    assert np.abs(np.asarray(new['var']) - concatenated_var).max() > 1e-3
    # Every BN layer of the online network matches a per-view forward done by hand.
    _, want = jax.jit(lambda p, s, v: apply_per_view(network, p, s, v))(
        before.params, before.batch_stats, [v1, v2])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 after.batch_stats, want)


@pytest.mark.parametrize('method', ['clubyol', 'clusiam'])
def test_one_device_equals_eight_devices(method):
    assert jax.device_count() >= 8, 'tests/conftest.py sets 8 simulated CPU devices'
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:8]):
        c, trainer = build(method, mesh_of(len(devices)))
        state, losses = trainer.init_state(), []
        for batch in batches(c, 3):
            state, metrics = trainer.step(state, batch)
            losses.append(float(metrics['loss']))
        assert state.params['encoder']['backbone']['conv1']['kernel'].sharding.is_fully_replicated
        results.append((losses, jax.device_get(state)))
    (losses1, state1), (losses8, state8) = results
    np.testing.assert_allclose(losses1, losses8, rtol=1e-5, atol=1e-6)
    for tree1, tree8 in ((state1.params, state8.params),
                         (state1.batch_stats, state8.batch_stats),
                         (state1.target_params, state8.target_params)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                     tree1, tree8)
