r"""Per-convolution cost of the ResNet-18 convolutions, XLA's against conv_impl='im2col'.

  python bench/conv_kernels.py [--batch 32] [--repeats 3] [--impls xla im2col]

For each layer shape (224 px and 64 px inputs) it times, jitted and on the default
backend, the forward convolution, and the full gradient (forward + input gradient +
filter gradient) of a scalar loss; then the same for the stem's max-pool. Prints one
JSON line per (shape, impl). This is the
probe behind models/conv.py's choice for CPU; on GPU both should be close.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from bench.common import emit, machine_info  # noqa: E402
from clusiam_jax.models.conv import im2col_conv, max_pool  # noqa: E402

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


def conv_fn(impl, stride, pad):
    padding = ((pad, pad), (pad, pad))
    if impl == 'im2col':
        return lambda x, w: im2col_conv(x, w, (stride, stride), padding)
    return lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), padding,
                                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def median_ms(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile
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
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    info = machine_info()
    for label, size, channels in POOLS:
        x = jnp.asarray(rng.normal(size=(args.batch, size, size, channels)), jnp.float32)
        for impl in args.impls:
            pool = lambda a, impl=impl: max_pool(a, (3, 3), (2, 2), ((1, 1), (1, 1)), impl)
            gradient = jax.jit(jax.grad(lambda a, pool=pool: jnp.sum(pool(a) ** 2)))
            emit(dict(bench='max_pool', layer=label, impl=impl, batch=args.batch, map=size,
                      channels=channels, forward_ms=median_ms(jax.jit(pool), (x,), args.repeats),
                      grad_ms=median_ms(gradient, (x,), args.repeats), **info))
    for label, size, cin, cout, kernel, stride, pad in SHAPES:
        x = jnp.asarray(rng.normal(size=(args.batch, size, size, cin)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)), jnp.float32)
        for impl in args.impls:  # same process, back to back: the ratio is what counts
            conv = conv_fn(impl, stride, pad)
            forward = jax.jit(conv)
            gradient = jax.jit(jax.grad(lambda a, b: jnp.sum(conv(a, b) ** 2), (0, 1)))
            emit(dict(bench='conv_kernel', layer=label, impl=impl, batch=args.batch,
                      map=size, cin=cin, cout=cout, kernel=kernel, stride=stride,
                      forward_ms=median_ms(forward, (x, w), args.repeats),
                      grad_ms=median_ms(gradient, (x, w), args.repeats), **info))


if __name__ == '__main__':
    main()
