"""Weights under our names from PyTorch files and our runs (strict for convert from-torch).
The frozen `fc.6.bias` folds into bn3's running mean: BN(Wx + b) with m is BN(Wx) with m - b."""
import dataclasses
import os
import re
from typing import Dict, Tuple

import jax
import numpy as np
from flax.traverse_util import unflatten_dict

from clusiam_jax import run_dir, storage
from clusiam_jax.checkpoint import leaf_name, one_line
from clusiam_jax.errors import CheckpointError, ConfigError, ConversionError
from clusiam_jax.interop import layout
from clusiam_jax.models import BACKBONES
from clusiam_jax.models.resnet import Bottleneck

TORCHVISION = 'torchvision/timm ResNet state_dict'
ORIGINAL = 'original CluSiam/CluBYOL checkpoint'


@dataclasses.dataclass(frozen=True)
class Source:
    """Weights to start from, as NumPy arrays under our variable names and layouts."""
    path: str
    kind: str                                 # what the file or directory is, for the log
    arrays: Dict[str, np.ndarray]
    unused: Tuple[str, ...] = ()              # the source's own names that map to nothing
    notes: Tuple[str, ...] = ()               # e.g. shape mismatches found while mapping


def variable_names(variables: Dict) -> Dict[str, object]:
    """{'params': ..., 'batch_stats': ...} -> {'params/encoder/.../kernel': leaf}."""
    return {leaf_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}


def listing(names, limit: int = 20) -> str:
    names = list(names)
    shown = ', '.join(names[:limit])
    return shown + (f' ... ({len(names) - limit} more)' if len(names) > limit else '')


def load_state_dict_file(path: str):
    """(NumPy state_dict, epoch or None) of a .safetensors or torch.save file (weights_only)."""
    if not os.path.isfile(path):
        raise ConversionError(f'checkpoint not found: {path}')
    epoch = None
    if path.endswith('.safetensors'):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        try:
            state_dict = load_file(path)
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise ConversionError(f'{path} is not a safetensors file NumPy can read '
                                  f'({one_line(e)})') from None
    else:
        try:
            import torch
        except ImportError:
            raise ConversionError('reading a PyTorch checkpoint needs torch: '
                                  'pip install -r requirements-torch.txt') from None
        try:
            blob = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:  # torch raises many kinds for a foreign file
            raise ConversionError(f'{path} is not a PyTorch checkpoint torch.load can read '
                                  f'({one_line(e)})') from None
        if isinstance(blob, dict) and 'state_dict' in blob:
            epoch, blob = blob.get('epoch'), blob['state_dict']
        if not isinstance(blob, dict) or not all(torch.is_tensor(v) for v in blob.values()):
            raise ConversionError(f'{path} holds neither a state_dict nor a '
                                  f'{{"epoch", "state_dict", "optimizer"}} checkpoint')
        state_dict = {k: (t.float() if t.is_floating_point() else t).detach().cpu().numpy()
                      for k, t in blob.items()}
    if state_dict and all(k.startswith('module.') for k in state_dict):  # (Distributed)DataParallel
        state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
    return state_dict, epoch


def infer_backbone(state_dict: Dict, prefix: str = 'encoder.') -> str:
    """Which of our BACKBONES has this checkpoint's stages, block type and width."""
    stages = {}
    pattern = re.compile(re.escape(prefix) + r'layer(\d+)\.(\d+)\.')
    for key in state_dict:
        match = pattern.match(key)
        if match:
            stage, index = int(match.group(1)), int(match.group(2))
            stages[stage] = max(stages.get(stage, 0), index + 1)
    stem = state_dict.get(prefix + 'conv1.weight')
    if not stages or stem is None:
        raise ConversionError(f'no ResNet under {prefix!r}: not a CluSiam/CluBYOL checkpoint')
    found = (tuple(stages[s] for s in sorted(stages)),
             'Bottleneck' if prefix + 'layer1.0.conv3.weight' in state_dict else 'BasicBlock',
             int(stem.shape[0]))
    for name, factory in BACKBONES.items():
        kw = factory.keywords
        block = 'Bottleneck' if kw['block'] is Bottleneck else 'BasicBlock'
        if (tuple(kw['stage_sizes']), block, kw.get('width', 64)) == found:
            return name
    raise ConversionError(f'a ResNet with stages {found[0]}, {found[1]} blocks and width '
                          f'{found[2]} is none of our backbones ({", ".join(BACKBONES)})')


