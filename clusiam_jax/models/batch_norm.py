"""BatchNorm with PyTorch's semantics (running variance of the *unbiased* batch variance),
float32 statistics over the global batch, and the textbook backward (fewer passes)."""
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clusiam_jax.models import onednn
from clusiam_jax.models.conv import resolve_conv_impl

BN_MOMENTUM = 0.9   # Flax convention: new = m * old + (1 - m) * batch; PyTorch momentum 0.1
BN_EPSILON = 1e-5


def batch_moments(x32, axes):
    """Biased batch mean and variance, two-pass (no cancellation)."""
    mean = jnp.mean(x32, axes)
    return mean, jnp.mean(jnp.square(x32 - mean), axes)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize_with_batch_stats(x, scale, bias, epsilon: float, out_dtype):
    """Batch-normalized x * scale + bias; x kept for the backward in its dtype, the rest f32."""
    return _normalize_fwd(x, scale, bias, epsilon, out_dtype)[0]


def _normalize_fwd(x, scale, bias, epsilon, out_dtype):
    x32 = x.astype(jnp.float32)
    mean, var = batch_moments(x32, tuple(range(x.ndim - 1)))
    inv_std = jax.lax.rsqrt(var + epsilon)
    y = ((x32 - mean) * (inv_std * scale) + bias).astype(out_dtype)
    return y, (x, mean, inv_std, scale)


def _normalize_bwd(epsilon, out_dtype, residuals, dy):
    del epsilon, out_dtype
    x, mean, inv_std, scale = residuals
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    dy32 = dy.astype(jnp.float32)
    x_hat = (x.astype(jnp.float32) - mean) * inv_std
    d_bias = jnp.sum(dy32, axes)
    d_scale = jnp.sum(dy32 * x_hat, axes)
    # d/dx of the normalization, the batch mean and variance included.
    dx = (scale * inv_std) * (dy32 - (d_bias + x_hat * d_scale) / n)
    return dx.astype(x.dtype), d_scale, d_bias


normalize_with_batch_stats.defvjp(_normalize_fwd, _normalize_bwd)


class BatchNorm(nn.Module):
    use_running_average: bool
    dtype: Any = jnp.float32
    affine: bool = True      # scale and bias
    zero_init: bool = False  # the scale starts at 0 (a residual block's last BN)
    conv_impl: str = 'xla'   # 'onednn' (or 'auto' resolving to it): oneDNN's kernel (4-D)
    relu: bool = False       # a ReLU after (in oneDNN's kernel, the same pass)

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        axes = tuple(range(x.ndim - 1))
        running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
        running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
        scale, bias = jnp.ones((features,), jnp.float32), jnp.zeros((features,), jnp.float32)
        if self.affine:
            init = nn.initializers.zeros if self.zero_init else nn.initializers.ones
            scale = self.param('scale', init, (features,), jnp.float32)
            bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
        if self.use_running_average:
            y = ((x.astype(jnp.float32) - running_mean.value)
                 * jax.lax.rsqrt(running_var.value + BN_EPSILON))
            return self._activate((y * scale + bias).astype(self.dtype))
        if x.ndim == 4 and resolve_conv_impl(self.conv_impl, self.dtype) == 'onednn':
            y, mean, var = onednn.onednn_batch_norm(x.astype(self.dtype), scale, bias,
                                                    BN_EPSILON, self.relu)
            mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
        else:
            # The normalization's statistics (XLA computes them once), without gradient.
            mean, var = batch_moments(jax.lax.stop_gradient(x).astype(jnp.float32), axes)
            y = self._activate(normalize_with_batch_stats(x, scale, bias, BN_EPSILON,
                                                          self.dtype))
        if not self.is_initializing():
            n = x.size // features
            unbiased = var * (n / max(n - 1, 1))
            m = BN_MOMENTUM
            running_mean.value = m * running_mean.value + (1 - m) * mean
            running_var.value = m * running_var.value + (1 - m) * unbiased
        return y

    def _activate(self, y):
        return jax.nn.relu(y) if self.relu else y


def batch_norm(train: bool, dtype: Any, name: str, zero_init: bool = False,
               affine: bool = True, conv_impl: str = 'xla', relu: bool = False) -> BatchNorm:
    return BatchNorm(not train, dtype, affine, zero_init, conv_impl, relu, name=name)
