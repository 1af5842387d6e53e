"""model.dtype=bfloat16: bfloat16 convolutions and matmuls; float32 parameters, BatchNorm
statistics, logits, losses, reductions, gradients, optimizer state and EMA target; and
learning curves within run-to-run noise of float32's."""
import itertools
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from clusiam_jax.models import resnet
from clusiam_jax.models.preprocess import normalize_input
from clusiam_jax.state import create_train_state
from clusiam_jax.train.trainer import build_trainer
from tests.helpers import SyntheticLoader, mesh_of, tiny_config

METHODS = ['clusiam', 'clubyol']
STEPS = 30
# A learning rate at which STEPS steps move the loss well away from its initial value, so
# the curves compared below are learning curves (the tiny config's lr is ~0.0016).
BASE_LR = 1.6
MICRO = 'resnet_micro_test'
REDUCTIONS = ('reduce_sum', 'reduce_max', 'reduce_min', 'argmax', 'cumsum')


def build(method, dtype, base_lr=None, backbone=None, image_size=32, conv_impl='auto'):
    c = tiny_config(method, image_size=image_size)
    c.model.dtype = dtype
    c.model.conv_impl = conv_impl
    if base_lr is not None:
        c.optim.base_lr = base_lr
    if backbone is not None:
        c.model.backbone = backbone
    trainer = build_trainer(c, None, STEPS, SyntheticLoader.mean, SyntheticLoader.std)
    return c, trainer.network, trainer, trainer.step_fn


def new_state(trainer, c, seed=None):
    """The initial state from `seed` (traced inside jit below), else the config's."""
    seed = c.train.seed if seed is None else seed
    return create_train_state(trainer.network, trainer.tx, trainer.has_target, seed,
                              c.data.image_size)


def synthetic_batches(c, n):
    it = SyntheticLoader(n, 1, c.train.batch_size, c.data.image_size).iterator()
    return [next(it) for _ in range(n)]


def first_batch(c):
    return synthetic_batches(c, 1)[0]


def abstract_state(method, dtype):
    c, _, trainer, _ = build(method, dtype)
    return jax.eval_shape(lambda: new_state(trainer, c))


