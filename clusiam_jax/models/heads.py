"""docs/method.md §2's projector, predictor and cluster head, in torch.nn.Linear's init."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clusiam_jax.models.batch_norm import batch_norm

# variance_scaling(1/3, fan_in, uniform) is exactly U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


class TorchLinear(nn.Module):
    """torch.nn.Linear (float32 params, nn.Dense's names): product in dtype, bias in float32."""
    features: int
    use_bias: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        kernel = self.param('kernel', linear_kernel_init, (fan_in, self.features), jnp.float32)
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                (((x.ndim - 1,), (0,)), ((), ())))
        if not self.use_bias:
            return y
        bound = 1.0 / fan_in**0.5
        bias = self.param('bias', lambda key, shape: jax.random.uniform(
            key, shape, jnp.float32, -bound, bound), (self.features,))
        return y.astype(jnp.float32) + bias


class Projector(nn.Module):
    """SimSiam's projector, (Linear-BN-ReLU) x 2, Linear-BN(no affine); no bias (BN cancels)."""
    hidden: int
    out: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        for i in (1, 2):
            x = TorchLinear(self.hidden, False, self.dtype, name=f'linear{i}')(x)
            x = nn.relu(batch_norm(train, self.dtype, f'bn{i}')(x))
        x = TorchLinear(self.out, False, self.dtype, name='linear3')(x)
        # z is a float32 output (the loss's target): handed over unrounded.
        return batch_norm(train, jnp.float32, 'bn3', affine=False)(x)


class Predictor(nn.Module):
    """Linear-BN-ReLU-Linear bottleneck (SimSiam: no first bias; BYOL: with)."""
    hidden: int
    out: int
    first_bias: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = TorchLinear(self.hidden, self.first_bias, self.dtype, name='linear1')(x)
        x = nn.relu(batch_norm(train, self.dtype, 'bn1')(x))
        return TorchLinear(self.out, True, self.dtype, name='linear2')(x)


class ClusterHead(nn.Module):
    """Cluster projector Linear-BN-ReLU, then the assigner Linear -> K float32 logits."""
    hidden: int
    num_clusters: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z, train: bool):
        h = TorchLinear(self.hidden, True, self.dtype, name='projector_linear')(z)
        h = nn.relu(batch_norm(train, self.dtype, 'projector_bn')(h))
        logits = TorchLinear(self.num_clusters, True, self.dtype, name='assigner')(h)
        return logits.astype(jnp.float32)
