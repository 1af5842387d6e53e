"""model.conv_impl=onednn (models/onednn.py): oneDNN's convolution and max pool against
XLA's convolution and the project's tap_max_pool, values and both gradients, in float32 and
bfloat16; a whole ResNet against im2col; the one-line refusals where it cannot run; and
the build cache (compiled once, then reused by later processes).

CI installs oneDNN (requirements.txt) and has g++ (.ci/run), so nothing here skips: where
oneDNN cannot run, the tests fail with unavailable_reason()'s line."""
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from clusiam_jax.errors import ConfigError
from clusiam_jax.models import onednn
from clusiam_jax.models.batch_norm import BN_EPSILON, batch_moments, normalize_with_batch_stats
from clusiam_jax.models.conv import tap_max_pool
from clusiam_jax.models.resnet import ResNetTiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (N, H, W, input channels, output channels, kernel, strides, padding ((top, bottom),
# (left, right))): every shape ResNet gives a convolution, plus non-square maps, strides
# and paddings, so a swapped height/width or top/left attribute cannot pass.
CONVS = [
    (2, 9, 9, 16, 16, 3, (1, 1), ((1, 1), (1, 1))),    # a block's 3x3
    (2, 9, 9, 16, 24, 3, (2, 2), ((1, 1), (1, 1))),    # a stage's strided 3x3, odd map
    (2, 20, 20, 3, 8, 7, (2, 2), ((3, 3), (3, 3))),    # the RGB stem
    (1, 21, 21, 3, 8, 7, (2, 2), ((3, 3), (3, 3))),    # the stem on an odd map, batch 1
    (3, 8, 8, 16, 24, 1, (2, 2), ((0, 0), (0, 0))),    # the strided 1x1 downsample
    (1, 2, 2, 16, 16, 3, (1, 1), ((1, 1), (1, 1))),    # a map smaller than the kernel
    (2, 2, 2, 16, 16, 3, (2, 2), ((1, 1), (1, 1))),    # strided on it: 2x2 -> 1x1
    (1, 1, 1, 8, 8, 3, (1, 1), ((1, 1), (1, 1))),      # a 1x1 map
    (1, 7, 5, 5, 6, 3, (2, 1), ((0, 1), (2, 1))),      # odd everything, asymmetric
]
POOL = ((3, 3), (2, 2), ((1, 1), (1, 1)))   # ResNet's max pool


@pytest.fixture(scope='module', autouse=True)
def onednn_here():
    """Fails (no skip) where oneDNN cannot run: CI installs it, so a missing piece there is
    a broken CI setup, not a reason to test less."""
    reason = onednn.unavailable_reason()
    assert reason is None, reason


def xla_conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding,
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                    precision=lax.Precision.HIGHEST)


def random_conv(n, h, w, cin, cout, kernel, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, h, w, cin)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)) / kernel, jnp.float32)
    return x, k


