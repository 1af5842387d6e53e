"""Import: an original CluSiam / CluBYOL checkpoint -> our TrainState and work directory.

The original's `save_checkpoint` writes `{'epoch', 'state_dict', 'optimizer'}` with the
keys of `layout.py` (a `module.` prefix when it was wrapped in DataParallel). The import
is strict: every key of the checkpoint is consumed and every variable of our network is
filled, or ConversionError lists what is missing, unexpected or misshapen. No silent
partial loads (the original's own export script loaded nothing and did not notice).

Conventions:
- The frozen projector bias `encoder.fc.6.bias` is dropped (we have no such parameter)
  after folding it into the following BatchNorm's running mean: in inference mode
  BN(Wx + b) with running mean m equals BN(Wx) with running mean m - b, and in training
  mode the batch mean absorbs it. Inference outputs stay identical.
- Running statistics are copied as they are: our BatchNorm (models/batch_norm.py) keeps
  PyTorch's semantics, averaging the unbiased batch variance like running_var.
- `num_batches_tracked` is consumed and dropped (only torch's momentum=None uses it).
- The work directory's checkpoint is at step 0 with a fresh optimizer state (the SGD
  momentum buffers are not imported): training on it starts a new schedule from these
  weights. The original's epoch is recorded in `imported_from.json`, the normalization
  (when given) in `normalization.json`.
"""
import json
import os
import re
import shutil
import tempfile
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clusiam_jax import interrupts, run_dir
from clusiam_jax.config import method_config
from clusiam_jax.errors import CheckpointError, ConversionError
from clusiam_jax.interop import layout
from clusiam_jax.models import BACKBONES
from clusiam_jax.state import Weights, state_from_weights
from clusiam_jax.train.optimizer import make_optimizer

IMPORT_INFO = 'imported_from.json'


def _format_keys(keys, limit=40):
    keys = sorted(keys)
    shown = ', '.join(keys[:limit])
    return shown + (f' ... ({len(keys) - limit} more)' if len(keys) > limit else '')


def strip_prefix(state_dict: Dict, prefix: str = 'module.') -> Dict:
    """DataParallel / DistributedDataParallel wrap keys in `module.`."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def load_torch_checkpoint(path: str):
    """(state_dict of NumPy arrays without `module.`, epoch or None). Needs torch.

    weights_only=True: a checkpoint is data, and unpickling arbitrary objects from a file
    someone sent you runs their code.
    """
    try:
        import torch
    except ImportError:
        raise ConversionError('reading a PyTorch checkpoint needs torch: '
                              'pip install -r requirements-torch.txt') from None
    if not os.path.isfile(path):
        raise ConversionError(f'checkpoint not found: {path}')
    try:
        blob = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises many kinds for a foreign file
        reason = ' '.join(str(e).split())[:300]  # weights_only errors run over many lines
        raise ConversionError(f'{path} is not a PyTorch checkpoint torch.load can read '
                              f'({type(e).__name__}: {reason})') from None
    epoch = None
    if isinstance(blob, dict) and 'state_dict' in blob:
        epoch = blob.get('epoch')
        blob = blob['state_dict']
    if not isinstance(blob, dict) or not all(torch.is_tensor(v) for v in blob.values()):
        raise ConversionError(f'{path} holds neither a state_dict nor a '
                              f'{{"epoch", "state_dict", "optimizer"}} checkpoint')

    def to_numpy(t):
        t = t.detach().cpu()
        return (t.float() if t.is_floating_point() else t).numpy()

    return {k: to_numpy(v) for k, v in strip_prefix(blob).items()}, epoch


def load_safetensors(path: str) -> Dict:
    """A .safetensors state_dict as NumPy arrays without `module.`; no torch needed."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    if not os.path.isfile(path):
        raise ConversionError(f'checkpoint not found: {path}')
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        reason = ' '.join(str(e).split())[:300]
        raise ConversionError(f'{path} is not a safetensors file NumPy can read '
                              f'({type(e).__name__}: {reason})') from None
    return strip_prefix({k: np.asarray(v) for k, v in tensors.items()})


def load_state_dict_file(path: str):
    """(state_dict of NumPy arrays, epoch or None) from a `.safetensors` file (no torch)
    or anything torch.save wrote (.pth, .pt, .pth.tar, .bin; needs torch)."""
    if path.endswith('.safetensors'):
        return load_safetensors(path), None
    return load_torch_checkpoint(path)


