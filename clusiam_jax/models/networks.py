"""The four methods' networks: encoder (backbone + projector), predictor, cluster head.

One Flax module, `SSLNetwork`, is applied once per view (per-view BatchNorm, docs/method.md §3).
Its `encoder` sub-tree is exactly what the BYOL-type target network holds, so the EMA
target is `Encoder` applied to a copy of `params['encoder']`.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from clusiam_jax.models.heads import ClusterHead, Predictor, Projector
from clusiam_jax.models.resnet import BACKBONES, FEATURE_WIDTH


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What distinguishes the methods, besides the config's sizes."""
    invariance: str          # 'simsiam' (-cos) or 'byol' (1 - cos against an EMA target)
    has_cluster_head: bool

    @property
    def has_target(self) -> bool:
        return self.invariance == 'byol'


METHOD_SPECS = {
    'clusiam': MethodSpec('simsiam', True),
    'clubyol': MethodSpec('byol', True),
    'simsiam': MethodSpec('simsiam', False),
    'byol': MethodSpec('byol', False),
}


class Encoder(nn.Module):
    """Backbone + projector. Returns (pooled backbone features, projection z)."""
    backbone: str
    feat_size: int
    dtype: Any = jnp.float32
    conv_impl: str = 'auto'

    @nn.compact
    def __call__(self, x, train: bool):
        features = BACKBONES[self.backbone](dtype=self.dtype, conv_impl=self.conv_impl,
                                            name='backbone')(x, train)
        width = FEATURE_WIDTH[self.backbone]
        z = Projector(width, self.feat_size, self.dtype, name='projector')(features, train)
        return features, z.astype(jnp.float32)


class SSLNetwork(nn.Module):
    """The online network of one method, applied to one view.

    Returns a dict: `features` (pooled backbone output, what evaluation uses), `z`
    (projection), `p` (prediction) and, with a cluster head, `logits` (cluster logits).
    """
    method: str
    backbone: str = 'resnet18'
    feat_size: int = 2048
    pred_hidden: int = 512
    num_clusters: int = 100
    dtype: Any = jnp.float32
    conv_impl: str = 'auto'   # how convolutions are computed (models/conv.py); same maths

    @nn.compact
    def __call__(self, x, train: bool = True):
        spec = METHOD_SPECS[self.method]
        features, z = Encoder(self.backbone, self.feat_size, self.dtype, self.conv_impl,
                              name='encoder')(x, train)
        # SimSiam's predictor has no first bias (it is followed by BN); BYOL's has one.
        p = Predictor(self.pred_hidden, self.feat_size, first_bias=spec.has_target,
                      dtype=self.dtype, name='predictor')(z, train)
        out = {'features': features, 'z': z, 'p': p.astype(jnp.float32)}
        if spec.has_cluster_head:
            # CluSiam's cluster projector is 512 wide (its predictor's hidden width);
            # CluBYOL's keeps the projection width D (docs/method.md §2).
            hidden = self.feat_size if spec.has_target else self.pred_hidden
            out['logits'] = ClusterHead(hidden, self.num_clusters, self.dtype,
                                        name='cluster_head')(z, train)
        return out


def build_network(model_config) -> SSLNetwork:
    """SSLNetwork from a config's `model` section (checked by config.validate)."""
    return SSLNetwork(
        method=model_config.name, backbone=model_config.backbone,
        feat_size=model_config.feat_size, pred_hidden=model_config.pred_hidden,
        num_clusters=model_config.num_clusters, dtype=jnp.dtype(model_config.dtype),
        conv_impl=model_config.conv_impl)


def build_target_encoder(network: SSLNetwork) -> Encoder:
    """The EMA target: the online encoder's architecture, with its own params/BN stats."""
    return Encoder(network.backbone, network.feat_size, network.dtype, network.conv_impl)
