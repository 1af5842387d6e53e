"""2-D convolution for the ResNet: XLA's, or XLA's tuned for XLA:CPU.

Measured on this project's 2-core x86 CPU (jaxlib 0.10.2; the probe is
bench/conv_kernels.py), XLA:CPU has three slow paths that dominate a ResNet training step:

* by default it runs convolutions through YNNPACK, whose forward kernels took 1.3-3x
  longer than XLA's own (Eigen) ones here (layer1's 3x3 at batch 32: 74 vs 36 ms;
  bench/results/conv_kernels_cpu_2core_2026-11-27.jsonl); `compiler_options` turns
  YNNPACK off for convolutions only (its dots and reductions stay);
* a convolution whose input or output map is smaller than its kernel (2 x 2 maps in
  layer4 at 64 px input) takes 10-100x longer than the same work as a matrix product
  (DESIGN.md), forward and backward;
* the filter gradient of the 1x1 strided downsample is about twice as slow as one
  matrix product.

`conv_impl='im2col'` keeps XLA's convolutions (without YNNPACK) where they are fast and
computes the rest as matrix products over explicit patches ("im2col"): for maps smaller
than the kernel, the forward, input and filter gradients; for 1x1 kernels, the filter
gradient. The maths is the same convolution, only the summation order differs. The
ResNet's max-pool gets the same treatment (`max_pool`): its gradient as strided window
selects instead of JAX's index-map reduce-window.
On GPU/TPU the vendor convolutions are fast in both directions, so `auto` picks XLA's
there and this path on CPU.
"""
from functools import partial
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ('auto', 'xla', 'im2col')
# XLA:CPU's YNNPACK library fusions without INDIVIDUAL_CONVOLUTION: jaxlib 0.10's default
# set is these two plus it (same compiled dots and reductions as with the default).
_CPU_COMPILER_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type':
                         'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}
# Below this many input channels the filter gradient uses one patch-column product.
_MIN_CHANNELS_PER_TAP = 16
# flax.linen.Conv lays out NHWC inputs and HWIO kernels as these (lhs, rhs, out) specs.
_NHWC_SPECS = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def resolve_conv_impl(name: str) -> str:
    """'auto' -> 'im2col' on the CPU backend, 'xla' on accelerators."""
    if name not in CONV_IMPLS:
        raise ValueError(f'conv_impl must be one of {CONV_IMPLS}; got {name!r}')
    if name == 'auto':
        return 'im2col' if jax.default_backend() == 'cpu' else 'xla'
    return name


def compiler_options(impl: str):
    """`jax.jit(..., compiler_options=...)` for code that runs the ResNet with `impl`.

    For 'im2col' on the CPU backend, XLA's own convolution kernels instead of YNNPACK's
    (module docstring); None (XLA's defaults) otherwise. Every jit of the network (train
    step, export) passes it: per compilation, so nothing else in the process changes.
    """
    if resolve_conv_impl(impl) == 'im2col' and jax.default_backend() == 'cpu':
        return dict(_CPU_COMPILER_OPTIONS)
    return None


def _xla_conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding,
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _output_size(size, kernel, stride, pad):
    return (size + pad[0] + pad[1] - kernel) // stride + 1


def _tap_windows(x, kernel_hw, strides, padding, pad_value=0.0):
    """For each kernel tap (i, j), row-major: the [N, Ho, Wo, C] input window it sees."""
    (kh, kw), (sh, sw) = kernel_hw, strides
    ho = _output_size(x.shape[1], kh, sh, padding[0])
    wo = _output_size(x.shape[2], kw, sw, padding[1])
    x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)),
                constant_values=pad_value)
    return [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
            for i in range(kh) for j in range(kw)]


def _im2col_conv(x, w, strides, padding):
    """The convolution as one matrix product over all kh * kw * C patch columns."""
    kh, kw, cin, cout = w.shape
    patches = jnp.concatenate(_tap_windows(x, (kh, kw), strides, padding), axis=-1)
    return jnp.einsum('nhwk,ko->nhwo', patches, w.reshape(kh * kw * cin, cout),
                      preferred_element_type=jnp.float32).astype(x.dtype)


def _filter_grad(x, g, kernel_shape, strides, padding):
    """d(loss)/d(kernel): for each kernel tap, g^T @ (the input window it sees).

    One [M, Cout]^T @ [M, C] product per tap (M = N * Ho * Wo). Concatenating the
    windows into patch columns first measured 2-3x slower: XLA:CPU's concatenate of
    strided windows is memory-bound.
    """
    kh, kw, cin, cout = kernel_shape
    g2 = g.reshape(-1, cout)
    windows = _tap_windows(x, (kh, kw), strides, padding)
    if cin < _MIN_CHANNELS_PER_TAP:
        # Few input channels (the RGB stem): per-tap products would be [Cout, 3] each;
        # one product over all kh * kw * C columns keeps the matmul efficient.
        patches = jnp.concatenate(windows, axis=-1).reshape(-1, kh * kw * cin)
        return jnp.matmul(patches.T, g2, preferred_element_type=jnp.float32).reshape(
            kernel_shape)
    taps = [jnp.matmul(g2.T, window.reshape(-1, cin), preferred_element_type=jnp.float32)
            for window in windows]
    return jnp.stack(taps).reshape(kh, kw, cout, cin).transpose(0, 1, 3, 2)


