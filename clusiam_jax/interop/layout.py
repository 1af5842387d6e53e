"""Where each of our variables lives in a PyTorch state_dict, and how its array is laid out
(pure NumPy: exporting needs no torch). The names are torchvision's ResNet and the
original's modules (docs/method.md §2): `encoder.<resnet keys>`, the projector
`encoder.fc.{0,1,3,4,6,7}`, `predictor.{0,1,3}`, `cluster_projector.{0,1}`,
`cluster_assigner.0` and CluBYOL's `target_encoder.<as encoder>`. Conv kernels are HWIO
here and OIHW in torch, dense kernels (in, out) here and (out, in) there.
"""
import re
from typing import Dict, Iterator, Tuple

import numpy as np

PROJECTOR_MODULES = {'linear1': 'fc.0', 'bn1': 'fc.1', 'linear2': 'fc.3', 'bn2': 'fc.4',
                     'linear3': 'fc.6', 'bn3': 'fc.7'}
PREDICTOR_MODULES = {'linear1': 'predictor.0', 'bn1': 'predictor.1', 'linear2': 'predictor.3'}
CLUSTER_HEAD_MODULES = {'projector_linear': 'cluster_projector.0',
                        'projector_bn': 'cluster_projector.1',
                        'assigner': 'cluster_assigner.0'}
BLOCK_MODULES = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}

# (collection, leaf name) -> torch tensor name
LEAF_NAMES = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
              ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
              ('batch_stats', 'var'): 'running_var'}

# The projector's last Linear has a bias in the original that is frozen at its random
# init; we drop the parameter (a BN follows). Its value lives on in the BN's running mean.
PROJECTOR_FROZEN_BIAS = 'fc.6.bias'

_LAYER = re.compile(r'^layer(\d+)_(\d+)$')


def backbone_module(path: Tuple[str, ...]) -> str:
    """('layer2_0', 'downsample_conv') -> 'layer2.0.downsample.0'; the stem keeps its name."""
    return '.'.join(_LAYER.sub(r'layer\1.\2', name) if _LAYER.match(name)
                    else BLOCK_MODULES.get(name, name) for name in path)


def encoder_module(path: Tuple[str, ...]) -> str:
    """Module path inside Encoder (backbone/..., projector/...) -> torch module name."""
    if path[0] == 'backbone':
        return backbone_module(path[1:])
    if path[0] == 'projector' and len(path) == 2:
        return PROJECTOR_MODULES[path[1]]
    raise KeyError(f'no torch name for encoder module {"/".join(path)}')


def network_module(path: Tuple[str, ...]) -> str:
    """Module path inside SSLNetwork -> the original's torch module name."""
    top, rest = path[0], path[1:]
    if top == 'encoder':
        return 'encoder.' + encoder_module(rest)
    if top == 'predictor' and len(rest) == 1:
        return PREDICTOR_MODULES[rest[0]]
    if top == 'cluster_head' and len(rest) == 1:
        return CLUSTER_HEAD_MODULES[rest[0]]
    raise KeyError(f'no torch name for module {"/".join(path)}')


def iter_leaves(variables: Dict) -> Iterator[Tuple[str, Tuple[str, ...], str, object]]:
    """(collection, module path, leaf name, array) for each leaf of {'params', 'batch_stats'}."""
    def walk(collection, tree, path):
        for name in sorted(tree):
            if hasattr(tree[name], 'items'):
                yield from walk(collection, tree[name], path + (name,))
            else:
                yield collection, path, name, tree[name]
    for collection in ('params', 'batch_stats'):
        yield from walk(collection, variables.get(collection, {}), ())


def torch_key(module_fn, collection: str, path: Tuple[str, ...], leaf: str) -> str:
    return f'{module_fn(path)}.{LEAF_NAMES[(collection, leaf)]}'


def to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    """Our array -> torch's layout (contiguous, as safetensors needs)."""
    array = np.asarray(array)
    if leaf == 'kernel':
        array = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
    return np.ascontiguousarray(array)


def from_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    """Torch's layout -> ours."""
    array = np.asarray(array)
    if leaf == 'kernel':
        array = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
    return np.ascontiguousarray(array)


def bn_modules(variables: Dict, module_fn) -> list:
    """Torch names of the BatchNorm modules (those with running statistics)."""
    return sorted({module_fn(path) for collection, path, _, _ in iter_leaves(variables)
                   if collection == 'batch_stats'})
