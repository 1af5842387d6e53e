"""oneDNN kernels for XLA:CPU (`model.conv_impl=onednn`): the ResNet's NHWC x HWIO
convolutions, max pool, training-mode batch norms (with the ReLU after them fused in) and
residual add-ReLUs as custom calls into oneDNN, the library behind PyTorch's CPU autocast.

Why: jaxlib's XLA:CPU turns each bfloat16 convolution into a float32 one, so bf16 never
reaches the CPU's bf16 matrix units (AMX); oneDNN runs bf16 there and float32 on its own
AVX-512 kernels, and its element-wise passes in bf16 were several times faster than
XLA:CPU's. The kernel (onednn_common.h, onednn_conv.cc, onednn_norm.cc, shipped in the
package) is compiled on first use with the system's C++ compiler against jaxlib's FFI
headers and the oneDNN wheel
(requirements.txt), into `$XDG_CACHE_HOME/clusiam_jax/onednn/`, once per source, jaxlib
and oneDNN version. Gradients: the input gradient in the activations' dtype, the kernel
gradient accumulated and returned in float32 then cast to the kernel's dtype (as XLA's).
"""
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np

from clusiam_jax import fileio
from clusiam_jax.errors import ConfigError
from clusiam_jax.models.geometry import output_hw

_HERE = os.path.dirname(os.path.abspath(__file__))
# The kernel's sources: the shared header, the convolutions and pooling, the normalization.
_SOURCES = tuple(os.path.join(_HERE, name)
                 for name in ('onednn_common.h', 'onednn_conv.cc', 'onednn_norm.cc'))
_TARGETS = {'clusiam_onednn_conv_forward': 'ClusiamConvForward',
            'clusiam_onednn_conv_backward_data': 'ClusiamConvBackwardData',
            'clusiam_onednn_conv_backward_weights': 'ClusiamConvBackwardWeights',
            'clusiam_onednn_max_pool_forward': 'ClusiamMaxPoolForward',
            'clusiam_onednn_max_pool_backward': 'ClusiamMaxPoolBackward',
            'clusiam_onednn_batch_norm_forward': 'ClusiamBatchNormForward',
            'clusiam_onednn_batch_norm_backward': 'ClusiamBatchNormBackward',
            'clusiam_onednn_add_relu_forward': 'ClusiamAddReluForward',
            'clusiam_onednn_add_relu_backward': 'ClusiamAddReluBackward'}
_lock = threading.Lock()
_loaded = []
# oneDNN's OpenMP threads per call, the usable cores by default. oneDNN's threads wait for
# each other at barriers by spinning, so whenever other work holds a core (other processes
# on a shared machine) a team's step can stall many times over (docs/benchmarks.md,
# "bfloat16 on this CPU"): CLUSIAM_ONEDNN_THREADS=1 there.
THREADS_ENV = 'CLUSIAM_ONEDNN_THREADS'
# cgroup v2: the process's cgroup ("0::/path") and each cgroup's cpu.max ("quota period",
# or "max period" without a quota).
PROC_CGROUP = '/proc/self/cgroup'
CGROUP_ROOT = '/sys/fs/cgroup'


def _onednn_prefix():
    """The installation prefix holding oneDNN's header and library (the pip wheels put
    them under sys.prefix), or None."""
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix, '/usr/local', '/usr')):
        header = os.path.join(prefix, 'include', 'oneapi', 'dnnl', 'dnnl.hpp')
        if os.path.exists(header) and any(
                os.path.exists(os.path.join(prefix, lib, 'libdnnl.so'))
                for lib in ('lib', 'lib64', 'lib/x86_64-linux-gnu')):
            return prefix
    return None


@functools.lru_cache(maxsize=None)
def cpu_flags():
    """The CPU's feature flags (/proc/cpuinfo, read once: auto asks per convolution), empty
    where unreadable."""
    try:
        with open('/proc/cpuinfo', encoding='ascii', errors='replace') as f:
            for line in f:
                if line.startswith('flags'):
                    return frozenset(line.split(':', 1)[1].split())
    except OSError:
        pass
    return frozenset()


