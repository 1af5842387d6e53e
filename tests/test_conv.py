"""model.conv_impl='im2col' (models/conv.py) against XLA's convolution: values and both
gradients for every convolution shape the ResNets use, and a whole network."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from clusiam_jax.config import validate
from clusiam_jax.errors import ConfigError
from clusiam_jax.models import build_network
from clusiam_jax.models.conv import (
    compiler_options,
    flax_conv_fn,
    fusion_barrier,
    im2col_conv,
    max_pool,
)
from tests.helpers import tiny_config

# (map size, input channels, output channels, kernel, stride, padding), as in ResNet:
SHAPES = [
    (20, 3, 8, 7, 2, 3),    # the RGB stem (few input channels)
    (9, 16, 16, 3, 1, 1),   # a 3x3 block convolution
    (9, 16, 24, 3, 2, 1),   # the strided 3x3 of a stage's first block
    (8, 16, 24, 1, 2, 0),   # the 1x1 strided downsample
    (2, 16, 16, 3, 1, 1),   # a map smaller than the kernel (layer4 at 64 px input)
    (4, 16, 16, 3, 2, 1),   # an output map smaller than the kernel (4x4 -> 2x2)
    (2, 16, 16, 3, 2, 1),   # a strided kernel on a tiny map (2x2 -> 1x1)
    (1, 16, 16, 3, 1, 1),   # 1x1 map, the extreme case
]


def xla_conv(x, w, stride, pad):
    return lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                    precision=lax.Precision.HIGHEST)


def random_pair(size, cin, cout, kernel, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(3, size, size, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)) / kernel, jnp.float32)
    return x, w


def relative_error(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                 / jnp.max(jnp.abs(b.astype(jnp.float32))))


@pytest.mark.parametrize('size,cin,cout,kernel,stride,pad', SHAPES)
def test_values_and_gradients_match_xla(size, cin, cout, kernel, stride, pad):
    x, w = random_pair(size, cin, cout, kernel)
    padding = ((pad, pad), (pad, pad))
    ours = im2col_conv(x, w, (stride, stride), padding)
    assert ours.shape == xla_conv(x, w, stride, pad).shape
    assert relative_error(ours, xla_conv(x, w, stride, pad)) < 1e-5

    # A non-linear loss, so the incoming cotangent varies per output element.
    def loss(conv):
        return lambda x_, w_: jnp.sum(jnp.tanh(conv(x_, w_)) * jnp.arange(cout))

    grads = jax.grad(loss(lambda a, b: im2col_conv(a, b, (stride, stride), padding)),
                     (0, 1))(x, w)
    expected = jax.grad(loss(lambda a, b: xla_conv(a, b, stride, pad)), (0, 1))(x, w)
    for got, want in zip(grads, expected):
        assert got.dtype == want.dtype
        assert relative_error(got, want) < 1e-4


@pytest.mark.parametrize('size', [9, 2])   # XLA's convolution; the all-matmul tiny map
def test_bfloat16_inputs_keep_dtypes_and_values(size):
    x, w = random_pair(size, 16, 16, 3)
    x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    out = im2col_conv(x16, w16, (1, 1), ((1, 1), (1, 1)))
    assert out.dtype == jnp.bfloat16
    assert relative_error(out, xla_conv(x, w, 1, 1)) < 2e-2
    dx, dw = jax.grad(lambda a, b: jnp.sum(im2col_conv(a, b, (1, 1), ((1, 1), (1, 1)))
                                           .astype(jnp.float32) ** 2), (0, 1))(x16, w16)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    want = jax.grad(lambda b: jnp.sum(xla_conv(x, b, 1, 1) ** 2))(w)
    assert relative_error(dw, want) < 3e-2


def ynn_convolutions(compiled_text):
    """How many YNNPACK fusions of the compiled HLO hold a convolution."""
    computations = re.split(r'\n(?=\S)', compiled_text)   # one block per computation
    called = set(re.findall(r'kind=kCustom, calls=%?([\w.\-]+)', compiled_text))
    return sum(1 for block in computations
               if block.split(' ', 1)[0].lstrip('%') in called and ' convolution(' in block)


def test_cpu_compiler_options_take_convolutions_off_ynnpack():
    """conv_impl im2col on CPU compiles convolutions with XLA's own kernels (conv.py)."""
    assert compiler_options('xla') is None
    options = compiler_options('im2col')
    assert options is not None and compiler_options('auto') == options   # the CPU backend
    # A layer1-like shape, large enough for XLA:CPU to hand it to YNNPACK by default.
    x, w = random_pair(28, 64, 64, 3)
    x = jnp.tile(x, (4, 1, 1, 1))
    grad = jax.grad(lambda a, b: jnp.sum(xla_conv(a, b, 1, 1) ** 2), (0, 1))
    default = jax.jit(grad).lower(x, w).compile().as_text()
    tuned = jax.jit(grad, compiler_options=options).lower(x, w).compile().as_text()
    # If this jaxlib no longer uses YNNPACK for convolutions, the option is obsolete.
    assert ynn_convolutions(default) > 0
    assert ynn_convolutions(tuned) == 0 and ' convolution(' in tuned


