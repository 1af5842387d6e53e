"""docs/method.md §2's projector, predictor and cluster head, in torch.nn.Linear's init."""
from typing import Any, Tuple

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


class Head(nn.Module):
    """Linear-BN-ReLU-Linear, float32 out: the predictor (SimSiam: no first bias; BYOL: with)
    and, under its own `names`, the cluster head (cluster projector, then the assigner)."""
    hidden: int
    out: int
    first_bias: bool
    dtype: Any = jnp.float32
    names: Tuple[str, str, str] = ('linear1', 'bn1', 'linear2')

    @nn.compact
    def __call__(self, x, train: bool):
        first, bn, last = self.names
        x = TorchLinear(self.hidden, self.first_bias, self.dtype, name=first)(x)
        x = nn.relu(batch_norm(train, self.dtype, bn)(x))
        return TorchLinear(self.out, True, self.dtype, name=last)(x)
