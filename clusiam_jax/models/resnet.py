"""A torchvision-compatible ResNet in Flax, layer for layer, so weights move between the two
(explicit paddings, no conv biases, `zero_init_residual`, no `fc`: average-pooled features)."""
from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from clusiam_jax.models.batch_norm import batch_norm
from clusiam_jax.models.conv import add_relu, flax_conv_fn, max_pool

# kaiming_normal_(mode='fan_out', nonlinearity='relu'): an untruncated normal.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv(features: int, kernel: int, stride: int, dtype: Any, impl: str, name: str):
    padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   use_bias=False, kernel_init=conv_kernel_init, dtype=dtype,
                   param_dtype=jnp.float32, conv_general_dilated=flax_conv_fn(impl), name=name)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock, or with `bottleneck` its Bottleneck (v1.5, 4x expansion)."""
    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    conv_impl: str = 'auto'
    bottleneck: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        out_features = self.features * (4 if self.bottleneck else 1)
        layers = ([(1, 1), (3, self.stride), (1, 1)] if self.bottleneck
                  else [(3, self.stride), (3, 1)])
        y = x
        for i, (kernel, stride) in enumerate(layers, 1):
            last = i == len(layers)
            y = conv(out_features if last else self.features, kernel, stride, self.dtype,
                     self.conv_impl, f'conv{i}')(y)
            y = batch_norm(train, self.dtype, f'bn{i}', zero_init=last, conv_impl=self.conv_impl,
                           relu=not last)(y)
        if self.stride != 1 or x.shape[-1] != out_features:
            x = conv(out_features, 1, self.stride, self.dtype, self.conv_impl, 'downsample_conv')(x)
            x = batch_norm(train, self.dtype, 'downsample_bn', conv_impl=self.conv_impl)(x)
        return add_relu(y, x, self.conv_impl)


Bottleneck = partial(BasicBlock, bottleneck=True)


class ResNet(nn.Module):
    """ResNet trunk: input NHWC images, output [N, C] pooled features (fc removed)."""
    stage_sizes: Sequence[int]
    block: Any
    width: int = 64
    dtype: Any = jnp.float32
    conv_impl: str = 'auto'   # conv.py: 'auto' | 'xla' | 'im2col'

    @nn.compact
    def __call__(self, x, train: bool):
        x = conv(self.width, 7, 2, self.dtype, self.conv_impl, 'conv1')(x.astype(self.dtype))
        x = batch_norm(train, self.dtype, 'bn1', conv_impl=self.conv_impl, relu=True)(x)
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
FEATURE_WIDTH = {'resnet18': 512, 'resnet50': 2048, 'resnet_tiny': 64}