def fusions_recomputing_relu_into_transpose(compiled_text):
    """Fused computations of the compiled HLO that both apply a ReLU and transpose."""
    blocks = re.split(r'\n(?=\S)', compiled_text)
    return [b.split(' ', 1)[0] for b in blocks if b.lstrip('%').startswith('fused')
            and ' maximum(' in b and ' transpose(' in b]


def test_fusion_barrier_keeps_producers_out_of_the_filter_gradient_transpose():
    """BN-like scale + ReLU feeding a convolution: without the barrier XLA:CPU fuses them
    into the transpose of the filter gradient (recomputed there); with it, it cannot."""
    x, w = random_pair(8, 32, 32, 3)
    x = jnp.tile(x, (8, 1, 1, 1))
    scale = jnp.linspace(0.5, 1.5, 32)

    def compiled(conv):
        loss = lambda a, s, b: jnp.sum(conv(jax.nn.relu(a * s), b) ** 2)
        return jax.jit(jax.grad(loss, (0, 1, 2)), compiler_options=compiler_options(
            'im2col')).lower(x, scale, w).compile().as_text()

    plain = compiled(lambda a, b: xla_conv(a, b, 1, 1))
    ours = compiled(lambda a, b: im2col_conv(a, b, (1, 1), ((1, 1), (1, 1))))
    # If XLA stops fusing here the barrier is no longer needed: this test says so.
    assert fusions_recomputing_relu_into_transpose(plain)
    assert not fusions_recomputing_relu_into_transpose(ours)
    assert ' conditional(' in ours


def test_fusion_barrier_is_the_identity_with_an_identity_gradient():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 4)), jnp.float32)
    for value in (x, x.at[0, 0, 0, 0].set(jnp.nan)):   # the NaN takes the other branch
        np.testing.assert_array_equal(jax.jit(fusion_barrier)(value), value)
    g = jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape)
    np.testing.assert_array_equal(jax.grad(lambda a: jnp.sum(fusion_barrier(a) * g))(x), g)


def test_whole_network_matches_xla():
    """Same params, same batch: outputs, loss-like scalar and every gradient agree."""
    config = tiny_config('clusiam', image_size=32)
    images = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 3))
    outputs = {}
    for impl in ('xla', 'im2col'):
        config.model.conv_impl = impl
        network = build_network(config.model)
        variables = network.init(jax.random.PRNGKey(0), images, train=False)

        def scalar(params, network=network, variables=variables):
            out, _ = network.apply({**variables, 'params': params}, images, train=True,
                                   mutable=['batch_stats'])
            return jnp.sum(jnp.tanh(out['z'])) + jnp.sum(jnp.tanh(out['p']))

        outputs[impl] = jax.value_and_grad(scalar)(variables['params'])
    (value_x, grads_x), (value_i, grads_i) = outputs['xla'], outputs['im2col']
    np.testing.assert_allclose(value_i, value_x, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads_i), jax.tree.leaves(grads_x)):
        np.testing.assert_allclose(got, want, rtol=1e-3,
                                   atol=1e-5 * float(jnp.max(jnp.abs(want))) + 1e-7)


