"""Projector, predictor and cluster head of SPEC section 2, in PyTorch's default init.

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


def torch_linear(features: int, fan_in: int, use_bias: bool, dtype: Any, name: str):
    """nn.Dense initialised like torch.nn.Linear(fan_in, features)."""
    bound = 1.0 / fan_in**0.5

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nn.Dense(features, use_bias=use_bias, kernel_init=linear_kernel_init,
                    bias_init=bias_init, dtype=dtype, param_dtype=jnp.float32, name=name)


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
        fan_in = x.shape[-1]
        x = torch_linear(self.hidden, fan_in, False, self.dtype, 'linear1')(x)
        x = nn.relu(batch_norm_1d(train, self.dtype, 'bn1')(x))
        x = torch_linear(self.hidden, self.hidden, False, self.dtype, 'linear2')(x)
        x = nn.relu(batch_norm_1d(train, self.dtype, 'bn2')(x))
        x = torch_linear(self.out, self.hidden, False, self.dtype, 'linear3')(x)
        return batch_norm_1d(train, self.dtype, 'bn3', affine=False)(x)


class Predictor(nn.Module):
    """Linear-BN-ReLU-Linear bottleneck (SimSiam: no first bias; BYOL: with)."""
    hidden: int
    out: int
    first_bias: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = torch_linear(self.hidden, x.shape[-1], self.first_bias, self.dtype, 'linear1')(x)
        x = nn.relu(batch_norm_1d(train, self.dtype, 'bn1')(x))
        return torch_linear(self.out, self.hidden, True, self.dtype, 'linear2')(x)


class ClusterHead(nn.Module):
    """Cluster projector Linear-BN-ReLU followed by the assigner Linear -> K logits."""
    hidden: int
    num_clusters: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z, train: bool):
        h = torch_linear(self.hidden, z.shape[-1], True, self.dtype, 'projector_linear')(z)
        h = nn.relu(batch_norm_1d(train, self.dtype, 'projector_bn')(h))
        logits = torch_linear(self.num_clusters, self.hidden, True, self.dtype, 'assigner')(h)
        # Logits feed a softmax and the loss: keep them float32 under bfloat16 compute.
        return logits.astype(jnp.float32)
