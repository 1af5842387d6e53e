"""Where each of our variables lives in a PyTorch state_dict (docs/method.md §2), and its
layout: conv kernels HWIO here, OIHW in torch; dense kernels transposed. Pure NumPy."""
import re
from typing import Dict, Iterator, Tuple

import numpy as np
from flax.traverse_util import flatten_dict

# Our heads -> the original's modules (the projector is the torchvision encoder's `fc`).
HEAD_MODULES = {
    ('projector', 'linear1'): 'fc.0', ('projector', 'bn1'): 'fc.1',
    ('projector', 'linear2'): 'fc.3', ('projector', 'bn2'): 'fc.4',
    ('projector', 'linear3'): 'fc.6', ('projector', 'bn3'): 'fc.7',
    ('predictor', 'linear1'): 'predictor.0', ('predictor', 'bn1'): 'predictor.1',
    ('predictor', 'linear2'): 'predictor.3', ('cluster_head', 'assigner'): 'cluster_assigner.0',
    ('cluster_head', 'projector_linear'): 'cluster_projector.0',
    ('cluster_head', 'projector_bn'): 'cluster_projector.1'}
BLOCK_MODULES = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}

LEAF_NAMES = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
              ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
              ('batch_stats', 'var'): 'running_var'}

# The original's frozen projector bias, which we drop (read_weights.py folds it into bn3).
PROJECTOR_FROZEN_BIAS = 'fc.6.bias'

_LAYER = re.compile(r'^layer(\d+)_(\d+)$')


def backbone_module(path: Tuple[str, ...]) -> str:
    """('layer2_0', 'downsample_conv') -> 'layer2.0.downsample.0'; the stem keeps its name."""
    return '.'.join(_LAYER.sub(r'layer\1.\2', name) if _LAYER.match(name)
                    else BLOCK_MODULES.get(name, name) for name in path)


def encoder_module(path: Tuple[str, ...]) -> str:
    """Module path inside Encoder -> torch module name."""
    return backbone_module(path[1:]) if path[0] == 'backbone' else HEAD_MODULES[tuple(path)]


def network_module(path: Tuple[str, ...]) -> str:
    """Module path inside SSLNetwork -> the original's torch module name."""
    if path[0] == 'encoder':
        return 'encoder.' + encoder_module(path[1:])
    return HEAD_MODULES[tuple(path)]


def iter_leaves(variables: Dict) -> Iterator[Tuple[str, Tuple[str, ...], str, object]]:
    """(collection, module path, leaf name, array) for each leaf of {'params', 'batch_stats'}."""
    for collection in ('params', 'batch_stats'):
        for key, leaf in sorted(flatten_dict(variables.get(collection, {})).items()):
            yield collection, key[:-1], key[-1], leaf


def torch_key(module_fn, collection: str, path: Tuple[str, ...], leaf: str) -> str:
    return f'{module_fn(path)}.{LEAF_NAMES[(collection, leaf)]}'


def torch_layout(leaf: str, array: np.ndarray, inverse: bool = False) -> np.ndarray:
    """Our array -> torch's layout (contiguous, as safetensors needs); `inverse`: back."""
    array = np.asarray(array)
    if leaf == 'kernel':
        conv = (2, 3, 1, 0) if inverse else (3, 2, 0, 1)
        array = array.transpose(conv) if array.ndim == 4 else array.T
    return np.ascontiguousarray(array)


def bn_modules(variables: Dict, module_fn) -> list:
    """Torch names of the BatchNorm modules (those with running statistics)."""
    return sorted({module_fn(path) for collection, path, _, _ in iter_leaves(variables)
                   if collection == 'batch_stats'})