def unavailable_reason(dtype=None, devices: int = 1):
    """Why conv_impl=onednn cannot run here (one line), or None when it can. bfloat16
    needs AVX-512 (oneDNN has no bf16 convolution below it); several devices are refused:
    the custom calls have no sharding rule, so each device would compute the whole batch."""
    if jax.default_backend() != 'cpu':
        return f'model.conv_impl=onednn runs on the CPU backend only, not {jax.default_backend()}'
    if devices > 1:
        return (f'model.conv_impl=onednn runs on one device: with {devices} each would compute '
                'the whole batch (use im2col)')
    if dtype is not None and jnp.dtype(dtype) == jnp.bfloat16 and 'avx512bw' not in cpu_flags():
        return 'model.conv_impl=onednn in bfloat16 needs a CPU with AVX-512 (no avx512bw here)'
    prefix = _onednn_prefix()
    if prefix is None:
        return ('model.conv_impl=onednn needs oneDNN: pip install onednn-cpu-gomp '
                'onednn-devel-cpu-gomp (requirements.txt pins them; x86-64 Linux)')
    if (shutil.which(os.environ.get('CXX', 'g++')) is None
            and not os.path.exists(_library_path(prefix))):
        return ('model.conv_impl=onednn builds its kernel on first use and needs a C++ '
                'compiler: install g++ (or set CXX)')
    return None


def auto_picks_onednn(dtype) -> bool:
    """conv_impl=auto's choice: oneDNN for bfloat16 on one CPU device with AMX (bf16 matrix
    units) when the kernel builds; without AMX oneDNN's bf16 was slower than im2col."""
    if jnp.dtype(dtype) != jnp.bfloat16 or 'amx_bf16' not in cpu_flags():
        return False
    reason = unavailable_reason(dtype, jax.local_device_count())
    if reason is None:
        try:
            load()
            return True
        except ConfigError as error:
            reason = str(error)
    _warn_once(f'model.conv_impl=auto: bfloat16 convolutions stay on XLA:CPU (float32 '
               f'arithmetic) because {reason}')
    return False


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logging.getLogger(__name__).warning(message)


def _library_dir(prefix):
    return next(os.path.join(prefix, lib) for lib in ('lib', 'lib64', 'lib/x86_64-linux-gnu')
                if os.path.exists(os.path.join(prefix, lib, 'libdnnl.so')))


def _library_path(prefix):
    """The cached kernel's path: named by the source, jax, and the oneDNN library file
    (size and time: the wheel's libdnnl.so files are copies, not links to a versioned one)."""
    digest = hashlib.sha256()
    for source in _SOURCES:
        with open(source, 'rb') as f:
            digest.update(f.read())
    digest.update(jax.__version__.encode())
    library = os.stat(os.path.join(_library_dir(prefix), 'libdnnl.so'))
    digest.update(f'{library.st_size}:{library.st_mtime_ns}'.encode())
    return os.path.join(fileio.cache_root('onednn'), f'onednn_conv-{digest.hexdigest()[:16]}.so')


def _build(prefix, target):
    """Compile the kernel to `target` (atomically: two processes may build at once)."""
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _compile(prefix, target)
    except OSError as error:
        raise ConfigError(f'model.conv_impl=onednn: cannot write its kernel to '
                          f'{os.path.dirname(target)}: {error.strerror}') from error


def _compile(prefix, target):
    with fileio.atomic_write(target) as tmp:
        command = [os.environ.get('CXX', 'g++'), '-O2', '-std=c++17', '-shared', '-fPIC',
                   '-fopenmp', '-w', f'-I{jax.ffi.include_dir()}',
                   f'-I{os.path.join(prefix, "include")}',
                   *(source for source in _SOURCES if source.endswith('.cc')),
                   f'-L{_library_dir(prefix)}', '-ldnnl', f'-Wl,-rpath,{_library_dir(prefix)}',
                   '-o', tmp]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ['(no output)']
            first = next((line for line in lines if 'error' in line), lines[-1])
            raise ConfigError(f'model.conv_impl=onednn: building its kernel failed: {first}')