def _tiny_map(x, w, strides, padding) -> bool:
    """Input or output map smaller than the kernel: XLA:CPU's slow convolution path.

    E.g. at 64 px input, layer4's 3x3 convolutions see 2 x 2 maps and its strided one
    makes 2 x 2 maps from 4 x 4; as matmuls their forward + gradients measured 10-30x
    faster (bench/conv_kernels.py).
    """
    kh, kw = w.shape[:2]
    out_h = _output_size(x.shape[1], kh, strides[0], padding[0])
    out_w = _output_size(x.shape[2], kw, strides[1], padding[1])
    return min(x.shape[1], out_h) < kh or min(x.shape[2], out_w) < kw


def im2col_conv(x, w, strides: Tuple[int, int], padding: Tuple[Tuple[int, int], ...]):
    """NHWC x HWIO convolution whose slow XLA:CPU parts are matrix products."""
    if _tiny_map(x, w, strides, padding) or w.shape[:2] == (1, 1):
        return _matmul_grad_conv(x, w, strides, padding)
    # With compiler_options, XLA's own kernels beat per-tap matmuls here in every
    # direction, the filter gradient included (measured with a probe, not committed). The
    # barrier keeps XLA from fusing the input's producers (BN, residual add, ReLU) into
    # the batch<->channel transpose its filter gradient makes of it, which recomputed
    # that chain per use (seen in a jax.profiler trace); the input is materialized anyway.
    return _xla_conv(lax.optimization_barrier(x), w, strides, padding)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul_grad_conv(x, w, strides, padding):
    """Convolution with the filter gradient as matmuls; maps smaller than the kernel are
    matmuls in every direction."""
    return (_im2col_conv if _tiny_map(x, w, strides, padding) else _xla_conv)(x, w, strides, padding)


def _matmul_grad_conv_fwd(x, w, strides, padding):
    return _matmul_grad_conv(x, w, strides, padding), (x, w)


def _matmul_grad_conv_bwd(strides, padding, residuals, g):
    x, w = residuals
    forward = _im2col_conv if _tiny_map(x, w, strides, padding) else _xla_conv
    # The convolution is linear in x: its transpose is XLA's input-gradient convolution,
    # or the matmul's transpose for tiny maps.
    _, input_vjp = jax.vjp(lambda x_: forward(x_, w, strides, padding), x)
    (dx,) = input_vjp(g)
    dw = _filter_grad(x, g, w.shape, strides, padding).astype(w.dtype)
    return dx, dw


_matmul_grad_conv.defvjp(_matmul_grad_conv_fwd, _matmul_grad_conv_bwd)


def flax_conv_fn(impl: str):
    """A `conv_general_dilated` for flax.linen.Conv, or None for Flax's default (XLA)."""
    if resolve_conv_impl(impl) == 'xla':
        return None

    def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding,
                             lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                             feature_group_count=1, precision=None):
        dilated = any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
        nhwc = (lhs.ndim == 4 and rhs.ndim == 4 and lax.conv_dimension_numbers(
            lhs.shape, rhs.shape, dimension_numbers) == _NHWC_SPECS)
        if dilated or feature_group_count != 1 or not nhwc or isinstance(padding, str):
            raise NotImplementedError(
                'conv_impl=im2col covers the ResNet convolutions only (NHWC, explicit '
                'padding, no dilation or groups); use model.conv_impl=xla')
        return im2col_conv(lhs, rhs, tuple(window_strides),
                           tuple(tuple(p) for p in padding))

    return conv_general_dilated


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def tap_max_pool(x, window: Tuple[int, int], strides: Tuple[int, int],
                 padding: Tuple[Tuple[int, int], ...]):
    """NHWC max pooling (padding never wins) whose gradient is elementwise work.

    JAX differentiates reduce_window(max) through a variadic reduce-window that carries
    s32 index maps of the padded input; on XLA:CPU those index maps and that reduction
    took ~1.2 s of an 8 s ResNet-18 step at 224 px batch 32. Here the gradient goes, per
    output, to the first input in row-major window order that equals the max (as
    PyTorch's max_pool2d), through one strided window per tap.
    """
    return _xla_max_pool(x, window, strides, padding)


def _xla_max_pool(x, window, strides, padding):
    # A Python -inf init lets JAX recognise the max monoid (differentiable reduce_window).
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1),
                             ((0, 0), *padding, (0, 0)))


def _tap_max_pool_fwd(x, window, strides, padding):
    y = tap_max_pool(x, window, strides, padding)
    return y, (x, y)


def _tap_max_pool_bwd(window, strides, padding, residuals, g):
    x, y = residuals
    windows_of = lambda x_: _tap_windows(x_, window, strides, padding, -jnp.inf)
    windows, scatter_back = jax.vjp(windows_of, x)
    taken = jnp.zeros(y.shape, bool)
    routed = []
    for tap in windows:  # row-major, so a tie goes to the first maximum
        hit = (tap == y) & ~taken
        taken = taken | hit
        routed.append(jnp.where(hit, g, jnp.zeros_like(g)))
    (dx,) = scatter_back(routed)
    return (dx,)


tap_max_pool.defvjp(_tap_max_pool_fwd, _tap_max_pool_bwd)


def max_pool(x, window, strides, padding, impl: str):
    """ResNet's max pooling: XLA's for conv_impl 'xla', tap_max_pool for 'im2col'."""
    if resolve_conv_impl(impl) == 'xla':
        return _xla_max_pool(x, window, strides, padding)
    return tap_max_pool(x, tuple(window), tuple(strides), tuple(tuple(p) for p in padding))
