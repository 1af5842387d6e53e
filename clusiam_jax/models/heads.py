"""docs/method.md §2's projector, predictor and cluster head, in torch.nn.Linear's init."""
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from clusiam_jax.models.batch_norm import batch_norm
from clusiam_jax.models.conv import fusion_barrier

# variance_scaling(1/3, fan_in, uniform) is exactly U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def _rounded_product(a, b, dims):
    """dot_general accumulated in float32, rounded to a's dtype once: the value of a
    bf16 product on a GPU, and on XLA:CPU the only form its bf16 matrix kernels run
    (YNNPACK, ~4x float32 on AMX); a dot with bf16 output is upcast to a float32 one."""
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(a.dtype)


@jax.custom_vjp
def low_precision_matmul(x, kernel):
    """x [..., fan_in] @ kernel [fan_in, features] in their (low) dtype, forward and both
    gradients as float32-accumulated products (autodiff of the forward would hand the
    backward products a float32 cotangent, so float32 products)."""
    return _rounded_product(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _low_precision_matmul_bwd(residuals, g):
    x, kernel = residuals
    g = g.astype(x.dtype)
    dx = _rounded_product(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    # x^T materialized: XLA folds a transpose into the dot, and a bf16 dot contracting
    # the lhs's leading dimension is upcast to float32 on XLA:CPU.
    dkernel = _rounded_product(fusion_barrier(x2.T), g2, (((1,), (0,)), ((), ())))
    return dx, dkernel


low_precision_matmul.defvjp(lambda x, kernel: (low_precision_matmul(x, kernel), (x, kernel)),
                            _low_precision_matmul_bwd)


class TorchLinear(nn.Module):
    """torch.nn.Linear (float32 params, nn.Dense's names): product in dtype, bias in float32."""
    features: int
    use_bias: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        kernel = self.param('kernel', linear_kernel_init, (fan_in, self.features), jnp.float32)
        if jnp.dtype(self.dtype) == jnp.float32:
            y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        else:
            y = low_precision_matmul(x.astype(self.dtype), kernel.astype(self.dtype))
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