def load():
    """Build (once) and register the kernel with XLA; ConfigError in one line if it
    cannot run here."""
    with _lock:
        if _loaded:
            return
        reason = unavailable_reason()
        if reason:
            raise ConfigError(reason)
        prefix = _onednn_prefix()
        path = _library_path(prefix)
        if not os.path.exists(path):
            _build(prefix, path)
        library = ctypes.cdll.LoadLibrary(path)
        library.ClusiamBnReluWorkspaceBytes.restype = ctypes.c_int64
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                        platform='cpu')
        _loaded.append(library)


def threads_env_problem():
    """What is wrong with CLUSIAM_ONEDNN_THREADS (one line), or None: checked at start
    (config.validate) rather than at the first step's compile."""
    value = os.environ.get(THREADS_ENV)
    if value is not None and not (value.isascii() and value.isdigit() and int(value) >= 1):
        return f'{THREADS_ENV}={value!r}: a whole number of threads >= 1'
    return None


@functools.lru_cache(maxsize=None)
def usable_cores():
    """The cores this process may use: its CPU affinity, capped by the whole CPUs of a
    cgroup v2 CPU quota (containers and systemd units are often limited by quota, not
    affinity, and oneDNN's spinning threads stall when they outnumber the cores they get,
    so a 1.5-CPU quota gets one thread). Read once: every custom call asks at trace time."""
    cores = len(os.sched_getaffinity(0))
    quota = _cgroup_quota_cores()
    return cores if quota is None else min(cores, quota)


