"""The four methods' networks: `SSLNetwork`, applied once per view (per-view BatchNorm,
docs/method.md §3). Its `encoder` sub-tree is what the BYOL-type EMA target holds."""
import dataclasses
import logging
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from clusiam_jax.models import onednn
from clusiam_jax.models.heads import Head, Projector
from clusiam_jax.models.resnet import BACKBONES, FEATURE_WIDTH


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    has_target: bool         # BYOL-type: 1 - cos against an EMA target; else SimSiam's -cos
    has_cluster_head: bool


METHOD_SPECS = {'clusiam': MethodSpec(False, True), 'clubyol': MethodSpec(True, True),
                'simsiam': MethodSpec(False, False), 'byol': MethodSpec(True, False)}


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
    """One method's online network on one view: {'features', 'z', 'p', 'logits' (clusters)}."""
    method: str
    backbone: str = 'resnet18'
    feat_size: int = 2048
    pred_hidden: int = 512
    num_clusters: int = 100
    dtype: Any = jnp.float32
    conv_impl: str = 'auto'   # models/conv.py

    @nn.compact
    def __call__(self, x, train: bool = True):
        spec = METHOD_SPECS[self.method]
        features, z = Encoder(self.backbone, self.feat_size, self.dtype, self.conv_impl,
                              name='encoder')(x, train)
        p = Head(self.pred_hidden, self.feat_size, spec.has_target, self.dtype,
                 name='predictor')(z, train)
        out = {'features': features, 'z': z, 'p': p.astype(jnp.float32)}
        if spec.has_cluster_head:
            # CluSiam's is the predictor's hidden width, CluBYOL's D (docs/method.md §2).
            hidden = self.feat_size if spec.has_target else self.pred_hidden
            out['logits'] = Head(hidden, self.num_clusters, True, self.dtype, (
                'projector_linear', 'projector_bn', 'assigner'), name='cluster_head')(z, train)
        return out


def build_network(model_config) -> SSLNetwork:
    """SSLNetwork from a config's `model` section. A run trained with conv_impl=onednn
    read where oneDNN cannot run (another machine's export, a GPU) computes with `auto`'s
    kernels, said once: the same maths (training itself refuses at start, config.validate)."""
    m = model_config
    conv_impl = m.conv_impl
    if conv_impl == 'onednn':
        reason = onednn.unavailable_reason(m.dtype)
        if reason:
            logging.getLogger(__name__).warning(
                'the run was trained with model.conv_impl=onednn; using auto here: %s', reason)
            conv_impl = 'auto'
    return SSLNetwork(method=m.name, backbone=m.backbone, feat_size=m.feat_size,
                      pred_hidden=m.pred_hidden, num_clusters=m.num_clusters,
                      dtype=jnp.dtype(m.dtype), conv_impl=conv_impl)


def build_target_encoder(network: SSLNetwork) -> Encoder:
    """The EMA target: the online encoder's architecture, with its own params/BN stats."""
    return Encoder(network.backbone, network.feat_size, network.dtype, network.conv_impl)