def relative_error(got, want):
    """max |got - want| over max |want|: one scale for a whole tensor."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def conv_and_vjp(conv, x, w, g):
    y, vjp = jax.vjp(conv, x, w)
    return (y, *vjp(g))


@pytest.mark.parametrize('n,h,w,cin,cout,kernel,strides,padding', CONVS)
def test_float32_matches_xla_values_and_gradients(n, h, w, cin, cout, kernel, strides,
                                                  padding):
    x, k = random_conv(n, h, w, cin, cout, kernel)
    want_y = xla_conv(x, k, strides, padding)
    g = jnp.asarray(np.random.default_rng(1).normal(size=want_y.shape), jnp.float32)
    got = conv_and_vjp(lambda a, b: onednn.onednn_conv(a, b, strides, padding), x, k, g)
    want = conv_and_vjp(lambda a, b: xla_conv(a, b, strides, padding), x, k, g)
    for name, a, b in zip(('y', 'dx', 'dw'), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype == jnp.float32, name
        # Both sum the same float32 products, in another order: ~1e-7 each.
        assert relative_error(a, b) < 1e-5, name


# bfloat16 keeps 8 significant bits: rounding to nearest moves a value by at most 2^-8 of
# itself, so a result rounded once to bf16 is within 2^-8 of the tensor's largest value.
# oneDNN accumulates bf16 products in float32 (AMX, AVX-512 BF16) and rounds once, so its
# outputs sit within that of the float32 result on the same bf16 inputs (measured up to
# ~0.7 of it); 2^-7 leaves margin, and a kernel summing in bf16 exceeds it (~2x, simulated
# on the 144-term strided 3x3 case).
BF16_ROUNDING = 2.0 ** -7


@pytest.mark.parametrize('kernel_dtype', [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize('n,h,w,cin,cout,kernel,strides,padding',
                         [CONVS[1], CONVS[2], CONVS[4], CONVS[5]])
def test_bfloat16_is_the_float32_result_on_the_same_inputs_rounded(
        n, h, w, cin, cout, kernel, strides, padding, kernel_dtype):
    x, k = random_conv(n, h, w, cin, cout, kernel)
    x16, k16 = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    shape = xla_conv(x, k, strides, padding).shape
    g16 = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.bfloat16)
    y, dx, dw = conv_and_vjp(lambda a, b: onednn.onednn_conv(a, b, strides, padding),
                             x16, k16.astype(kernel_dtype), g16)
    # The kernel is cast to the activations' dtype (as flax does), its gradient back.
    assert y.dtype == dx.dtype == jnp.bfloat16 and dw.dtype == kernel_dtype
    # The reference: float32 arithmetic on exactly the bf16 values oneDNN received.
    want = conv_and_vjp(lambda a, b: xla_conv(a, b, strides, padding),
                        x16.astype(jnp.float32), k16.astype(jnp.float32),
                        g16.astype(jnp.float32))
    for name, got, ref in zip(('y', 'dx', 'dw'), (y, dx, dw), want):
        assert relative_error(got, ref) < BF16_ROUNDING, name
    if kernel_dtype == jnp.float32:
        # Accumulated and returned in float32: no bf16 rounding at all.
        assert relative_error(dw, want[2]) < 1e-5


def max_pool_and_vjp(pool, x, g):
    y, vjp = jax.vjp(lambda a: pool(a, *POOL), x)
    return y, vjp(g)[0]


def tied_maps(size, dtype):
    """Random maps with ties: a ReLU's zeros in sample 0, a plateau of equal positive
    values in sample 1 (the gradient goes to each window's first maximum, row-major)."""
    rng = np.random.default_rng(size)
    x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    x[0] = np.maximum(x[0], 0.0)
    x[1, :3, :3] = 1.5
    return jnp.asarray(x, dtype)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('size', [9, 8, 2])
def test_max_pool_matches_tap_max_pool_exactly_ties_included(size, dtype):
    x = tied_maps(size, dtype)
    ref_y = tap_max_pool(x, *POOL)
    # Small whole numbers: each input's gradient, a sum of up to four of them, is exact in
    # any order and in bf16, so equality tests where each one went, not rounding.
    g = jnp.asarray(np.random.default_rng(2).integers(-8, 9, size=ref_y.shape), dtype)
    y, dx = max_pool_and_vjp(onednn.onednn_max_pool, x, g)
    want_y, want_dx = max_pool_and_vjp(tap_max_pool, x, g)
    assert y.dtype == dx.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want_y, np.float32))
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(want_dx, np.float32))


def test_bfloat16_max_pool_gradient_is_within_its_roundings():
    """With arbitrary cotangents, overlapping windows add up to four of them per input.
    tap_max_pool sums them in float32 and rounds once; oneDNN's bf16 backward rounds each
    partial sum to bf16 (a last-bit difference on a few inputs), so: the same inputs get
    gradient, within four bf16 roundings (2^-8 of a partial sum each, 3 there and 1 here)
    of the sum of the |terms|."""
    x = tied_maps(16, jnp.bfloat16)
    g = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8, 8, 3)), jnp.bfloat16)
    _, dx = max_pool_and_vjp(onednn.onednn_max_pool, x, g)
    _, want = max_pool_and_vjp(tap_max_pool, x, g)
    # Each input's sum of |terms|: |g| routed the same way, exactly, in float32.
    _, scale = max_pool_and_vjp(tap_max_pool, x.astype(jnp.float32),
                                jnp.abs(g).astype(jnp.float32))
    got, want, scale = (np.asarray(a, np.float32) for a in (dx, want, scale))
    assert np.array_equal(got != 0, want != 0)
    assert np.all(np.abs(got - want) <= 4 * 2.0 ** -8 * scale)


def batch_norm_and_vjp(norm, x, scale, bias, g):
    (y, mean, var), vjp = jax.vjp(norm, x, scale, bias)
    return (y, mean, var, *vjp((g, jnp.zeros_like(mean), jnp.zeros_like(var))))