def test_bad_conv_impl_names_fail():
    config = tiny_config()
    config.model.conv_impl = 'cudnn'
    with pytest.raises(ConfigError, match='model.conv_impl'):
        validate(config, check_data_path=False)


def test_unsupported_convolutions_say_so():
    conv = flax_conv_fn('im2col')
    x, w = random_pair(9, 16, 16, 3)
    nhwc = ('NHWC', 'HWIO', 'NHWC')
    with pytest.raises(NotImplementedError, match='conv_impl=xla'):
        conv(x, w, (1, 1), ((2, 2), (2, 2)), rhs_dilation=(2, 2), dimension_numbers=nhwc)
    with pytest.raises(NotImplementedError, match='conv_impl=xla'):
        conv(x, w[:, :, :8], (1, 1), ((1, 1), (1, 1)), dimension_numbers=nhwc,
             feature_group_count=2)
    with pytest.raises(NotImplementedError, match='conv_impl=xla'):
        conv(x, w, (1, 1), 'SAME', dimension_numbers=nhwc)


def numpy_max_pool_grad(x, g, size=3, stride=2, pad=1):
    """PyTorch's max_pool2d backward: each output's gradient to its first maximum."""
    n, h, w, c = x.shape
    padded = np.full((n, h + 2 * pad, w + 2 * pad, c), -np.inf, x.dtype)
    padded[:, pad:pad + h, pad:pad + w] = x
    dx = np.zeros_like(padded)
    for b, i, j, ch in np.ndindex(*g.shape):
        window = padded[b, i * stride:i * stride + size, j * stride:j * stride + size, ch]
        first = np.argmax(window)  # argmax returns the first maximum, row-major
        dx[b, i * stride + first // size, j * stride + first % size, ch] += g[b, i, j, ch]
    return dx[:, pad:pad + h, pad:pad + w]


@pytest.mark.parametrize('size', [9, 8, 2])
def test_max_pool_matches_xla_and_routes_ties_like_pytorch(size):
    rng = np.random.default_rng(size)
    x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    x[0] = np.maximum(x[0], 0.0)  # after a ReLU: windows of tied zeros
    x[1, :3, :3] = 1.5            # ties between positive values
    expected = lax.reduce_window(x, -np.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))
    g = rng.normal(size=expected.shape).astype(np.float32)
    for impl in ('im2col', 'xla'):
        def pool(a, impl=impl):
            return max_pool(a, (3, 3), (2, 2), ((1, 1), (1, 1)), impl)
        np.testing.assert_array_equal(pool(jnp.asarray(x)), expected)
        dx = jax.grad(lambda a, pool=pool: jnp.sum(pool(a) * g))(jnp.asarray(x))
        if impl == 'im2col':  # XLA's own gradient may break ties elsewhere
            np.testing.assert_allclose(dx, numpy_max_pool_grad(x, g), rtol=1e-6, atol=1e-6)
        else:
            x_untied = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
            np.testing.assert_allclose(
                jax.grad(lambda a, pool=pool: jnp.sum(pool(a) * g))(x_untied),
                numpy_max_pool_grad(np.asarray(x_untied), g), rtol=1e-6, atol=1e-6)


def test_bfloat16_max_pool_gradient_is_the_float32_one_rounded_once():
    """tap_max_pool's bf16 backward routes and sums in float32 (overlapping windows add up
    to four gradients per input) and rounds once; XLA:CPU's bf16 fusion of the same
    chain ran ~15x slower than float32's (issue 27)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 8)), jnp.bfloat16)
    pool = lambda a: max_pool(a, (3, 3), (2, 2), ((1, 1), (1, 1)), 'im2col')
    g = jnp.asarray(rng.normal(size=pool(x).shape), jnp.float32)
    dx16 = jax.vjp(pool, x)[1](g.astype(jnp.bfloat16))[0]
    dx32 = jax.vjp(pool, x.astype(jnp.float32))[1](g.astype(jnp.bfloat16).astype(jnp.float32))[0]
    assert dx16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(dx16, np.float32),
                                  np.asarray(dx32.astype(jnp.bfloat16), np.float32))
