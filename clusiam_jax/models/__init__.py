"""Flax models: torchvision-compatible ResNets and the CluSiam / CluBYOL networks."""
from clusiam_jax.models.networks import (
    METHOD_SPECS,
    Encoder,
    MethodSpec,
    SSLNetwork,
    build_network,
    build_target_encoder,
)
from clusiam_jax.models.resnet import BACKBONES, FEATURE_WIDTH, ResNet18, ResNet50

__all__ = ['BACKBONES', 'FEATURE_WIDTH', 'METHOD_SPECS', 'Encoder', 'MethodSpec', 'ResNet18',
           'ResNet50', 'SSLNetwork', 'build_network', 'build_target_encoder']