def xla_batch_norm(relu):
    """The im2col path's batch norm (batch_norm.py), through ReLU when asked."""
    def norm(x, scale, bias):
        mean, var = batch_moments(lax.stop_gradient(x).astype(jnp.float32), (0, 1, 2))
        y = normalize_with_batch_stats(x, scale, bias, BN_EPSILON, x.dtype)
        return (jax.nn.relu(y) if relu else y), mean, var
    return norm


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('relu', [False, True])
def test_batch_norm_matches_the_xla_one_values_statistics_and_gradients(dtype, relu):
    """Training-mode batch norm, and with `relu` the ReLU fused into it (the gradient masked
    from oneDNN's workspace): against XLA's on the same inputs, about half of the outputs
    negative before the ReLU. float32 agrees to summation order; bf16 to a rounding of the
    outputs (both compute in float32 and round once)."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(3, 5, 7, 16)) * 2 + 0.5, dtype)
    scale = jnp.asarray(rng.uniform(0.5, 2.0, size=16), jnp.float32)
    bias = jnp.asarray(rng.normal(size=16) * 0.5, jnp.float32)
    g = jnp.asarray(rng.normal(size=x.shape), dtype)
    got = batch_norm_and_vjp(lambda *a: onednn.onednn_batch_norm(*a, BN_EPSILON, relu),
                             x, scale, bias, g)
    want = batch_norm_and_vjp(xla_batch_norm(relu), x, scale, bias, g)
    tolerance = 1e-5 if dtype == jnp.float32 else 2.0 ** -7
    for name, a, b in zip(('y', 'mean', 'var', 'dx', 'dscale', 'dbias'), got, want):
        assert a.dtype == b.dtype, name
        assert relative_error(a, b) < tolerance, name
    if relu:   # the case is one where the mask matters
        assert 0.3 < np.mean(np.asarray(got[0], np.float32) == 0) < 0.7


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_add_relu_is_xlas_exactly(dtype):
    """relu(a + b) and its gradient: one rounding of a float32 sum either way, so exact."""
    rng = np.random.default_rng(5)
    a, b, g = (jnp.asarray(rng.normal(size=(2, 6, 5, 24)), dtype) for _ in range(3))
    results = []
    for add_relu in (onednn.onednn_add_relu, lambda a, b: jax.nn.relu(a + b)):
        y, vjp = jax.vjp(add_relu, a, b)
        results.append((y, *vjp(g)))
    for got, want in zip(*results):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def away_from_zero(path, param):
    name = jax.tree_util.keystr(path)
    if 'scale' in name:
        return jnp.linspace(0.5, 1.5, param.size)
    return jnp.linspace(-0.2, 0.2, param.size) if 'bias' in name else param


def test_resnet_matches_im2col_features_and_parameter_gradients():
    """resnet_tiny at 32 px (maps 16 -> 8 -> 8, 4, 2, 1: the stem, pool, strided, 1x1 and
    smaller-than-kernel convolutions, the training-mode batch norms with their fused ReLUs,
    the residual add-ReLUs) in float32, same parameters and batch."""
    images = jax.random.uniform(jax.random.PRNGKey(1), (8, 32, 32, 3))
    weights = jnp.linspace(-1.0, 1.0, 64)
    results = {}
    for impl in ('im2col', 'onednn'):
        net = ResNetTiny(conv_impl=impl)
        variables = net.init(jax.random.PRNGKey(0), images, train=False)
        # Scales away from zero_init's 0 and biases away from 0: gradients then flow through
        # every block's batch norms and ReLUs (a zero scale would block them).
        variables = {**variables, 'params': jax.tree_util.tree_map_with_path(
            away_from_zero, variables['params'])}

        def loss(params, net=net, variables=variables):
            features, updated = net.apply({**variables, 'params': params}, images, train=True,
                                          mutable=['batch_stats'])
            return jnp.sum(jnp.tanh(features) * weights), (features, updated['batch_stats'])

        results[impl] = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
    ((_, (want_features, want_stats)), want_grads), ((_, (features, stats)), grads) = (
        results['im2col'], results['onednn'])
    # float32 sums in other orders (oneDNN's batch norm statistics too), through a network:
    # ~1e-6 of the largest feature. Batch 8: layer4's batch norms over 1x1 maps then see 8
    # values (over 4 they amplified those differences past 1e-5, flags-dependent).
    assert relative_error(features, want_features) < 1e-5
    # The running statistics from oneDNN's batch mean and biased variance (made unbiased).
    for got, want in zip(jax.tree.leaves(stats), jax.tree.leaves(want_stats)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
    for path, got, want in zip(jax.tree_util.tree_leaves_with_path(grads),
                               jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-3,
                                   atol=1e-5 * float(jnp.max(jnp.abs(want))) + 1e-7,
                                   err_msg=jax.tree_util.keystr(path[0]))


# ------------------------------------------------------------- refusals and the build


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """load() as in a new process (nothing registered yet, an empty build cache); the
    module's registered library comes back after the test."""
    monkeypatch.setattr(onednn, '_loaded', [])
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    return tmp_path