def fill_variables(remaining: Dict, abstract: Dict, module_fn, prefix: str, problems: Dict,
                   encoder: Tuple[str, ...] = ()) -> Dict[Tuple[str, ...], np.ndarray]:
    """{(collection, *module path, leaf): array} popped from `remaining`; misfits to `problems`."""
    out = {}
    for collection, path, leaf, shape_dtype in layout.iter_leaves(abstract):
        key = prefix + layout.torch_key(module_fn, collection, path, leaf)
        if key not in remaining:
            problems['missing'].append(key)
            continue
        value = layout.torch_layout(leaf, remaining.pop(key), inverse=True).astype(np.float32)
        if value.shape != tuple(shape_dtype.shape):
            problems['shape'].append(f'{key}: checkpoint {tuple(value.shape)} (our layout) '
                                     f'vs model {tuple(shape_dtype.shape)}')
            continue
        out[(collection, *path, leaf)] = value
    for module in layout.bn_modules(abstract, module_fn):
        remaining.pop(f'{prefix}{module}.num_batches_tracked', None)
    mean = ('batch_stats', *encoder, 'projector', 'bn3', 'mean')
    bias_key = prefix + ''.join(f'{name}.' for name in encoder) + layout.PROJECTOR_FROZEN_BIAS
    if mean in out and bias_key not in remaining:
        problems['missing'].append(bias_key)
    elif mean in out:
        bias = remaining.pop(bias_key).astype(np.float32)
        if bias.shape == out[mean].shape:
            out[mean] = out[mean] - bias
    return out


def state_dict_to_variables(state_dict: Dict, config):
    """The four weight trees of an original state_dict; ConversionError lists what misfits."""
    shapes = run_dir.abstract_weights(config)
    remaining, problems = dict(state_dict), {'missing': [], 'shape': []}
    online = unflatten_dict(fill_variables(remaining, shapes.online_variables,
                                           layout.network_module, '', problems, ('encoder',)))
    target = unflatten_dict(fill_variables(remaining, {'params': shapes.target_params,
                                                       'batch_stats': shapes.target_batch_stats},
                                           layout.encoder_module, 'target_encoder.', problems))
    missing, shapes = problems['missing'], problems['shape']
    if missing or shapes or remaining:
        parts = [('missing keys', missing, listing(sorted(missing), 40)),
                 ('unexpected keys', remaining, listing(sorted(remaining), 40)),
                 ('shape mismatches', shapes, '; '.join(shapes[:20]))]
        raise ConversionError('\n'.join(
            [f'the checkpoint does not match a {config.model.name} {config.model.backbone} '
             f'network:'] + [f'  {what} ({len(got)}): {text}' for what, got, text in parts if got]))
    return (online['params'], online['batch_stats'], target.get('params', {}),
            target.get('batch_stats', {}))


def state_dict_source(state_dict, config, path: str) -> Source:
    """What of a torchvision/timm or original state_dict fits `config`'s network."""
    online = run_dir.abstract_weights(config).online_variables
    if any(key.startswith('encoder.') for key in state_dict):
        kind, module_fn, encoder = ORIGINAL, layout.network_module, ('encoder',)
    elif 'conv1.weight' in state_dict:
        kind, module_fn, encoder = TORCHVISION, layout.encoder_module, ()
        online = {collection: tree['encoder'] for collection, tree in online.items()}
    else:
        raise ConversionError(f'train.init_from={path} holds neither a torchvision/timm ResNet '
                              f'state_dict (conv1.weight, layer1.0.*) nor an original '
                              f'CluSiam/CluBYOL checkpoint (encoder.*); its keys start '
                              f'{", ".join(sorted(state_dict)[:3])}')
    try:
        found = infer_backbone(state_dict, ''.join(f'{name}.' for name in encoder))
    except ConversionError as e:
        raise ConversionError(f'train.init_from={path}: {e}') from None
    if found != config.model.backbone:
        raise ConversionError(f'train.init_from={path} holds a {found} backbone; this run '
                              f'trains a {config.model.backbone} (model.backbone)')
    remaining = dict(state_dict)
    problems = {'missing': [], 'shape': []}   # missing keys: the report's fresh arrays
    filled = fill_variables(remaining, online, module_fn, '', problems, encoder)
    where = () if encoder else ('encoder',)   # a torchvision file fills the encoder
    arrays = {'/'.join((key[0], *where, *key[1:])): value for key, value in filled.items()}
    unused = sorted(key for key in remaining if not key.endswith('.num_batches_tracked'))
    return Source(path=path if storage.is_url(path) else os.path.abspath(path), kind=kind,
                  arrays=arrays, unused=tuple(unused), notes=tuple(problems['shape']))


def read_weights(path: str, config) -> Source:
    """train.init_from's source: a weights file, or a run's (or checkpoint's) online weights."""
    if not storage.isdir(path):
        try:
            with storage.local_copy(path) as local:  # a URL: torch reads local files only
                state_dict, _ = load_state_dict_file(local)
        except ConversionError as e:
            raise ConversionError(f'train.init_from: {e}') from None
        if not state_dict:
            raise ConversionError(f'train.init_from={path} holds no tensors')
        return state_dict_source(state_dict, config, path)
    workdir, step = run_dir.checkpoint_location(path)
    try:
        run = run_dir.load_run(workdir, step)
    except (CheckpointError, ConfigError) as e:
        raise type(e)(f'train.init_from={path}: {" ".join(str(e).split())}') from None
    if run.config.model.backbone != config.model.backbone:
        raise ConfigError(f'train.init_from={path} is a run with a {run.config.model.backbone}'
                          f' backbone; this run trains a {config.model.backbone} '
                          f'(model.backbone)')
    arrays = jax.device_get(variable_names(run.weights.online_variables))
    kind = f'{run.config.model.name} run (checkpoint at step {run.step})'
    return Source(path=path if storage.is_url(path) else os.path.abspath(path), kind=kind,
                  arrays=arrays)
