"""2-D convolution for the ResNet: XLA's, or (`im2col`, `auto` on CPU) XLA's behind a
`fusion_barrier` where XLA:CPU is fast, matrix products where slow, without YNNPACK, or
(`onednn`) oneDNN's kernels through a custom call (onednn.py)."""
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from clusiam_jax.models import onednn
from clusiam_jax.models.geometry import output_hw

CONV_IMPLS = ('auto', 'xla', 'im2col', 'onednn')
# XLA:CPU's default YNNPACK fusions less INDIVIDUAL_CONVOLUTION (tests/test_conv.py).
_CPU_COMPILER_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type':
                         'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}
# flax.linen.Conv lays out NHWC inputs and HWIO kernels as these (lhs, rhs, out) specs.
_NHWC_SPECS = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def resolve_conv_impl(name: str, dtype=jnp.float32) -> str:
    """'auto' -> on the CPU backend 'onednn' for bfloat16 on one device of a CPU with AMX
    where oneDNN builds (onednn.auto_picks_onednn; XLA:CPU computes bf16 convolutions in
    float32), else 'im2col' (float32 stays there: the recipes were measured with it);
    'xla' on accelerators."""
    if name != 'auto':
        return name
    if jax.default_backend() != 'cpu':
        return 'xla'
    return 'onednn' if onednn.auto_picks_onednn(dtype) else 'im2col'


def compiler_options(impl: str):
    """`jax.jit(..., compiler_options=...)` for a network run with `impl`; None: defaults."""
    cpu = resolve_conv_impl(impl) in ('im2col', 'onednn') and jax.default_backend() == 'cpu'
    return dict(_CPU_COMPILER_OPTIONS) if cpu else None


def _xla_conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding,
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _strided_window(x, window, strides):
    """x[:, top::sh, left::sw, :] cut to (rows, cols): window = (top, left, rows, cols)."""
    top, left, rows, cols = window
    return x[:, top:top + strides[0] * (rows - 1) + 1:strides[0],
             left:left + strides[1] * (cols - 1) + 1:strides[1], :]


def _tap_windows(x, kernel_hw, strides, padding, pad_value=0.0):
    """For each kernel tap (i, j), row-major: the [N, Ho, Wo, C] input window it sees."""
    ho, wo = output_hw(x.shape, kernel_hw, strides, padding)
    x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)),
                constant_values=pad_value)
    return [_strided_window(x, (i, j, ho, wo), strides)
            for i in range(kernel_hw[0]) for j in range(kernel_hw[1])]


