r"""Per-layer cost of ResNet-18's convolutions, max-pool and BatchNorm, by implementation.

  python -m bench.conv_kernels [--batch 32] [--repeats 3] [--impls xla im2col] [--torch]

For each layer shape (224 px and 64 px inputs) it times, jitted and on the default
backend, the forward convolution, and the full gradient (forward + input gradient +
filter gradient) of a scalar loss: XLA's convolution against conv_impl='im2col'; the
same for the stem's max-pool; and BatchNorm + ReLU in training mode, autodiff of the
plain formula against models/batch_norm.py's hand-written gradient. With --torch, the
same layers in PyTorch (NCHW, as the original runs them) beside them, for the per-layer
ratio. Prints one JSON line per (layer, impl). This is the probe behind models/conv.py's
and batch_norm.py's choices for CPU; on GPU the implementations should be close.
"""
import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bench.common import emit, machine_info
from clusiam_jax.models.batch_norm import BN_EPSILON, normalize_with_batch_stats
from clusiam_jax.models.conv import compiler_options, im2col_conv, max_pool

# (label, map size, in channels, out channels, kernel, stride, padding)
SHAPES = [
    ('stem 224px', 224, 3, 64, 7, 2, 3),
    ('layer1 3x3 224px', 56, 64, 64, 3, 1, 1),
    ('layer2 3x3/2 224px', 56, 64, 128, 3, 2, 1),
    ('layer2 1x1/2 224px', 56, 64, 128, 1, 2, 0),
    ('layer3 3x3 224px', 14, 256, 256, 3, 1, 1),
    ('layer4 3x3 224px', 7, 512, 512, 3, 1, 1),
    ('layer4 3x3/2 64px', 4, 256, 512, 3, 2, 1),
    ('layer4 3x3 64px', 2, 512, 512, 3, 1, 1),
]
# (label, map size, channels): the 3x3 / 2 max-pool after the stem.
POOLS = [('maxpool 224px', 112, 64), ('maxpool 64px', 32, 64)]
# (label, map size, channels): the BatchNorm + ReLU after each stage's convolutions.
BATCH_NORMS = [('bn stem 224px', 112, 64), ('bn layer1 224px', 56, 64),
               ('bn layer2 224px', 28, 128), ('bn layer3 224px', 14, 256),
               ('bn layer4 224px', 7, 512)]