# ---------------------------------------------------------------- the model's sizes

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
        if (tuple(kw['stage_sizes']), kw['block'].__name__, kw.get('width', 64)) == found:
            return name
    raise ConversionError(f'a ResNet with stages {found[0]}, {found[1]} blocks and width '
                          f'{found[2]} is none of our backbones ({", ".join(BACKBONES)})')


def infer_model(state_dict: Dict, model: Optional[str] = None) -> Dict:
    """name, backbone, feat_size, pred_hidden, num_clusters from the tensors' shapes."""
    detected = 'clubyol' if any(k.startswith('target_encoder.') for k in state_dict) else 'clusiam'
    if model is not None and model != detected:
        raise ConversionError(
            f'--model {model} but the checkpoint is a {detected} one (it '
            f'{"has" if detected == "clubyol" else "has no"} target_encoder.* keys)')
    needed = {'feat_size': ('encoder.fc.6.weight', 0), 'pred_hidden': ('predictor.0.weight', 0),
              'num_clusters': ('cluster_assigner.0.weight', 0)}
    missing = [key for key, _ in needed.values() if key not in state_dict]
    if missing:
        raise ConversionError(f'not a CluSiam/CluBYOL checkpoint: missing {_format_keys(missing)}')
    sizes = {name: int(state_dict[key].shape[axis]) for name, (key, axis) in needed.items()}
    return dict(name=detected, backbone=infer_backbone(state_dict), **sizes)


def config_for(model: Dict, seed: int = 0, mean: Optional[Sequence[float]] = None,
               std: Optional[Sequence[float]] = None):
    """The method's recipe with the checkpoint's sizes."""
    config = method_config(model['name'])
    for key in ('name', 'backbone', 'feat_size', 'pred_hidden', 'num_clusters'):
        config.model[key] = model[key]
    config.train.seed = seed
    if mean is not None:
        config.data.mean = tuple(float(v) for v in mean)
    if std is not None:
        config.data.std = tuple(float(v) for v in std)
    return config


# ------------------------------------------------------------- tensors -> variables

def _set(tree: Dict, path, value):
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def fill_variables(remaining: Dict, abstract: Dict, module_fn, prefix: str, problems: Dict):
    """Pops each variable's tensor from `remaining`; returns {'params', 'batch_stats'}.

    Missing keys and shape mismatches are collected in `problems`, not raised, so one
    error can list all of them.
    """
    out = {'params': {}, 'batch_stats': {}}
    for collection, path, leaf, shape_dtype in layout.iter_leaves(abstract):
        key = prefix + layout.torch_key(module_fn, collection, path, leaf)
        if key not in remaining:
            problems['missing'].append(key)
            continue
        value = layout.from_torch_layout(leaf, remaining.pop(key)).astype(np.float32)
        if value.shape != tuple(shape_dtype.shape):
            problems['shape'].append(f'{key}: checkpoint {tuple(value.shape)} (our layout) '
                                     f'vs model {tuple(shape_dtype.shape)}')
            continue
        _set(out[collection], path + (leaf,), value)
    for module in layout.bn_modules(abstract, module_fn):
        remaining.pop(f'{prefix}{module}.num_batches_tracked', None)
    return out


def fold_projector_bias(remaining: Dict, encoder_stats: Dict, prefix: str, problems: Dict):
    """Pops the frozen projector bias `<prefix>fc.6.bias` from `remaining` and folds it
    into the filled projector's bn3 running mean (module docstring); a missing one goes
    to `problems`."""
    key = prefix + layout.PROJECTOR_FROZEN_BIAS
    if key not in remaining:
        problems['missing'].append(key)
        return
    bias = remaining.pop(key).astype(np.float32)
    bn3 = encoder_stats.get('projector', {}).get('bn3')
    if bn3 is not None and bn3.get('mean') is not None and bn3['mean'].shape == bias.shape:
        bn3['mean'] = bn3['mean'] - bias


