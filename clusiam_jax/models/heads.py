"""Projector, predictor and cluster head of docs/method.md §2, in PyTorch's default init.

torch.nn.Linear draws weight and bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in)); Flax's
defaults differ (lecun normal, zero bias), and init matters for reproducing the method.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clusiam_jax.models.batch_norm import BatchNorm

# variance_scaling(1/3, fan_in, uniform) is exactly U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


class TorchLinear(nn.Module):
    """torch.nn.Linear(fan_in, features): x @ kernel (+ bias), PyTorch's default init.

    Parameters are float32 and named as nn.Dense names them (`kernel` [in, out], `bias`).
    The product runs in the compute dtype; the bias is added in float32 and the output is
    then float32, so under bfloat16 compute the bias gradient (a sum over the batch) is
    reduced in float32. Every biased Linear here feeds a BatchNorm or a float32 output,
    which take float32 anyway; under float32 compute this is exactly nn.Dense.
    """
    features: int
    use_bias: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        bound = 1.0 / fan_in**0.5

        def bias_init(key, shape, dtype=jnp.float32):
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        kernel = self.param('kernel', linear_kernel_init, (fan_in, self.features), jnp.float32)
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                (((x.ndim - 1,), (0,)), ((), ())))
        if not self.use_bias:
            return y
        bias = self.param('bias', bias_init, (self.features,), jnp.float32)
        return y.astype(jnp.float32) + bias


def batch_norm_1d(train: bool, dtype: Any, name: str, affine: bool = True):
    return BatchNorm(use_running_average=not train, use_scale=affine, use_bias=affine,
                     dtype=dtype, name=name)


class Projector(nn.Module):
    """Linear-BN-ReLU-Linear-BN-ReLU-Linear-BN(no affine), as SimSiam's 3-layer projector.

    The last Linear's bias is dropped: the original freezes it at its random init and it
    is followed by a BatchNorm, so it cancels in training and in inference alike.
    """
    hidden: int
    out: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = TorchLinear(self.hidden, False, self.dtype, name='linear1')(x)
        x = nn.relu(batch_norm_1d(train, self.dtype, 'bn1')(x))
        x = TorchLinear(self.hidden, False, self.dtype, name='linear2')(x)
        x = nn.relu(batch_norm_1d(train, self.dtype, 'bn2')(x))
        x = TorchLinear(self.out, False, self.dtype, name='linear3')(x)
        # The projection z is a float32 output (the loss's target, the EMA target's output):
        # the last BN hands it over unrounded rather than through the compute dtype.
        return batch_norm_1d(train, jnp.float32, 'bn3', affine=False)(x)


class Predictor(nn.Module):
    """Linear-BN-ReLU-Linear bottleneck (SimSiam: no first bias; BYOL: with)."""
    hidden: int
    out: int
    first_bias: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = TorchLinear(self.hidden, self.first_bias, self.dtype, name='linear1')(x)
        x = nn.relu(batch_norm_1d(train, self.dtype, 'bn1')(x))
        return TorchLinear(self.out, True, self.dtype, name='linear2')(x)


class ClusterHead(nn.Module):
    """Cluster projector Linear-BN-ReLU followed by the assigner Linear -> K logits."""
    hidden: int
    num_clusters: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z, train: bool):
        h = TorchLinear(self.hidden, True, self.dtype, name='projector_linear')(z)
        h = nn.relu(batch_norm_1d(train, self.dtype, 'projector_bn')(h))
        logits = TorchLinear(self.num_clusters, True, self.dtype, name='assigner')(h)
        # Logits feed a softmax and the loss: keep them float32 under bfloat16 compute.
        return logits.astype(jnp.float32)