def float_leaf_dtypes(tree):
    return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def equations(jaxpr):
    """Every equation of a jaxpr, nested ones (jit, custom_vjp, scan bodies) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jaxprs_in_params(eqn.params):
            yield from equations(sub)


def operand_dtypes(eqn):
    return tuple(str(v.aval.dtype) for v in eqn.invars)


def onednn_calls(eqns, kind):
    """The oneDNN custom calls (models/onednn.py) whose target names `kind` (conv, pool)."""
    return [e for e in eqns if e.primitive.name == 'ffi_call'
            and e.params['target_name'].startswith(f'clusiam_onednn_{kind}')]


def convolutions(eqns, conv_impl):
    """The network's convolutions: XLA's primitive for im2col (XLA's path), else oneDNN's
    calls, which must have replaced every XLA convolution."""
    xla = [e for e in eqns if e.primitive.name == 'conv_general_dilated']
    if conv_impl == 'im2col':
        return xla
    assert xla == []
    return onednn_calls(eqns, 'conv')


# The XLA path (im2col: XLA's convolutions and matmuls), and oneDNN's custom calls, which
# 'auto' picks for bfloat16 on CPU: both take bf16 operands.
CONV_IMPLS = ['im2col', 'onednn']


@pytest.mark.parametrize('method', METHODS)
def test_state_is_float32_with_the_float32_tree(method):
    bf16, f32 = abstract_state(method, 'bfloat16'), abstract_state(method, 'float32')
    # Every float leaf: params, BN running statistics, optimizer state, EMA target.
    for part in ('params', 'batch_stats', 'opt_state', 'target_params', 'target_batch_stats'):
        assert float_leaf_dtypes(getattr(bf16, part)) <= {'float32'}, part
    # The same names and shapes: checkpoints and PyTorch interop do not see model.dtype.
    shapes = lambda s: jax.tree.map(lambda x: (x.shape, str(x.dtype)), s)
    assert shapes(bf16) == shapes(f32)


@pytest.mark.parametrize('conv_impl', CONV_IMPLS)
@pytest.mark.parametrize('method', METHODS)
def test_forward_convs_and_matmuls_run_in_bfloat16(method, conv_impl):
    c, network, trainer, _ = build(method, 'bfloat16', conv_impl=conv_impl)
    variables = jax.eval_shape(lambda: new_state(trainer, c))
    x = normalize_input(first_batch(c)['view1'], SyntheticLoader.mean, SyntheticLoader.std,
                        network.dtype)
    forward = lambda p, s: network.apply({'params': p, 'batch_stats': s}, x, train=True,
                                         mutable=['batch_stats'])
    closed = jax.make_jaxpr(forward)(variables.params, variables.batch_stats)
    eqns = list(equations(closed.jaxpr))
    convs = convolutions(eqns, conv_impl)
    products = convs + [e for e in eqns if e.primitive.name == 'dot_general']
    assert len(products) >= 10
    # oneDNN takes every one of resnet_tiny's 12 (stem, 8 in blocks, 3 downsamples); im2col
    # turns those on maps smaller than the kernel into dots.
    assert conv_impl == 'im2col' or len(convs) == 12
    assert all(operand_dtypes(e) == ('bfloat16', 'bfloat16') for e in products)
    assert all(operand_dtypes(e) == ('bfloat16',) for e in onednn_calls(eqns, 'max_pool'))
    assert (conv_impl == 'onednn') == bool(onednn_calls(eqns, 'max_pool'))
    for e in onednn_calls(eqns, 'batch_norm'):   # bf16 activations, float32 statistics
        assert operand_dtypes(e)[0] == 'bfloat16'
        assert [str(v.aval.dtype) for v in e.outvars] == ['bfloat16', 'float32', 'float32',
                                                          'uint8']   # the ReLU's mask
    assert all(operand_dtypes(e) == ('bfloat16', 'bfloat16')
               for e in onednn_calls(eqns, 'add_relu'))
    assert (conv_impl == 'onednn') == bool(onednn_calls(eqns, 'add_relu'))
    # BN mean/var and the pooling reduce in float32, never in bfloat16.
    assert {o for e in eqns if e.primitive.name in REDUCTIONS for o in operand_dtypes(e)} == {
        'float32'}
    out, mutated = jax.eval_shape(forward, variables.params, variables.batch_stats)
    assert {k: str(v.dtype) for k, v in out.items()} == dict.fromkeys(out, 'float32')
    assert set(out) >= {'features', 'z', 'p', 'logits'}
    assert float_leaf_dtypes(mutated) == {'float32'}


@pytest.mark.parametrize('conv_impl', CONV_IMPLS)
@pytest.mark.parametrize('method', METHODS)
def test_train_step_reduces_and_updates_in_float32(method, conv_impl):
    c, _, trainer, step = build(method, 'bfloat16', conv_impl=conv_impl)
    state = jax.eval_shape(lambda: new_state(trainer, c))
    batch = first_batch(c)
    eqns = list(equations(jax.make_jaxpr(step)(state, batch).jaxpr))
    convs = convolutions(eqns, conv_impl)
    # Forward and input/filter gradients of the backbone: all bfloat16.
    assert convs and all(operand_dtypes(e) == ('bfloat16', 'bfloat16') for e in convs)
    if conv_impl == 'onednn':
        assert {e.params['target_name'].rsplit('_conv_', 1)[1] for e in convs} == {
            'forward', 'backward_data', 'backward_weights'}
        # The filter gradient comes back in float32, as XLA's preferred_element_type does.
        assert {str(e.outvars[0].aval.dtype) for e in convs
                if e.params['target_name'].endswith('weights')} == {'float32'}
    assert any(operand_dtypes(e) == ('bfloat16', 'bfloat16')
               for e in eqns if e.primitive.name == 'dot_general')
    # No reduction anywhere in the step runs in bfloat16: BN statistics and their
    # gradients, bias gradients, Gumbel softmax, losses, grad norm, diagnostics.
    assert not {o for e in eqns if e.primitive.name in REDUCTIONS + ('exp', 'log')
                for o in operand_dtypes(e)} & {'bfloat16', 'float16'}
    new, metrics = jax.eval_shape(step, state, batch)
    for part in ('params', 'batch_stats', 'opt_state', 'target_params', 'target_batch_stats'):
        assert float_leaf_dtypes(getattr(new, part)) <= {'float32'}, part
    assert float_leaf_dtypes(metrics) == {'float32'}
    assert metrics['loss'].dtype == jnp.float32


@pytest.fixture
def micro_backbone(monkeypatch):
    """A two-stage ResNet (stem, a block, a strided block with its downsample path): the
    training-run test compiles four train steps, and XLA's compile time, which dominates
    it, grows with the backbone's depth. resnet_tiny's full depth is traced above."""
    monkeypatch.setitem(resnet.BACKBONES, MICRO, partial(
        resnet.ResNet, stage_sizes=(1, 1), block=resnet.BasicBlock, width=8))
    monkeypatch.setitem(resnet.FEATURE_WIDTH, MICRO, 16)
    return MICRO


def loss_curves(method, dtype, seeds, backbone):
    """Per-step losses of STEPS steps from each seed (init and Gumbel stream), all on the
    same fixed synthetic batches. One compilation serves every seed."""
    c, _, trainer, step = build(method, dtype, BASE_LR, backbone, image_size=16)
    pool = synthetic_batches(c, 4)
    batches = {k: np.stack([pool[i % len(pool)][k] for i in range(STEPS)])
               for k in ('view1', 'view2')}

    @jax.jit
    def run(seed):
        _, metrics = jax.lax.scan(step, new_state(trainer, c, seed), batches)
        return metrics['loss']
    return [np.asarray(run(jnp.int32(s))) for s in seeds]


def seed_gap(curves, step):
    """Mean |loss_i - loss_j| at `step` over all pairs of seeds: run-to-run noise."""
    return np.mean([abs(a[step] - b[step]) for a, b in itertools.combinations(curves, 2)])


@pytest.mark.parametrize('method', METHODS)
def test_bfloat16_learning_curve_is_within_seed_noise(method, micro_backbone):
    """Training here is chaotic (a Gumbel argmax flips for any perturbation): bfloat16
    rounding, like another seed, puts a run on its own trajectory within ~3 steps, so
    curves are compared where they can agree and, after that, as distributions:

    * step 0 (same init, data and noise, f32 vs bf16 arithmetic only): the gap is a
      small fraction (measured ~2%) of the gap between float32 runs from other seeds;
    * the final loss (mean of the last 10 steps) over SEEDS runs: the bfloat16 and
      float32 means differ by less than 3 standard errors of that difference, the
      standard errors coming from the seed-to-seed spread (Welch's statistic).
    """
    seeds = range(6)
    f32 = np.array(loss_curves(method, 'float32', seeds, micro_backbone))
    bf16 = np.array(loss_curves(method, 'bfloat16', seeds, micro_backbone))
    assert np.isfinite(f32).all() and np.isfinite(bf16).all()

    same_start = np.abs(bf16[:, 0] - f32[:, 0]).mean()
    assert 0 < same_start < 0.1 * seed_gap(f32, 0), (same_start, seed_gap(f32, 0))

    final32, final16 = f32[:, -10:].mean(axis=1), bf16[:, -10:].mean(axis=1)
    stderr = np.sqrt((final32.var(ddof=1) + final16.var(ddof=1)) / len(seeds))
    assert abs(final16.mean() - final32.mean()) < 3 * stderr, (final16, final32)
    # Both learn: the loss falls from its start by more than that noise.
    for curves in (f32, bf16):
        assert curves[:, -10:].mean() < curves[:, 0].mean() - 3 * stderr


def compiled_dot_operand_dtypes(compiled_text):
    """(op_name, operand dtypes) of every dot in compiled HLO, fusion bodies included.
    XLA:CPU has no bf16 kernel for a dot with bf16 output, or one contracting its lhs's
    leading dimension: it converts such a dot's bf16 operands to float32 (~4x slower than
    the bf16 kernel it has for bf16 x bf16 -> float32 on this project's CPUs, issue 27)."""
    dtype_of = dict(re.findall(r'%([\w.\-]+) = \(?(\w+)\[', compiled_text))
    dots = re.finditer(r'= \w+\[[^\n]* dot\(%([\w.\-]+), %([\w.\-]+)\)([^\n]*)', compiled_text)
    return [(re.search(r'op_name="([^"]*)"', m.group(3)).group(1)
             if 'op_name="' in m.group(3) else '',
             (dtype_of.get(m.group(1)), dtype_of.get(m.group(2)))) for m in dots]


@pytest.mark.parametrize('method', METHODS)
def test_compiled_step_keeps_the_networks_matmuls_in_bfloat16(method):
    """Every dot of the networks (heads forward and both gradients, 1x1 and small-map
    convolutions) reaches the compiled step with bf16 operands: none upcast to float32."""
    c = tiny_config(method)
    c.model.dtype = 'bfloat16'
    c.model.conv_impl = 'im2col'   # XLA's path: oneDNN's convolutions are no dots
    # One device: split over the 8 simulated ones, a filter gradient contracts 2 rows,
    # which XLA:CPU's loop emitter (not a matrix kernel) computes, in float32.
    trainer = build_trainer(c, mesh_of(1), STEPS, SyntheticLoader.mean, SyntheticLoader.std)
    state = new_state(trainer, c)
    # At the optimization level training compiles with (conftest lowers the tests' to 0).
    text = trainer.step.lower(state, first_batch(c)).compile(
        compiler_options={'xla_backend_optimization_level': 2}).as_text()
    dots = [(name, dtypes) for name, dtypes in compiled_dot_operand_dtypes(text)
            if 'SSLNetwork' in name or 'Encoder' in name]
    assert len(dots) >= 10
    assert [d for d in dots if d[1] != ('bf16', 'bf16')] == []


def test_low_precision_matmul_gradients():
    from clusiam_jax.models.heads import low_precision_matmul
    rng = np.random.default_rng(0)
    x, k, g = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((8, 24), (24, 40), (8, 40)))
    x16, k16 = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    y, vjp = jax.vjp(low_precision_matmul, x16, k16)
    dx, dk = vjp(g.astype(jnp.bfloat16))
    assert y.dtype == dx.dtype == dk.dtype == jnp.bfloat16
    # float32 reference on the same (rounded) operands: one bf16 rounding off at most.
    x32, k32, g32 = x16.astype(jnp.float32), k16.astype(jnp.float32), g.astype(jnp.bfloat16)
    for got, want in ((y, x32 @ k32), (dx, g32.astype(jnp.float32) @ k32.T),
                      (dk, x32.T @ g32.astype(jnp.float32))):
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-2)