def conv_fn(impl, stride, pad):
    padding = ((pad, pad), (pad, pad))
    if impl == 'im2col':
        return lambda x, w: im2col_conv(x, w, (stride, stride), padding)
    return lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), padding,
                                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def autodiff_batch_norm(x, scale, bias):
    """Training-mode BatchNorm as a plain formula, for JAX to differentiate."""
    mean = jnp.mean(x, (0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
    return (x - mean) * lax.rsqrt(var + BN_EPSILON) * scale + bias


BATCH_NORM_IMPLS = {
    'autodiff': autodiff_batch_norm,
    'custom_vjp': lambda x, s, b: normalize_with_batch_stats(x, s, b, BN_EPSILON, jnp.float32),
}


def median_ms(fn, args, repeats):
    """Median wall time of fn(*args); JAX results are waited for (PyTorch's CPU ops return done)."""
    jax.block_until_ready(fn(*args))  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times)), 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--impls', nargs='+', choices=['xla', 'im2col'],
                        default=['xla', 'im2col'])
    parser.add_argument('--torch', action='store_true',
                        help='also time each layer in PyTorch (needs torch)')
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    info = machine_info()
    torch_ms = torch_timer(args.repeats) if args.torch else None
    for label, size, channels in POOLS:
        x = jnp.asarray(rng.normal(size=(args.batch, size, size, channels)), jnp.float32)
        for impl in args.impls:
            pool = lambda a, impl=impl: max_pool(a, (3, 3), (2, 2), ((1, 1), (1, 1)), impl)
            options = compiler_options(impl)
            forward = jax.jit(pool, compiler_options=options)
            gradient = jax.jit(jax.grad(lambda a, pool=pool: jnp.sum(pool(a) ** 2)),
                               compiler_options=options)
            emit(dict(bench='max_pool', layer=label, impl=impl, batch=args.batch, map=size,
                      channels=channels, forward_ms=median_ms(forward, (x,), args.repeats),
                      grad_ms=median_ms(gradient, (x,), args.repeats), **info))
        if torch_ms:
            emit(dict(bench='max_pool', layer=label, impl='torch', batch=args.batch, map=size,
                      channels=channels, **torch_ms('max_pool', x), **info))
    for label, size, channels in BATCH_NORMS:
        x = jnp.asarray(rng.normal(size=(args.batch, size, size, channels)), jnp.float32)
        scale, bias = jnp.ones(channels), jnp.zeros(channels)
        for impl, norm in BATCH_NORM_IMPLS.items():
            layer = lambda a, s, b, norm=norm: jax.nn.relu(norm(a, s, b))
            gradient = jax.jit(jax.grad(lambda a, s, b, layer=layer: jnp.sum(layer(a, s, b) ** 2),
                                        (0, 1, 2)))
            emit(dict(bench='batch_norm_relu', layer=label, impl=impl, batch=args.batch,
                      map=size, channels=channels,
                      forward_ms=median_ms(jax.jit(layer), (x, scale, bias), args.repeats),
                      grad_ms=median_ms(gradient, (x, scale, bias), args.repeats), **info))
        if torch_ms:
            emit(dict(bench='batch_norm_relu', layer=label, impl='torch', batch=args.batch,
                      map=size, channels=channels, **torch_ms('batch_norm', x), **info))
    for label, size, cin, cout, kernel, stride, pad in SHAPES:
        x = jnp.asarray(rng.normal(size=(args.batch, size, size, cin)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)), jnp.float32)
        for impl in args.impls:  # same process, back to back: the ratio is what counts
            conv = conv_fn(impl, stride, pad)
            options = compiler_options(impl)   # im2col on CPU: XLA's kernels, not YNNPACK's
            forward = jax.jit(conv, compiler_options=options)
            gradient = jax.jit(jax.grad(lambda a, b, conv=conv: jnp.sum(conv(a, b) ** 2), (0, 1)),
                               compiler_options=options)
            emit(dict(bench='conv_kernel', layer=label, impl=impl, batch=args.batch,
                      map=size, cin=cin, cout=cout, kernel=kernel, stride=stride,
                      forward_ms=median_ms(forward, (x, w), args.repeats),
                      grad_ms=median_ms(gradient, (x, w), args.repeats), **info))
        if torch_ms:
            emit(dict(bench='conv_kernel', layer=label, impl='torch', batch=args.batch,
                      map=size, cin=cin, cout=cout, kernel=kernel, stride=stride,
                      **torch_ms('conv', x, w, stride, pad), **info))


def torch_timer(repeats):
    """`time(kind, x, ...)` -> {forward_ms, grad_ms, torch} for one layer in PyTorch.

    NCHW float32 on all cores, as the original's training step runs; the gradient covers
    the same tensors as the JAX timing (input, and kernel or BN affine parameters).
    """
    import torch  # optional: only with --torch
    torch.set_num_threads(os.cpu_count())
    functional = torch.nn.functional

    def layer_fn(kind, x, w, stride, pad):
        if kind == 'conv':
            return lambda a, b: functional.conv2d(a, b, stride=stride, padding=pad), [w]
        if kind == 'max_pool':
            return lambda a: functional.max_pool2d(a, 3, 2, 1), []
        channels = x.shape[1]
        scale, bias = torch.ones(channels), torch.zeros(channels)
        return (lambda a, s, b: functional.relu(functional.batch_norm(
            a, None, None, s, b, training=True, eps=BN_EPSILON)), [scale, bias])

    def time_layer(kind, x, w=None, stride=1, pad=0):
        x = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
        if w is not None:
            w = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy())
        fn, extra = layer_fn(kind, x, w, stride, pad)
        inputs = [x] + extra

        def forward():
            with torch.no_grad():
                fn(*inputs)

        def gradient():
            leaves = [t.detach().requires_grad_(True) for t in inputs]
            (fn(*leaves) ** 2).sum().backward()

        return dict(forward_ms=median_ms(forward, (), repeats),
                    grad_ms=median_ms(gradient, (), repeats), torch=torch.__version__)

    return time_layer


if __name__ == '__main__':
    main()
