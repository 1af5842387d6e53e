"""Export: our weights as PyTorch state_dicts in safetensors, written without torch.

Three shapes of state_dict, all plain `{name: numpy array}`:
  backbone_state_dict   torchvision resnet18/resnet50 keys without `fc`: loads with
                        strict=True into `torchvision.models.resnet18()` once its `fc` is
                        `nn.Identity()` (what CLAM, TRIDENT, eva and timm-style loaders take).
  encoder_state_dict    the same plus the projector as the original's `encoder.fc`
                        Sequential (fc.0 ... fc.7), loading into the original's `encoder`.
  network_state_dict    the whole original-format model (encoder., predictor.,
                        cluster_projector., cluster_assigner., target_encoder.).

The original's frozen projector bias `fc.6.bias` is written as zeros: our running mean of
the following BatchNorm was accumulated without it, so zero is the value that keeps
inference outputs identical.

The file is what its name says: `.safetensors` (written with NumPy, no torch; metadata
in its header) or `.pth` / `.pt` (torch.save of the state_dict, needs torch; metadata in
`<file>.json` beside it). Any other name is refused.
"""
import json
import os
from typing import Dict, Optional

import numpy as np

from clusiam_jax import run_dir
from clusiam_jax.errors import ConversionError
from clusiam_jax.interop import layout

SAFETENSORS = ('.safetensors',)
TORCH_PICKLE = ('.pth', '.pt')


def _num_batches(step) -> np.ndarray:
    # Each step applies every module once per view: two BatchNorm updates per step.
    return np.asarray(2 * int(step), dtype=np.int64)


def variables_to_state_dict(variables: Dict, module_fn, step: int = 0,
                            prefix: str = '') -> Dict[str, np.ndarray]:
    """{'params', 'batch_stats'} -> torch names via `module_fn`, arrays in torch layout."""
    out = {}
    for collection, path, leaf, array in layout.iter_leaves(variables):
        key = prefix + layout.torch_key(module_fn, collection, path, leaf)
        out[key] = layout.to_torch_layout(leaf, np.asarray(array, dtype=np.float32))
    for module in layout.bn_modules(variables, module_fn):
        out[f'{prefix}{module}.num_batches_tracked'] = _num_batches(step)
    return out


def backbone_state_dict(encoder_params, encoder_stats, step: int = 0) -> Dict[str, np.ndarray]:
    """torchvision ResNet keys (no fc) from an Encoder's params/batch_stats."""
    return variables_to_state_dict({'params': encoder_params['backbone'],
                                    'batch_stats': encoder_stats['backbone']},
                                   layout.backbone_module, step)


def encoder_state_dict(encoder_params, encoder_stats, step: int = 0,
                       prefix: str = '') -> Dict[str, np.ndarray]:
    """Backbone + projector as the original's `encoder` (torchvision ResNet, fc = projector)."""
    out = variables_to_state_dict({'params': encoder_params, 'batch_stats': encoder_stats},
                                  layout.encoder_module, step, prefix)
    width = np.asarray(encoder_params['projector']['linear3']['kernel']).shape[1]
    out[prefix + layout.PROJECTOR_FROZEN_BIAS] = np.zeros((width,), np.float32)
    return out


def network_state_dict(params, batch_stats, target_params=None, target_stats=None,
                       step: int = 0) -> Dict[str, np.ndarray]:
    """The whole network in the original's state_dict layout."""
    out = encoder_state_dict(params['encoder'], batch_stats['encoder'], step, 'encoder.')
    heads = {'params': {k: v for k, v in params.items() if k != 'encoder'},
             'batch_stats': {k: v for k, v in batch_stats.items() if k != 'encoder'}}
    out.update(variables_to_state_dict(heads, layout.network_module, step))
    if target_params:
        out.update(encoder_state_dict(target_params, target_stats, step, 'target_encoder.'))
    return out


def _readable_by_all(path):
    """The mode a plain `open` gives (0666 less the umask): safetensors writes 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_state_dict(state_dict: Dict[str, np.ndarray], path: str,
                    metadata: Optional[Dict[str, str]] = None):
    """Writes `path` in the format its extension names (module docstring), atomically
    (temporary name, then rename)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in SAFETENSORS + TORCH_PICKLE:
        raise ConversionError(f'{path}: name the file .safetensors (no torch needed) or '
                              f'.pth / .pt (torch.save, needs torch)')
    if os.path.isdir(path):
        raise ConversionError(f'{path} is a folder: give the file to write, e.g. '
                              f'{os.path.join(path, "encoder.safetensors")}')
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if ext in SAFETENSORS:
            from safetensors.numpy import save_file
            # 'format': 'pt' tells Hugging Face-style loaders these are PyTorch tensors.
            save_file(state_dict, tmp, metadata={'format': 'pt', **(metadata or {})})
        else:
            try:
                import torch
            except ImportError:
                raise ConversionError(f'writing {path} needs torch (pip install -r '
                                      f'requirements-torch.txt); a .safetensors file does '
                                      f'not') from None
            torch.save({k: torch.from_numpy(np.array(v))  # a writable copy
                        for k, v in state_dict.items()}, tmp)
            run_dir.write_text_atomically(path + '.json', json.dumps(metadata or {}, indent=2))
        _readable_by_all(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise ConversionError(f'{path}: cannot write it ({e.strerror})') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_torch_weights(workdir: str, out: str, with_projector: bool = False,
                        target: bool = False, step=None) -> Dict[str, str]:
    """Writes a run's encoder (online or EMA target) to `out`; returns the metadata.
    `step`: a step, 'latest' (None) or 'best'."""
    run = run_dir.load_run(workdir, step)
    config, weights = run.config, run.weights
    if target:
        if not weights.target_params:
            raise ConversionError(f'{config.model.name} has no EMA target encoder; drop '
                                  f'--target')
        params, stats = weights.target_params, weights.target_batch_stats
    else:
        params, stats = weights.params['encoder'], weights.batch_stats['encoder']
    params, stats = _to_numpy(params), _to_numpy(stats)
    if with_projector:
        state_dict = encoder_state_dict(params, stats, run.step)
    else:
        state_dict = backbone_state_dict(params, stats, run.step)
    normalization = run.normalization
    metadata = {'arch': config.model.backbone, 'method': config.model.name,
                'contents': 'encoder (backbone + projector as fc)' if with_projector
                            else 'backbone (torchvision keys, fc removed)',
                'network': 'ema target' if target else 'online',
                'step': str(run.step), 'feat_size': str(config.model.feat_size),
                'image_size': str(config.data.image_size),
                'source': run.workdir,
                'normalization': json.dumps(
                    normalization.to_json() if normalization is not None else
                    {'mean': None, 'std': None, 'origin': 'the run records none'})}
    save_state_dict(state_dict, out, metadata)
    return metadata


def _to_numpy(tree):
    import jax
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