def state_dict_to_variables(state_dict: Dict, config):
    """(params, batch_stats, target_params, target_batch_stats) from an original-format
    state_dict; raises ConversionError listing every key that does not fit."""
    shapes = run_dir.abstract_weights(config)
    remaining = dict(state_dict)
    problems = {'missing': [], 'shape': []}
    online = fill_variables(remaining, {'params': shapes.params,
                                        'batch_stats': shapes.batch_stats},
                            layout.network_module, '', problems)
    fold_projector_bias(remaining, online['batch_stats'].get('encoder', {}), 'encoder.',
                        problems)
    target = {'params': {}, 'batch_stats': {}}
    if shapes.target_params:
        target = fill_variables(remaining, {'params': shapes.target_params,
                                            'batch_stats': shapes.target_batch_stats},
                                layout.encoder_module, 'target_encoder.', problems)
        fold_projector_bias(remaining, target['batch_stats'], 'target_encoder.', problems)
    if problems['missing'] or problems['shape'] or remaining:
        lines = [f'the checkpoint does not match a {config.model.name} '
                 f'{config.model.backbone} network:']
        if problems['missing']:
            lines.append(f'  missing keys ({len(problems["missing"])}): '
                         f'{_format_keys(problems["missing"])}')
        if remaining:
            lines.append(f'  unexpected keys ({len(remaining)}): {_format_keys(remaining)}')
        if problems['shape']:
            lines.append(f'  shape mismatches ({len(problems["shape"])}): '
                         + '; '.join(problems['shape'][:20]))
        raise ConversionError('\n'.join(lines))
    return online['params'], online['batch_stats'], target['params'], target['batch_stats']


def new_state(config, params, batch_stats, target_params=None, target_batch_stats=None,
              step: int = 0):
    """A full TrainState around given weights: a fresh optimizer state and the seed's
    rng (the stream a run started from scratch draws), so training can continue."""
    weights = Weights(step=jnp.asarray(step, jnp.int32),
                      params=jax.tree.map(jnp.asarray, params),
                      batch_stats=jax.tree.map(jnp.asarray, batch_stats),
                      target_params=jax.tree.map(jnp.asarray, target_params or {}),
                      target_batch_stats=jax.tree.map(jnp.asarray, target_batch_stats or {}))
    tx, _ = make_optimizer(config, 1)  # steps_per_epoch shapes the lr, not the state
    return state_from_weights(weights, tx, config.train.seed)


def import_state_dict(state_dict: Dict, model: Optional[str] = None, seed: int = 0,
                      mean=None, std=None):
    """(config, TrainState) from an original-format state_dict of NumPy arrays."""
    config = config_for(infer_model(state_dict, model), seed, mean, std)
    params, stats, target_params, target_stats = state_dict_to_variables(state_dict, config)
    return config, new_state(config, params, stats, target_params, target_stats)


def import_checkpoint(path: str, out: str, model: Optional[str] = None, seed: int = 0,
                      mean=None, std=None):
    """Writes `out` as a work directory holding the checkpoint; returns (config, state).

    The run is written into a hidden folder beside `out` and renamed onto it when
    complete: a command stopped halfway (a signal, a full disk) leaves no `out` that
    looks like a run and holds no weights."""
    if os.path.isfile(out):
        raise ConversionError(f'--out {out} is a file, not a folder')
    if os.path.isdir(out) and os.listdir(out):
        what = ('holds checkpoints' if os.path.isdir(os.path.join(out, 'checkpoints'))
                else 'is not empty')
        raise CheckpointError(f'{out} already {what}; choose another --out')
    state_dict, epoch = load_torch_checkpoint(path)
    config, state = import_state_dict(state_dict, model, seed, mean, std)
    normalization = (run_dir.Normalization(tuple(config.data.mean), tuple(config.data.std),
                                           'given to convert from-torch')
                     if mean is not None else None)
    info = {'source': os.path.abspath(path), 'epoch': epoch, 'model': config.model.name,
            'backbone': config.model.backbone, 'feat_size': config.model.feat_size,
            'pred_hidden': config.model.pred_hidden,
            'num_clusters': config.model.num_clusters, 'tensors': len(state_dict),
            'step': int(state.step)}
    out = os.path.abspath(out)
    interrupts.check()
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.importing-',
                                   dir=os.path.dirname(out))
    except OSError as e:
        raise ConversionError(f'--out {out}: cannot write there ({e.strerror})') from None
    try:
        run_dir.write_run(staging, config, state, normalization)
        with open(os.path.join(staging, IMPORT_INFO), 'w') as f:
            json.dump(info, f, indent=2)
        os.replace(staging, out)   # onto a missing or empty folder
    except OSError as e:
        raise ConversionError(f'--out {out}: cannot write there ({e.strerror})') from None
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return config, state
