"""models/batch_norm.py: the hand-written training-mode gradient against autodiff of the
plain formula, in float32 and bfloat16, and PyTorch's running-statistics rule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusiam_jax.models.batch_norm import BN_EPSILON, BatchNorm, normalize_with_batch_stats


def plain_batch_norm(x, scale, bias):
    """The training-mode formula, differentiated by JAX (the independent reference)."""
    x32 = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x32, axes)
    var = jnp.mean(jnp.square(x32 - mean), axes)
    return (x32 - mean) * jax.lax.rsqrt(var + BN_EPSILON) * scale + bias


def random_inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    # A per-channel offset and spread, so mean and variance terms of the gradient matter.
    x = rng.normal(size=shape) * rng.uniform(0.5, 3.0, c) + rng.normal(size=c) * 4
    return (jnp.asarray(x, jnp.float32), jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32),
            jnp.asarray(rng.normal(size=c), jnp.float32),
            jnp.asarray(rng.normal(size=shape), jnp.float32))


def max_relative_error(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize('shape', [(6, 5, 5, 8), (16, 12)])   # conv maps, projector rows
def test_gradient_matches_autodiff(shape):
    x, scale, bias, dy = random_inputs(shape)
    # A loss that is not linear in y (the ReLU), so every gradient term is exercised.
    loss = lambda f: lambda x_, s_, b_: jnp.sum(jax.nn.relu(f(x_, s_, b_)) * dy)
    ours = lambda x_, s_, b_: normalize_with_batch_stats(x_, s_, b_, BN_EPSILON, jnp.float32)
    y, y_ref = ours(x, scale, bias), plain_batch_norm(x, scale, bias)
    assert max_relative_error(y, y_ref) < 1e-5
    grads = jax.grad(loss(ours), argnums=(0, 1, 2))(x, scale, bias)
    expected = jax.grad(loss(plain_batch_norm), argnums=(0, 1, 2))(x, scale, bias)
    for got, want in zip(grads, expected):
        assert max_relative_error(got, want) < 1e-4


def test_bfloat16_keeps_activation_dtype_and_float32_statistics():
    x, scale, bias, dy = random_inputs((6, 5, 5, 8))
    xb = x.astype(jnp.bfloat16)
    f = lambda x_: normalize_with_batch_stats(x_, scale, bias, BN_EPSILON, jnp.bfloat16)
    y, vjp = jax.vjp(f, xb)
    (dx,) = vjp(dy.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
    # Against float32 maths on the same (bf16-rounded) input: bf16 rounding of y and dx.
    ref_y, ref_vjp = jax.vjp(lambda x_: plain_batch_norm(x_, scale, bias), xb.astype(jnp.float32))
    (ref_dx,) = ref_vjp(dy.astype(jnp.bfloat16).astype(jnp.float32))
    assert max_relative_error(y, ref_y) < 1e-2
    assert max_relative_error(dx, ref_dx) < 2e-2


@pytest.mark.parametrize('affine', [True, False])
def test_module_running_statistics_follow_pytorch(affine):
    x, _, _, dy = random_inputs((4, 3, 3, 5), seed=1)
    bn = BatchNorm(use_running_average=False, affine=affine)
    variables = bn.init(jax.random.PRNGKey(0), x)
    assert ('params' in variables) == affine
    y, mutated = bn.apply(variables, x, mutable=['batch_stats'])
    xs = np.asarray(x, np.float64).reshape(-1, 5)
    # PyTorch: running = 0.9 * running + 0.1 * batch, with the *unbiased* batch variance.
    np.testing.assert_allclose(mutated['batch_stats']['mean'], 0.1 * xs.mean(0), rtol=1e-5)
    np.testing.assert_allclose(mutated['batch_stats']['var'], 0.9 + 0.1 * xs.var(0, ddof=1),
                               rtol=1e-5)
    expected = (xs - xs.mean(0)) / np.sqrt(xs.var(0) + BN_EPSILON)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 5), expected, rtol=1e-4, atol=1e-5)
    # Inference mode normalizes with the running statistics it was given.
    inference = BatchNorm(use_running_average=True, affine=affine)
    stats = mutated['batch_stats']
    y_eval = inference.apply({**variables, 'batch_stats': stats}, x)
    expected_eval = ((xs - np.asarray(stats['mean']))
                     / np.sqrt(np.asarray(stats['var']) + BN_EPSILON))
    np.testing.assert_allclose(np.asarray(y_eval).reshape(-1, 5), expected_eval, rtol=1e-4,
                               atol=1e-5)
    if affine:   # the module's parameter gradients reach scale and bias
        grads = jax.grad(lambda p: jnp.sum(bn.apply({**variables, 'params': p}, x,
                                                    mutable=['batch_stats'])[0] * dy))(
            variables['params'])
        np.testing.assert_allclose(grads['bias'], np.asarray(dy).reshape(-1, 5).sum(0),
                                   rtol=1e-5)
