"""2-D convolution for the ResNet: XLA's, or XLA's tuned for XLA:CPU.

Measured on CPU (README, "Measured results"; `python -m bench.conv_kernels`), XLA:CPU
has slow paths that dominate a ResNet training step:

* by default it runs convolutions through YNNPACK, whose forward kernels were slower
  than XLA's own (Eigen) ones; `compiler_options` turns YNNPACK off for convolutions
  only (its dots and reductions stay);
* a convolution whose input or output map is smaller than its kernel (2 x 2 maps in
  layer4 at 64 px input) is many times slower than the same work as matrix products,
  forward and backward;
* the filter gradient of the 1x1 strided downsample is slower than one matrix product;
* XLA fuses a convolution input's producers (BatchNorm, residual add, ReLU) into the
  transpose its filter gradient makes of that input, recomputing them there.

`conv_impl='im2col'` keeps XLA's convolutions (without YNNPACK) where they are fast, behind
a `fusion_barrier`, and computes the rest as matrix products: maps smaller than the kernel
as one product per kernel tap over the real (unpadded) input, 1x1 kernels' filter gradient
as one product. The maths is the same convolution, only the summation order differs. The
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
# XLA:CPU's YNNPACK library fusions without INDIVIDUAL_CONVOLUTION: the default set is
# these two plus it (same compiled dots and reductions as with the default);
# tests/test_conv.py checks that the installed jaxlib accepts the option.
_CPU_COMPILER_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type':
                         'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}
# flax.linen.Conv lays out NHWC inputs and HWIO kernels as these (lhs, rhs, out) specs.
_NHWC_SPECS = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def resolve_conv_impl(name: str) -> str:
    """'auto' -> 'im2col' on the CPU backend, 'xla' on accelerators."""
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


def _strided_window(x, window, strides):
    """x[:, top::sh, left::sw, :] cut to (rows, cols): window = (top, left, rows, cols)."""
    top, left, rows, cols = window
    return x[:, top:top + strides[0] * (rows - 1) + 1:strides[0],
             left:left + strides[1] * (cols - 1) + 1:strides[1], :]


def _tap_windows(x, kernel_hw, strides, padding, pad_value=0.0):
    """For each kernel tap (i, j), row-major: the [N, Ho, Wo, C] input window it sees."""
    ho = _output_size(x.shape[1], kernel_hw[0], strides[0], padding[0])
    wo = _output_size(x.shape[2], kernel_hw[1], strides[1], padding[1])
    x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)),
                constant_values=pad_value)
    return [_strided_window(x, (i, j, ho, wo), strides)
            for i in range(kernel_hw[0]) for j in range(kernel_hw[1])]


def _valid_range(size, out_size, tap, stride, pad_before):
    """(first output index, count) whose input index o * stride + tap - pad_before is in
    [0, size): the outputs this kernel tap sees real input for, along one axis."""
    first = max(0, -(-(pad_before - tap) // stride))
    last = min(out_size - 1, (size - 1 + pad_before - tap) // stride)
    return first, last - first + 1


def _valid_taps(x_shape, w_shape, strides, padding):
    """Per kernel tap that meets real input: (i, j, input window, output rectangle).

    The input window is (top, left, rows, cols) with the convolution's stride; the output
    rectangle is (first row, rows, first col, cols). Taps that only meet padding are left
    out: they add nothing to the output and get a zero filter gradient.
    """
    kh, kw = w_shape[:2]
    ho = _output_size(x_shape[1], kh, strides[0], padding[0])
    wo = _output_size(x_shape[2], kw, strides[1], padding[1])
    taps = []
    for i in range(kh):
        h0, hn = _valid_range(x_shape[1], ho, i, strides[0], padding[0][0])
        for j in range(kw):
            w0, wn = _valid_range(x_shape[2], wo, j, strides[1], padding[1][0])
            if hn > 0 and wn > 0:
                top = h0 * strides[0] + i - padding[0][0]
                left = w0 * strides[1] + j - padding[1][0]
                taps.append((i, j, (top, left, hn, wn), (h0, hn, w0, wn)))
    return taps, (ho, wo)


def _place(product, at, size, stride):
    """Zero-pad a [N, rows, cols, C] product into a [N, *size, C] map at `at`, spaced by
    `stride` (the transpose of `_strided_window`, or of a rectangle slice for stride 1)."""
    (top, left), (rows, cols) = at, product.shape[1:3]
    config = [(0, 0, 0),
              (top, size[0] - top - stride[0] * (rows - 1) - 1, stride[0] - 1),
              (left, size[1] - left - stride[1] * (cols - 1) - 1, stride[1] - 1),
              (0, 0, 0)]
    return lax.pad(product, jnp.zeros((), product.dtype), config)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _valid_tap_conv(x, w, strides, padding):
    """The convolution as one matrix product per kernel tap, over real input only.

    For maps smaller than the kernel most (tap, output) pairs read padding: on a 2 x 2 map
    a 3x3 kernel meets real input in 16 of its 36 pairs. Patch columns ("im2col") multiply
    the padding zeros too; here each tap multiplies only the output rectangle whose inputs
    are real, then pads its product back in place. The gradients are the same per-tap
    products, hand-written so the filter gradient is one stack of the taps (autodiff
    summed kh * kw zero-padded copies of the whole kernel, a slow fusion in the profile).
    """
    taps, out_size = _valid_taps(x.shape, w.shape, strides, padding)
    out = jnp.zeros((x.shape[0], *out_size, w.shape[-1]), jnp.float32)
    for i, j, window, (h0, _, w0, _) in taps:
        product = jnp.matmul(_strided_window(x, window, strides), w[i, j],
                             preferred_element_type=jnp.float32)
        out = out + _place(product, (h0, w0), out_size, (1, 1))
    return out.astype(x.dtype)


def _valid_tap_conv_fwd(x, w, strides, padding):
    return _valid_tap_conv(x, w, strides, padding), (x, w)


def _valid_tap_conv_bwd(strides, padding, residuals, g):
    x, w = residuals
    taps, _ = _valid_taps(x.shape, w.shape, strides, padding)
    dx = jnp.zeros(x.shape, jnp.float32)
    tap_grads = {}
    for i, j, window, (h0, hn, w0, wn) in taps:
        g_tap = g[:, h0:h0 + hn, w0:w0 + wn, :]
        dx_tap = jnp.einsum('nhwo,co->nhwc', g_tap, w[i, j],
                            preferred_element_type=jnp.float32)
        dx = dx + _place(dx_tap, window[:2], x.shape[1:3], strides)
        tap_grads[i, j] = jnp.einsum('nhwc,nhwo->co', _strided_window(x, window, strides),
                                     g_tap, preferred_element_type=jnp.float32)
    zero = jnp.zeros(w.shape[2:], jnp.float32)   # taps that only meet padding
    dw = jnp.stack([tap_grads.get((i, j), zero)
                    for i in range(w.shape[0]) for j in range(w.shape[1])])
    return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


_valid_tap_conv.defvjp(_valid_tap_conv_fwd, _valid_tap_conv_bwd)


def _tiny_map(x, w, strides, padding) -> bool:
    """Input or output map smaller than the kernel: XLA:CPU's slow convolution path.

    E.g. at 64 px input, layer4's 3x3 convolutions see 2 x 2 maps and its strided one
    makes 2 x 2 maps from 4 x 4; per-tap products are far faster there, forward and
    backward (`python -m bench.conv_kernels`).
    """
    kh, kw = w.shape[:2]
    out_h = _output_size(x.shape[1], kh, strides[0], padding[0])
    out_w = _output_size(x.shape[2], kw, strides[1], padding[1])
    return min(x.shape[1], out_h) < kh or min(x.shape[2], out_w) < kw


def im2col_conv(x, w, strides: Tuple[int, int], padding: Tuple[Tuple[int, int], ...]):
    """NHWC x HWIO convolution whose slow XLA:CPU parts are matrix products."""
    if _tiny_map(x, w, strides, padding):
        return _valid_tap_conv(x, w, strides, padding)
    if w.shape[:2] == (1, 1):
        return _pointwise_conv(x, w, strides, padding)
    # With compiler_options, XLA's own kernels beat per-tap matmuls on these maps in every
    # direction, the filter gradient included.
    return _xla_conv(fusion_barrier(x), w, strides, padding)


@jax.custom_vjp
def fusion_barrier(x):
    """x, materialized: XLA cannot fuse x's producers into x's consumers.

    XLA's filter gradient of a convolution reads its input transposed (batch <-> channel);
    XLA:CPU fuses the input's producers (BatchNorm, residual add, ReLU) into that
    transpose, recomputing them in a cache-hostile order (the profile before and after is
    in the README, from `python -m bench.profile_step`).
    `lax.optimization_barrier` does not help: XLA:CPU removes it before fusion. An
    identity `lax.cond` on a runtime predicate does, as XLA never fuses across a
    conditional. The cotangent passes straight through (a conditional there was slower).
    """
    return _identity_conditional(x)


def _identity_conditional(x):
    # True unless x[0, 0, 0, 0] is NaN; both branches return x, so the value is x anyway.
    first = x[(0,) * x.ndim]
    return lax.cond(first == first, lambda v: v, lambda v: v * 1, x)


fusion_barrier.defvjp(lambda x: (_identity_conditional(x), None), lambda _, g: (g,))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _pointwise_conv(x, w, strides, padding):
    """A 1x1 convolution whose filter gradient is one matrix product.

    XLA's filter-gradient convolution for the strided 1x1 downsample is slower than
    (strided input window)^T @ (output gradient).
    """
    return _xla_conv(x, w, strides, padding)


def _pointwise_conv_fwd(x, w, strides, padding):
    return _pointwise_conv(x, w, strides, padding), (x, w)


def _pointwise_conv_bwd(strides, padding, residuals, g):
    x, w = residuals
    # Linear in x: the input gradient is XLA's transposed convolution.
    _, input_vjp = jax.vjp(lambda x_: _xla_conv(x_, w, strides, padding), x)
    (dx,) = input_vjp(g)
    (window,) = _tap_windows(x, (1, 1), strides, padding)
    # g^T @ window, then transposed: a throwaway in-process A/B found it a little faster
    # per step than window^T @ g at 224 and 64 px.
    dw = jnp.matmul(g.reshape(-1, w.shape[-1]).T, window.reshape(-1, x.shape[-1]),
                    preferred_element_type=jnp.float32).T
    return dx, dw.reshape(w.shape).astype(w.dtype)


_pointwise_conv.defvjp(_pointwise_conv_fwd, _pointwise_conv_bwd)


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
    were a large share of a ResNet-18 step at 224 px. Here the gradient goes, per
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
