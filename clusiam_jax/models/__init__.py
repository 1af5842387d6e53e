"""Flax models: torchvision-compatible ResNets and the CluSiam / CluBYOL networks."""
from clusiam_jax.models.networks import (METHOD_SPECS, METHODS, Encoder, MethodSpec,
                                         SSLNetwork, build_network, build_target_encoder)
from clusiam_jax.models.resnet import BACKBONES, FEATURE_WIDTH, ResNet18, ResNet50
