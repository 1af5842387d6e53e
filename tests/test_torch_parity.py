"""Parity with a PyTorch reference written from docs/method.md: cluster similarity and a
whole training step (per-view BN, straight-through assignment, coupled-decay SGD with
momentum, per-epoch cosine with fix_pred_lr, EMA target). Skipped without torch.

The reference lives in tests/torch_reference.py; both sides start from the
same weights (the torch model's, imported) and see the same batch and Gumbel noise (drawn
with the JAX calls our step makes).
"""
import functools

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('torchvision')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from clusiam_jax import losses  # noqa: E402
from clusiam_jax.interop import from_torch, to_torch  # noqa: E402
from clusiam_jax.models.resnet import BACKBONES, FEATURE_WIDTH, BasicBlock, ResNet  # noqa: E402
from clusiam_jax.state import state_from_weights  # noqa: E402
from clusiam_jax.train.trainer import build_trainer  # noqa: E402
from tests import torch_reference as ref  # noqa: E402
from tests.helpers import mesh_of  # noqa: E402

# ------------------------------------------------------------ cluster similarity

def _cluster_case(case, n=64, d=32, k=10, seed=0):
    rng = np.random.RandomState(seed)
    reps = rng.randn(n, d).astype(np.float32)
    logits = rng.randn(n, k).astype(np.float32)
    gumbel = rng.gumbel(size=(n, k)).astype(np.float32)
    if case == 'few_clusters':       # most clusters empty: zero centroids must drop out
        logits[:, :3] += 8.0
    elif case == 'one_cluster':      # S = 1 with zero gradient
        logits[:, 0] += 50.0
    elif case == 'zero_rows':        # all-zero representations (eps branch of normalize)
        reps[:5] = 0.0
    return reps, logits, gumbel


@pytest.mark.parametrize('case', ['random', 'few_clusters', 'one_cluster', 'zero_rows'])
def test_cluster_similarity_matches_reference(case):
    reps, logits, gumbel = _cluster_case(case)
    with jax.default_matmul_precision('highest'):
        value, grad = jax.value_and_grad(losses.cluster_similarity, argnums=1)(
            jnp.asarray(reps), jnp.asarray(logits), jnp.asarray(gumbel))
    t_logits = torch.tensor(logits, requires_grad=True)
    t_value = ref.cluster_similarity(torch.tensor(reps), t_logits, torch.tensor(gumbel))
    if t_value.requires_grad:
        t_value.backward()
    t_grad = np.zeros_like(logits) if t_logits.grad is None else t_logits.grad.numpy()
    assert abs(float(value) - float(t_value.detach())) < 1e-6
    np.testing.assert_allclose(np.asarray(grad), t_grad, atol=1e-6, rtol=0)
    assert np.all(np.isfinite(np.asarray(grad)))
    if case == 'one_cluster':
        assert float(value) == 1.0 and not np.any(np.asarray(grad))


# ------------------------------------------------------------ one training step

BATCH, IMAGE, STEPS = 4, 32, 2
SIZES = {'clusiam': dict(feat_size=32, pred_hidden=16, num_clusters=6),
         'clubyol': dict(feat_size=24, pred_hidden=48, num_clusters=6)}
MEAN, STD = (0.6684, 0.5115, 0.6791), (0.2521, 0.2875, 0.2100)


@pytest.fixture
def resnet10(monkeypatch):
    """One BasicBlock per stage (torchvision's ResNet class, half of resnet18's depth):
    every code path of the step at about half the compile time."""
    monkeypatch.setitem(BACKBONES, 'resnet10',
                        functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), block=BasicBlock))
    monkeypatch.setitem(FEATURE_WIDTH, 'resnet10', 512)


def _reference(method):
    torch.manual_seed(1)
    model = ref.ReferenceNetwork(method, 'resnet10', **SIZES[method])
    ref.randomize_(model, 1)
    with torch.no_grad():
        # Frozen and cancelled by the BN that follows; zero keeps running means comparable
        # key by key (the import folds a non-zero one into fc.7's running mean).
        model.encoder.fc[6].bias.zero_()
        if method == 'clubyol':
            model.target_encoder.load_state_dict(model.encoder.state_dict())
    return model


def _batches(seed=0):
    rng = np.random.RandomState(seed)
    shape = (STEPS, BATCH, IMAGE, IMAGE, 3)
    return rng.randint(0, 256, shape, np.uint8), rng.randint(0, 256, shape, np.uint8)


def _torch_view(x_uint8):
    x = (x_uint8.astype(np.float32) / 255.0 - np.float32(MEAN)) / np.float32(STD)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _gumbel(state):
    """The noise our step draws at state.step, by the same calls."""
    key = jax.random.fold_in(state.rng, state.step)
    gumbel_key, _ = jax.random.split(key)
    k = state.params['cluster_head']['assigner']['kernel'].shape[1]
    return np.array(losses.sample_gumbel(gumbel_key, (2 * BATCH, k)))


