"""A torchvision-compatible ResNet backbone in Flax Linen.

Matches torchvision's `resnet18` / `resnet50` layer for layer so weights can be moved
between the two: explicit paddings (Flax 'SAME' pads stride-2 convolutions differently
from PyTorch), no conv biases, He-normal fan_out conv init, PyTorch-semantics BatchNorm
(eps 1e-5, momentum 0.1 in PyTorch terms; batch_norm.py), and zero-init residuals (the
last BN scale of every block starts at 0), as the original's `zero_init_residual=True`.
The classifier `fc` is omitted: the module returns the globally average-pooled features.
"""
from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from clusiam_jax.models.batch_norm import BatchNorm
from clusiam_jax.models.conv import flax_conv_fn, max_pool

# kaiming_normal_(mode='fan_out', nonlinearity='relu'): an untruncated normal.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

def batch_norm(train: bool, dtype: Any, zero_init: bool = False, name: str = None):
    return BatchNorm(use_running_average=not train, dtype=dtype,
                     scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
                     name=name)


def conv(features: int, kernel: int, stride: int, padding: int, dtype: Any, impl: str,
         name: str):
    return nn.Conv(
            features, (kernel, kernel), strides=(stride, stride),
            padding=((padding, padding), (padding, padding)), use_bias=False,
            kernel_init=conv_kernel_init, dtype=dtype, param_dtype=jnp.float32,
            conv_general_dilated=flax_conv_fn(impl), name=name)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; torchvision's BasicBlock (expansion 1)."""
    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    conv_impl: str = 'auto'
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool):
        residual = x
        y = conv(self.features, 3, self.stride, 1, self.dtype, self.conv_impl, 'conv1')(x)
        y = nn.relu(batch_norm(train, self.dtype, name='bn1')(y))
        y = conv(self.features, 3, 1, 1, self.dtype, self.conv_impl, 'conv2')(y)
        y = batch_norm(train, self.dtype, zero_init=True, name='bn2')(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            residual = conv(self.features, 1, self.stride, 0, self.dtype, self.conv_impl,
                            'downsample_conv')(x)
            residual = batch_norm(train, self.dtype, name='downsample_bn')(residual)
        return nn.relu(y + residual)


class Bottleneck(nn.Module):
    """1x1 - 3x3 (strided, as torchvision v1.5) - 1x1 with 4x expansion."""
    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    conv_impl: str = 'auto'
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        residual = x
        out_features = self.features * self.expansion
        y = conv(self.features, 1, 1, 0, self.dtype, self.conv_impl, 'conv1')(x)
        y = nn.relu(batch_norm(train, self.dtype, name='bn1')(y))
        y = conv(self.features, 3, self.stride, 1, self.dtype, self.conv_impl, 'conv2')(y)
        y = nn.relu(batch_norm(train, self.dtype, name='bn2')(y))
        y = conv(out_features, 1, 1, 0, self.dtype, self.conv_impl, 'conv3')(y)
        y = batch_norm(train, self.dtype, zero_init=True, name='bn3')(y)
        if self.stride != 1 or x.shape[-1] != out_features:
            residual = conv(out_features, 1, self.stride, 0, self.dtype, self.conv_impl,
                            'downsample_conv')(x)
            residual = batch_norm(train, self.dtype, name='downsample_bn')(residual)
        return nn.relu(y + residual)


class ResNet(nn.Module):
    """ResNet trunk: input NHWC images, output [N, C] pooled features (fc removed)."""
    stage_sizes: Sequence[int]
    block: Any
    width: int = 64
    dtype: Any = jnp.float32
    conv_impl: str = 'auto'   # conv.py: 'auto' | 'xla' | 'im2col'

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.astype(self.dtype)
        x = conv(self.width, 7, 2, 3, self.dtype, self.conv_impl, 'conv1')(x)
        x = nn.relu(batch_norm(train, self.dtype, name='bn1')(x))
        x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), self.conv_impl)
        for stage, num_blocks in enumerate(self.stage_sizes):
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                x = self.block(self.width * 2**stage, stride, self.dtype, self.conv_impl,
                               name=f'layer{stage + 1}_{index}')(x, train)
        # Pool in float32: the features are what evaluation consumes.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
ResNet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)

# For tests and smoke runs only: the same code paths at a fraction of the compute.
ResNetTiny = partial(ResNet, stage_sizes=(1, 1, 1, 1), block=BasicBlock, width=8)

BACKBONES = {'resnet18': ResNet18, 'resnet50': ResNet50, 'resnet_tiny': ResNetTiny}
# Width of the pooled features, which the projector takes as input.
FEATURE_WIDTH = {'resnet18': 512, 'resnet50': 2048, 'resnet_tiny': 64}
