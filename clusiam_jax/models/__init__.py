"""Flax models: torchvision-compatible ResNets and the CluSiam / CluBYOL networks."""
from clusiam_jax.models.networks import (
           METHOD_SPECS,
           SSLNetwork,
           build_network,
           build_target_encoder,
)
from clusiam_jax.models.resnet import BACKBONES, FEATURE_WIDTH

__all__ = ['BACKBONES', 'FEATURE_WIDTH', 'METHOD_SPECS', 'SSLNetwork', 'build_network',
           'build_target_encoder']