def _valid_range(size, out_size, tap, stride, pad_before):
    """(first output, count) whose input o * stride + tap - pad_before is in [0, size)."""
    first = max(0, -(-(pad_before - tap) // stride))
    last = min(out_size - 1, (size - 1 + pad_before - tap) // stride)
    return first, last - first + 1


def _valid_taps(x_shape, w_shape, strides, padding):
    """Per kernel tap that meets real input: (i, j, input window (top, left, rows, cols),
    output rectangle (first row, rows, first col, cols))."""
    kh, kw = w_shape[:2]
    ho, wo = output_hw(x_shape, (kh, kw), strides, padding)
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
    """The transpose of `_strided_window`: `product` zero-padded into a `size` map at `at`."""
    (top, left), (rows, cols) = at, product.shape[1:3]
    config = [(0, 0, 0),
              (top, size[0] - top - stride[0] * (rows - 1) - 1, stride[0] - 1),
              (left, size[1] - left - stride[1] * (cols - 1) - 1, stride[1] - 1),
              (0, 0, 0)]
    return lax.pad(product, jnp.zeros((), product.dtype), config)


def _keep_inputs(f):
    """The forward rule of a custom_vjp conv that keeps its inputs as residuals."""
    return lambda x, w, strides, padding: (f(x, w, strides, padding), (x, w))


def _filter_product(x, g):
    """[C, O] float32 sum over N, H, W of x[..., C] g[..., O]: a filter gradient.

    In bf16, x^T is materialized first: XLA folds a transpose into the dot, and XLA:CPU
    upcasts a bf16 dot contracting its lhs's leading dimension to a float32 one (~4x
    slower than its bf16 kernel for bf16 x bf16 -> float32, issue 27)."""
    if x.dtype == jnp.float32:
        return jnp.einsum('nhwc,nhwo->co', x, g, preferred_element_type=jnp.float32)
    return jnp.matmul(fusion_barrier(x.reshape(-1, x.shape[-1]).T),
                      g.reshape(-1, g.shape[-1]), preferred_element_type=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _valid_tap_conv(x, w, strides, padding):
    """The convolution as one matrix product per kernel tap over real input only."""
    taps, out_size = _valid_taps(x.shape, w.shape, strides, padding)
    out = jnp.zeros((x.shape[0], *out_size, w.shape[-1]), jnp.float32)
    for i, j, window, (h0, _, w0, _) in taps:
        product = jnp.matmul(_strided_window(x, window, strides), w[i, j],
                             preferred_element_type=jnp.float32)
        out = out + _place(product, (h0, w0), out_size, (1, 1))
    return out.astype(x.dtype)


def _valid_tap_conv_bwd(strides, padding, residuals, g):
    x, w = residuals
    taps, _ = _valid_taps(x.shape, w.shape, strides, padding)
    dx = jnp.zeros(x.shape, jnp.float32)
    tap_grads = {}
    for i, j, window, (h0, hn, w0, wn) in taps:
        g_tap = g[:, h0:h0 + hn, w0:w0 + wn, :]
        dx_tap = jnp.einsum('nhwo,co->nhwc', g_tap, w[i, j], preferred_element_type=jnp.float32)
        dx = dx + _place(dx_tap, window[:2], x.shape[1:3], strides)
        tap_grads[i, j] = _filter_product(_strided_window(x, window, strides), g_tap)
    zero = jnp.zeros(w.shape[2:], jnp.float32)   # taps that only meet padding
    dw = jnp.stack([tap_grads.get((i, j), zero)
                    for i in range(w.shape[0]) for j in range(w.shape[1])])
    return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


_valid_tap_conv.defvjp(_keep_inputs(_valid_tap_conv), _valid_tap_conv_bwd)


def im2col_conv(x, w, strides, padding):
    """NHWC x HWIO convolution whose slow XLA:CPU parts are matrix products."""
    kh, kw = w.shape[:2]
    out_h, out_w = output_hw(x.shape, (kh, kw), strides, padding)
    if min(x.shape[1], out_h) < kh or min(x.shape[2], out_w) < kw:  # a map < the kernel
        return _valid_tap_conv(x, w, strides, padding)
    if (kh, kw) == (1, 1):
        return _pointwise_conv(x, w, strides, padding)
    # Without YNNPACK, XLA's kernels beat per-tap products here in every direction.
    return _xla_conv(fusion_barrier(x), w, strides, padding)


@jax.custom_vjp
def fusion_barrier(x):
    """x, materialized, so XLA:CPU cannot fuse x's producers into a filter gradient's
    transpose (`lax.optimization_barrier` is removed before fusion; a conditional is not)."""
    # True unless x[0, 0, 0, 0] is NaN; both branches return x, so the value is x anyway.
    first = x[(0,) * x.ndim]
    return lax.cond(first == first, lambda v: v, lambda v: v * 1, x)


fusion_barrier.defvjp(lambda x: (fusion_barrier(x), None), lambda _, g: (g,))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _pointwise_conv(x, w, strides, padding):
    """A 1x1 convolution whose filter gradient is one matrix product."""
    return _xla_conv(x, w, strides, padding)


def _pointwise_conv_bwd(strides, padding, residuals, g):
    x, w = residuals
    # Linear in x: the input gradient is XLA's transposed convolution.
    _, input_vjp = jax.vjp(lambda x_: _xla_conv(x_, w, strides, padding), x)
    (dx,) = input_vjp(g)
    (window,) = _tap_windows(x, (1, 1), strides, padding)
    if g.dtype == jnp.float32:
        # g^T @ window, then transposed (a little faster than window^T @ g).
        dw = jnp.matmul(g.reshape(-1, w.shape[-1]).T, window.reshape(-1, x.shape[-1]),
                        preferred_element_type=jnp.float32).T
    else:
        dw = _filter_product(window, g)
    return dx, dw.reshape(w.shape).astype(w.dtype)


_pointwise_conv.defvjp(_keep_inputs(_pointwise_conv), _pointwise_conv_bwd)


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
                f'conv_impl={impl} covers the ResNet convolutions only (NHWC, explicit '
                'padding, no dilation or groups); use model.conv_impl=xla')
        strides, padding = tuple(window_strides), tuple(tuple(p) for p in padding)
        if resolve_conv_impl(impl, lhs.dtype) == 'onednn':
            return onednn.onednn_conv(lhs, rhs, strides, padding)
        return im2col_conv(lhs, rhs, strides, padding)

    return conv_general_dilated


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def tap_max_pool(x, window, strides, padding):
    """NHWC max pooling, gradient to the first maximum (as PyTorch's) via per-tap windows."""
    return _tap_max(x, window, strides, padding)


def _tap_max(x, window, strides, padding):
    """The max pool as an elementwise maximum of the tap windows: the same values as
    reduce_window, which XLA:CPU runs 2x (float32) to 5x (bf16) slower (issue 27)."""
    taps = _tap_windows(x, window, strides, padding, -jnp.inf)
    out = taps[0]
    for tap in taps[1:]:
        out = jnp.maximum(out, tap)
    return out


def _xla_max_pool(x, window, strides, padding):
    # A Python -inf init lets JAX recognise the max monoid (differentiable reduce_window).
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1),
                             ((0, 0), *padding, (0, 0)))


def _tap_max_pool_bwd(window, strides, padding, residuals, g):
    x, y = residuals
    # Routed and summed in float32 (exact: widening), rounded once: in bfloat16 XLA:CPU
    # fuses the tap chain with converts into a slow loop (bench/experiments/bf16_cpu.py).
    windows, scatter_back = jax.vjp(
        lambda x_: _tap_windows(x_, window, strides, padding, -jnp.inf),
        x.astype(jnp.float32))
    y, g = y.astype(jnp.float32), g.astype(jnp.float32)
    taken = jnp.zeros(y.shape, bool)
    routed = []
    for tap in windows:  # row-major, so a tie goes to the first maximum
        hit = (tap == y) & ~taken
        taken = taken | hit
        routed.append(jnp.where(hit, g, jnp.zeros_like(g)))
    (dx,) = scatter_back(routed)
    return (dx.astype(x.dtype),)


def _tap_max_pool_fwd(x, window, strides, padding):
    y = tap_max_pool(x, window, strides, padding)
    return y, (x, y)


tap_max_pool.defvjp(_tap_max_pool_fwd, _tap_max_pool_bwd)


def max_pool(x, window, strides, padding, impl: str):
    """ResNet's max pooling: XLA's for conv_impl 'xla', tap_max_pool for 'im2col', oneDNN's
for 'onednn'."""
    impl = resolve_conv_impl(impl, x.dtype)
    if impl == 'xla':
        return _xla_max_pool(x, window, strides, padding)
    window, strides, padding = tuple(window), tuple(strides), tuple(tuple(p) for p in padding)
    if impl == 'onednn':
        return onednn.onednn_max_pool(x, window, strides, padding)
    return tap_max_pool(x, window, strides, padding)


def add_relu(a, b, impl: str):
    """A residual block's ending, relu(a + b): one oneDNN pass for 'onednn' (XLA:CPU's bf16
    element-wise passes were several times slower), XLA's otherwise."""
    dtype = jnp.result_type(a, b)   # XLA's promotion, on either path
    if a.ndim == 4 and resolve_conv_impl(impl, dtype) == 'onednn':
        return onednn.onednn_add_relu(a.astype(dtype), b.astype(dtype))
    return jax.nn.relu(a + b)