def refusal():
    reason = onednn.unavailable_reason()
    assert reason and '\n' not in reason
    with pytest.raises(ConfigError) as raised:
        onednn.load()
    assert str(raised.value) == reason
    return reason


def test_without_onednn_the_reason_names_the_wheels(monkeypatch, fresh_load):
    monkeypatch.setattr(onednn, '_onednn_prefix', lambda: None)
    reason = refusal()
    assert 'onednn-cpu-gomp' in reason and 'onednn-devel-cpu-gomp' in reason


def test_without_a_compiler_the_reason_names_it(monkeypatch, fresh_load):
    monkeypatch.setenv('CXX', 'no-such-compiler-clusiam')
    assert 'C++ compiler' in refusal()


def test_off_the_cpu_backend_the_reason_says_so(monkeypatch, fresh_load):
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    assert 'CPU backend only' in refusal()


def test_a_failing_build_is_one_line_and_leaves_no_library(monkeypatch, fresh_load):
    monkeypatch.setenv('CXX', 'false')   # found on PATH, exits 1 without output
    with pytest.raises(ConfigError, match='building its kernel failed') as raised:
        onednn.load()
    assert '\n' not in str(raised.value)
    assert not [f for _, _, files in os.walk(fresh_load) for f in files]


def test_library_name_follows_the_kernel_source(monkeypatch, fresh_load):
    prefix = onednn._onednn_prefix()
    before = onednn._library_path(prefix)
    # An edit to any of its sources (the shared header too) builds the kernel afresh,
    # never mistaken for the old build.
    original = onednn._SOURCES
    for index, source in enumerate(original):
        edited = fresh_load / os.path.basename(source)
        with open(source) as f:
            edited.write_text(f.read() + '\n// edited\n')
        sources = list(original)   # only this one edited
        sources[index] = str(edited)
        monkeypatch.setattr(onednn, '_SOURCES', tuple(sources))
        assert onednn._library_path(prefix) != before


LOAD_AND_RUN = textwrap.dedent("""
    import jax.numpy as jnp
    from clusiam_jax.models import onednn
    y = onednn.onednn_conv(jnp.ones((1, 3, 3, 2)), jnp.ones((3, 3, 2, 1)), (1, 1),
                           ((1, 1), (1, 1)))
    print(onednn._library_path(onednn._onednn_prefix()), float(y.sum()))
""")


def load_in_a_new_process(cache, **env):
    done = subprocess.run([sys.executable, '-c', LOAD_AND_RUN], cwd=REPO, text=True,
                          capture_output=True, timeout=120,
                          env={**os.environ, 'XDG_CACHE_HOME': str(cache),
                               'JAX_PLATFORMS': 'cpu', **env})
    assert done.returncode == 0, done.stderr[-2000:]
    path, total = done.stdout.split()
    # 3x3 ones over a padded 3x3 map of ones, 2 channels: 4 corners x 4 taps, 4 edges x 6,
    # centre 9, times 2 channels.
    assert float(total) == 2 * (4 * 4 + 4 * 6 + 9)
    return path


def test_the_kernel_is_built_once_into_the_cache_and_reused(tmp_path):
    cache = tmp_path / 'cache'
    path = load_in_a_new_process(cache)
    folder = cache / 'clusiam_jax' / 'onednn'
    assert os.path.dirname(path) == str(folder)
    assert re.fullmatch(r'onednn_conv-[0-9a-f]{16}\.so', os.path.basename(path))
    assert os.listdir(folder) == [os.path.basename(path)]   # no temporary left beside it
    built = os.stat(path).st_mtime_ns
    # A second process loads the same file: a compiler that fails proves it builds nothing.
    assert load_in_a_new_process(cache, CXX='false') == path
    assert os.stat(path).st_mtime_ns == built
    assert os.listdir(folder) == [os.path.basename(path)]