class _TorchRun:
    """The reference, stepped in lockstep with ours, in float32 or float64."""

    def __init__(self, method, dtype, config, init_lr):
        self.dtype, self.config, self.init_lr = dtype, config, init_lr
        self.model = _reference(method).to(dtype)
        self.optimizer = ref.make_sgd(self.model, init_lr, config.optim.momentum,
                                      config.optim.weight_decay, config.optim.fix_pred_lr)

    def step(self, i, view1, view2, noise):
        ref.set_epoch_lr(self.optimizer, self.init_lr, i, STEPS)
        as_tensor = lambda x: x.to(self.dtype)
        return ref.train_step(self.model, self.optimizer, as_tensor(_torch_view(view1)),
                              as_tensor(_torch_view(view2)), as_tensor(torch.from_numpy(noise)),
                              self.config.loss.alpha, self.config.ema.momentum)

    def weights(self):
        return {k: v.double().numpy() for k, v in self.model.state_dict().items()
                if not k.endswith('num_batches_tracked')}


def _ours(state):
    return to_torch.network_state_dict(*jax.device_get(
        (state.params, state.batch_stats, state.target_params, state.target_batch_stats)))


def _relative_error(a, b, start):
    """The worst online tensor's |a - b| / |b - start| (L2 norms): the error relative to
    how far the step moved that tensor. Tensors that did not move (the frozen bias) must
    be equal. The EMA target moves by 1% of an update, below float32 resolution at small
    learning rates, so its tensors are compared in absolute terms (_target_error)."""
    worst = 0.0
    for k in (k for k in b if not k.startswith('target_encoder.')):
        moved = np.linalg.norm(b[k] - start[k])
        error = np.linalg.norm(a[k] - b[k])
        if moved == 0:
            assert error < 1e-6, k
            continue
        worst = max(worst, error / moved)
    return worst


def _target_error(a, b):
    keys = [k for k in b if k.startswith('target_encoder.')]
    return max((float(np.max(np.abs(a[k] - b[k]))) for k in keys), default=0.0)


@pytest.mark.parametrize('method', ['clusiam', 'clubyol'])
def test_train_steps_match_reference(method, resnet10):
    """Two steps from the same weights, steps_per_epoch=1 over 2 epochs: the second step
    has the halved cosine lr (for CluSiam the predictor keeps its fixed lr), the momentum
    buffers of the first, and (CluBYOL) a target that has moved once.

    Step 1 must match PyTorch float32 tensor by tensor. Later steps amplify float32
    rounding: BatchNorm over 4 samples of 1x1 maps divides by tiny variances, and PyTorch
    float32 itself then drifts from float64 by a few percent of the update. There the
    check is that we are as close to the float64 reference as PyTorch float32 is; a wrong
    lr, momentum or EMA would be off by the size of a whole update.
    """
    init_lr = 1e-3
    start = {k: v.detach().numpy().astype(np.float64)
             for k, v in _reference(method).state_dict().items()
             if not k.endswith('num_batches_tracked')}
    config, weights = from_torch.import_state_dict(
        {k: v.astype(np.float32) for k, v in start.items()}, method)
    config.train.batch_size = BATCH
    config.train.num_epochs = STEPS
    config.optim.base_lr = init_lr * 256 / BATCH

    trainer = build_trainer(config, mesh_of(1), steps_per_epoch=1, mean=MEAN, std=STD)
    state = state_from_weights(weights, trainer.tx, config.train.seed)
    step = jax.jit(trainer.step_fn)
    t32 = _TorchRun(method, torch.float32, config, init_lr)
    t64 = _TorchRun(method, torch.float64, config, init_lr)
    views1, views2 = _batches()
    report = []
    for i in range(STEPS):
        noise = _gumbel(state)
        with jax.default_matmul_precision('highest'):
            state, metrics = step(state, {'view1': jnp.asarray(views1[i]),
                                          'view2': jnp.asarray(views2[i])})
        m32 = t32.step(i, views1[i], views2[i], noise)
        t64.step(i, views1[i], views2[i], noise)
        ours, w32, w64 = _ours(state), t32.weights(), t64.weights()
        assert sorted(w32) == sorted(k for k in ours if not k.endswith('num_batches_tracked'))
        ours_error = _relative_error(ours, w64, start)
        torch_error = _relative_error(w32, w64, start)
        ours_target, torch_target = _target_error(ours, w64), _target_error(w32, w64)
        report.append((i, ours_error, torch_error, ours_target, torch_target,
                       float(metrics['loss']) - m32['loss']))
        if i == 0:
            assert abs(float(metrics['loss']) - m32['loss']) < 1e-4
            assert abs(float(metrics['cluster_similarity']) - m32['cluster_similarity']) < 1e-5
            for key in w32:
                moved = np.max(np.abs(w32[key] - start[key]))
                error = np.max(np.abs(ours[key] - w32[key]))
                assert error <= 1e-6 + 1e-3 * moved, (key, error, moved)
        assert ours_error <= 3 * torch_error + 1e-4, report
        assert ours_target <= 3 * torch_target + 1e-6, report
    # The steps really moved the weights (steps that did nothing would also "match").
    w = 'encoder.layer1.0.conv1.weight'
    assert np.max(np.abs(ours[w] - start[w])) > 1e-5