def _cgroup_quota_cores():
    """The least whole-CPU quota (at least 1) along this process's cgroup v2 path up to
    the root (a parent's quota binds its children), or None where there is none."""
    try:
        with open(PROC_CGROUP, encoding='utf-8') as f:
            path = next(line.split(':', 2)[2].strip() for line in f if line.startswith('0::'))
    except (OSError, StopIteration):
        path = '/'
    limits = []
    while True:
        try:
            with open(os.path.join(CGROUP_ROOT, path.lstrip('/'), 'cpu.max'),
                      encoding='ascii') as f:
                quota, period = f.read().split()[:2]
            if quota != 'max':
                limits.append(max(1, int(quota) // int(period)))
        except (OSError, ValueError):   # no cpu.max here (the root has none), or unreadable
            pass
        if path in ('', '/'):
            return min(limits) if limits else None
        path = os.path.dirname(path)


def _threads():
    problem = threads_env_problem()
    if problem:
        raise ConfigError(problem)
    value = os.environ.get(THREADS_ENV)
    return usable_cores() if value is None else int(value)


def _run(target, outputs, *operands, **attributes):
    """One oneDNN custom call: `outputs` a ShapeDtypeStruct or a tuple of them; float
    attributes go as float32, the rest (ints, bools) as int64, with the thread count."""
    typed = {k: np.float32(v) if isinstance(v, float) else np.int64(v)
             for k, v in attributes.items()}
    return jax.ffi.ffi_call(target, outputs)(*operands, **typed, threads=np.int64(_threads()))


def _call(target, shape, dtype, *operands, strides, padding, **window):
    """A convolution or pooling call: one output, the geometry as attributes."""
    (top, bottom), (left, right) = padding
    return _run(target, jax.ShapeDtypeStruct(shape, dtype), *operands, sh=strides[0],
                sw=strides[1], pt=top, pb=bottom, pl=left, pr=right, **window)


def _output_shape(x_shape, window, strides, padding, channels):
    return (x_shape[0], *output_hw(x_shape, window, strides, padding), channels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def onednn_conv(x, w, strides, padding):
    """NHWC x HWIO convolution (float32 or bfloat16, one dtype for both) by oneDNN."""
    load()
    shape = _output_shape(x.shape, w.shape[:2], strides, padding, w.shape[3])
    return _call('clusiam_onednn_conv_forward', shape, x.dtype, x, w.astype(x.dtype),
                 strides=strides, padding=padding)


def _forward(x, w, strides, padding):
    return onednn_conv(x, w, strides, padding), (x, w)


def _backward(strides, padding, residuals, g):
    x, w = residuals
    g = g.astype(x.dtype)
    dx = _call('clusiam_onednn_conv_backward_data', x.shape, x.dtype, g, w.astype(x.dtype),
               strides=strides, padding=padding)
    dw = _call('clusiam_onednn_conv_backward_weights', w.shape, jnp.float32, x, g,
               strides=strides, padding=padding)
    return dx, dw.astype(w.dtype)


onednn_conv.defvjp(_forward, _backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def onednn_max_pool(x, window, strides, padding):
    """NHWC max pooling by oneDNN (padding never wins a window, as PyTorch's)."""
    load()
    shape = _output_shape(x.shape, window, strides, padding, x.shape[3])
    return _call('clusiam_onednn_max_pool_forward', shape, x.dtype, x, strides=strides,
                 padding=padding, kh=window[0], kw=window[1])


def _pool_forward(x, window, strides, padding):
    return onednn_max_pool(x, window, strides, padding), x


def _pool_backward(window, strides, padding, x, g):
    return (_call('clusiam_onednn_max_pool_backward', x.shape, x.dtype, x, g.astype(x.dtype),
                  strides=strides, padding=padding, kh=window[0], kw=window[1]),)


onednn_max_pool.defvjp(_pool_forward, _pool_backward)


def _workspace_bytes(shape, dtype):
    """The bytes oneDNN's batch norm with a fused ReLU keeps for its backward (asked of the
    library: a bit per element on its CPU kernels, but that is its choice)."""
    size = _loaded[0].ClusiamBnReluWorkspaceBytes(
        *(ctypes.c_int64(v) for v in shape), ctypes.c_int64(int(jnp.dtype(dtype) == jnp.bfloat16)))
    if size < 0:
        raise ValueError(f'oneDNN has no fused batch norm + ReLU for {dtype} {shape}')
    return size


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def onednn_batch_norm(x, scale, bias, epsilon, relu=False):
    """(batch-normalized NHWC x * scale + bias in x's dtype, through a ReLU in the same pass
    if `relu`; the batch's float32 mean and biased variance) by oneDNN; the statistics are
    for the running averages (no gradient flows back through them)."""
    return _bn_forward(x, scale, bias, epsilon, relu)[0]


def _bn_forward(x, scale, bias, epsilon, relu):
    load()
    channels = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
    workspace = jax.ShapeDtypeStruct((_workspace_bytes(x.shape, x.dtype) if relu else 0,),
                                     jnp.uint8)
    y, mean, var, mask = _run(
        'clusiam_onednn_batch_norm_forward',
        (jax.ShapeDtypeStruct(x.shape, x.dtype), channels, channels, workspace),
        x, scale.astype(jnp.float32), bias.astype(jnp.float32), epsilon=float(epsilon),
        relu=relu)
    return (y, mean, var), (x, scale, mean, var, mask)


def _bn_backward(epsilon, relu, residuals, cotangents):
    x, scale, mean, var, mask = residuals
    channels = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
    dx, dscale, dbias = _run(
        'clusiam_onednn_batch_norm_backward',
        (jax.ShapeDtypeStruct(x.shape, x.dtype), channels, channels),
        x, cotangents[0].astype(x.dtype), scale.astype(jnp.float32), mean, var, mask,
        epsilon=float(epsilon), relu=relu)
    return dx, dscale.astype(scale.dtype), dbias.astype(scale.dtype)


onednn_batch_norm.defvjp(_bn_forward, _bn_backward)


@jax.custom_vjp
def onednn_add_relu(a, b):
    """relu(a + b) (NHWC, one shape and dtype) in one pass by oneDNN: a residual block's
    ending. Unlike XLA's ReLU, oneDNN's turns a NaN into 0 (so does the batch norm's fused
    one); a training step still sees it, in the gradients its non-finite check reads."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f'onednn_add_relu: {a.dtype}{list(a.shape)} and '
                         f'{b.dtype}{list(b.shape)} differ')
    load()
    return _run('clusiam_onednn_add_relu_forward', jax.ShapeDtypeStruct(a.shape, a.dtype), a, b)


def _add_relu_forward(a, b):
    out = onednn_add_relu(a, b)
    return out, out


def _add_relu_backward(out, g):
    dz = _run('clusiam_onednn_add_relu_backward', jax.ShapeDtypeStruct(out.shape, out.dtype),
              out, g.astype(out.dtype))
    return dz, dz


onednn_add_relu.defvjp(_add_relu_forward, _add_relu_backward)
