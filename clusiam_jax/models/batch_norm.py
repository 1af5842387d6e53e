"""BatchNorm with PyTorch's semantics, so running statistics match the original's.

Training mode normalizes with the biased batch variance (as both frameworks do), but
PyTorch's running variance averages the *unbiased* batch variance (n / (n - 1) times the
biased one), where flax.linen.BatchNorm averages the biased one. The running statistics
are what inference-mode embeddings (export, kNN, DSMIL) are computed with, so the
faithful default keeps PyTorch's. Variable names match flax.linen.BatchNorm (`scale`,
`bias`; `mean`, `var`), so checkpoints and the PyTorch key mapping are unchanged.

Statistics are computed in float32 whatever the compute dtype, over every axis but the
last; under jit with a batch-sharded input that is the global batch.
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_MOMENTUM = 0.9   # Flax convention: new = m * old + (1 - m) * batch; PyTorch momentum 0.1
BN_EPSILON = 1e-5


class BatchNorm(nn.Module):
    use_running_average: bool
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    dtype: Any = jnp.float32
    use_scale: bool = True
    use_bias: bool = True
    scale_init: Callable = nn.initializers.ones

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        axes = tuple(range(x.ndim - 1))
        running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
        running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
        x32 = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            mean = jnp.mean(x32, axes)
            var = jnp.mean(jnp.square(x32 - mean), axes)  # two-pass: no cancellation
            if not self.is_initializing():
                n = x.size // features
                unbiased = var * (n / max(n - 1, 1))
                m = self.momentum
                running_mean.value = m * running_mean.value + (1 - m) * mean
                running_var.value = m * running_var.value + (1 - m) * unbiased
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.use_scale:
            y = y * self.param('scale', self.scale_init, (features,), jnp.float32)
        if self.use_bias:
            y = y + self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
        return y.astype(self.dtype)