@pytest.fixture
def uncached_cores():
    """usable_cores() is read once per process: afresh for this test, and not its faked
    count for later ones."""
    onednn.usable_cores.cache_clear()
    yield
    onednn.usable_cores.cache_clear()


@pytest.mark.parametrize('quotas,cap', [
    ({'a/b': '50000 100000'}, 1),                            # half a CPU: one thread
    ({'a/b': '150000 100000'}, 1),                           # 1.5: whole CPUs only
    ({'a/b': '250000 100000'}, 2),
    ({'a/b': 'max 100000', 'a': '250000 100000'}, 2),        # a parent's quota binds
    ({'a/b': '300000 100000', 'a': 'max 100000', '': '100000 100000'}, 1),
    ({'a/b': 'max 100000'}, None),                           # no quota: the affinity
    ({'a/b': 'garbled'}, None),
    ({}, None)])                                             # no cpu.max files at all
def test_the_default_thread_count_is_capped_by_cgroup_cpu_quotas(monkeypatch, tmp_path,
                                                                 uncached_cores, quotas, cap):
    """Affinity 4 cores, the process in cgroup /a/b: the least whole-CPU quota along the
    path caps the team."""
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv(onednn.THREADS_ENV, raising=False)
    (tmp_path / 'proc_cgroup').write_text('0::/a/b\n')
    for folder, text in quotas.items():
        (tmp_path / 'fs' / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / 'fs' / folder / 'cpu.max').write_text(text + '\n')
    monkeypatch.setattr(onednn, 'PROC_CGROUP', str(tmp_path / 'proc_cgroup'))
    monkeypatch.setattr(onednn, 'CGROUP_ROOT', str(tmp_path / 'fs'))
    assert onednn._threads() == (cap or 4)
    monkeypatch.setenv(onednn.THREADS_ENV, '3')   # an explicit count wins
    assert onednn._threads() == 3


def test_auto_takes_onednn_for_bf16_only_with_amx_and_one_device(monkeypatch):
    """Without AMX oneDNN's bf16 convolution was slower than im2col (AVX-512) or absent
    (AVX2); on several devices each would compute the whole batch."""
    from clusiam_jax.models import conv
    monkeypatch.setattr(jax, 'local_device_count', lambda: 1)   # the tests simulate several
    assert conv.resolve_conv_impl('auto', jnp.float32) == 'im2col'
    has_amx = 'amx_bf16' in onednn.cpu_flags()
    assert conv.resolve_conv_impl('auto', jnp.bfloat16) == ('onednn' if has_amx else 'im2col')
    monkeypatch.setattr(onednn, 'cpu_flags', lambda: frozenset({'avx512bw', 'avx512_bf16'}))
    assert conv.resolve_conv_impl('auto', jnp.bfloat16) == 'im2col'
    monkeypatch.setattr(onednn, 'cpu_flags', lambda: frozenset({'avx2'}))
    assert onednn.unavailable_reason(jnp.bfloat16) == (
        'model.conv_impl=onednn in bfloat16 needs a CPU with AVX-512 (no avx512bw here)')
    assert onednn.unavailable_reason(jnp.float32) is None
    monkeypatch.undo()
    monkeypatch.setattr(jax, 'local_device_count', lambda: 8)
    assert conv.resolve_conv_impl('auto', jnp.bfloat16) == 'im2col'
    assert 'runs on one device: with 8' in onednn.unavailable_reason(jnp.bfloat16, 8)


def test_auto_falls_back_in_one_warning_when_the_build_fails(monkeypatch, fresh_load, caplog):
    from clusiam_jax.models import conv
    monkeypatch.setattr(jax, 'local_device_count', lambda: 1)
    monkeypatch.setattr(onednn, 'cpu_flags', lambda: frozenset({'avx512bw', 'amx_bf16'}))
    monkeypatch.setenv('CXX', 'false')
    monkeypatch.setattr(onednn, '_warn_once', lambda message: onednn.logging.getLogger(
        onednn.__name__).warning(message))
    with caplog.at_level('WARNING'):
        assert conv.resolve_conv_impl('auto', jnp.bfloat16) == 'im2col'
    assert 'building its kernel failed' in caplog.text


def test_an_unwritable_cache_is_one_config_error(monkeypatch, fresh_load, tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('')
    monkeypatch.setenv('XDG_CACHE_HOME', str(blocker))   # a file where a folder must go
    with pytest.raises(ConfigError, match='cannot write its kernel'):
        onednn.load()
