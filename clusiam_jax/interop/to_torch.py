"""`convert to-torch`: the backbone (torchvision keys, no fc), encoder or original network as
.safetensors or .pth/.pt (+ `<file>.json`), with metadata on how the export fed the network."""
import json
import os
from typing import Dict, Optional

import jax
import numpy as np

from clusiam_jax import run_dir
from clusiam_jax.data import slide_source
from clusiam_jax.errors import ConversionError, DataError
from clusiam_jax.fileio import atomic_write, write_json
from clusiam_jax.interop import layout
from clusiam_jax.slides import coords as coords_lib
from clusiam_jax.storage import is_url

SAFETENSORS = ('.safetensors',)
TORCH_PICKLE = ('.pth', '.pt')

# How the export turns a slide region into the network's input (slides/, export/embed.py).
PATCH_READ = ("slides: the level-0 square of patch_size_level0 px (the tiling's coords "
              'attribute, round(patch_size_px * target_mpp / level-0 µm/px)) read from the '
              'coarsest pyramid level not coarser than target_mpp (1% tolerance), transparent '
              'pixels over white, resized to patch_size_px with OpenCV INTER_AREA (INTER_LINEAR '
              'if enlarged)')
RESIZE = ('the whole patch (no crop) resized to image_size x image_size: PIL bilinear '
          '(antialiased) when it is larger, OpenCV INTER_LINEAR when it is not; then /255 and '
          '(x - mean) / std per channel')


def variables_to_state_dict(variables: Dict, module_fn, step: int = 0, prefix: str = '') -> dict:
    """{'params', 'batch_stats'} -> {torch name (`module_fn`): array in torch layout}."""
    out = {}
    for collection, path, leaf, array in layout.iter_leaves(variables):
        key = prefix + layout.torch_key(module_fn, collection, path, leaf)
        out[key] = layout.torch_layout(leaf, np.asarray(array, dtype=np.float32))
    for module in layout.bn_modules(variables, module_fn):
        # Each step applies every module once per view: two BatchNorm updates per step.
        out[f'{prefix}{module}.num_batches_tracked'] = np.asarray(2 * int(step), np.int64)
    return out


def backbone_state_dict(encoder_params, encoder_stats, step: int = 0) -> Dict[str, np.ndarray]:
    """torchvision ResNet keys (no fc) from an Encoder's params/batch_stats."""
    return variables_to_state_dict({'params': encoder_params['backbone'],
                                    'batch_stats': encoder_stats['backbone']},
                                   layout.backbone_module, step)


def encoder_state_dict(encoder_params, encoder_stats, step: int = 0, prefix: str = '') -> dict:
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


def check_destination(path: str):
    """ConversionError (one line) unless `path` is a writable .safetensors / .pth / .pt."""
    if is_url(path):  # os.path would look for a local './gs:' folder
        raise ConversionError(f'--out {path}: convert to-torch writes a local file only; '
                              f'upload it afterwards')
    if os.path.splitext(path)[1].lower() not in SAFETENSORS + TORCH_PICKLE:
        raise ConversionError(f'{path}: name the file .safetensors (no torch needed) or '
                              f'.pth / .pt (torch.save, needs torch)')
    if os.path.isdir(path):
        raise ConversionError(f'{path} is a folder: give the file to write, e.g. '
                              f'{os.path.join(path, "encoder.safetensors")}')
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        above = folder
        while not os.path.exists(above):
            above = os.path.dirname(above)
        why = (f'{above} is a file, not a folder' if os.path.isfile(above)
               else f'the folder {folder} does not exist (create it first)')
        raise ConversionError(f'{path}: cannot write it: {why}')
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConversionError(f'{path}: cannot write it: no permission to write in {folder}')


def save_state_dict(state_dict: Dict[str, np.ndarray], path: str,
                    metadata: Optional[Dict[str, str]] = None):
    """Writes `path` in the format its extension names, atomically; else ConversionError."""
    check_destination(path)
    metadata, torch = metadata or {}, None
    if not path.lower().endswith(SAFETENSORS):
        try:
            import torch
        except ImportError:
            raise ConversionError('writing a .pth / .pt file needs torch (pip install -r '
                                  'requirements-torch.txt); a .safetensors file does not') from None
    try:
        with atomic_write(path) as tmp, open(tmp, 'wb') as f:
            if torch is None:
                from safetensors.numpy import save
                # 'format': 'pt' tells Hugging Face-style loaders these are PyTorch tensors.
                f.write(save(state_dict, metadata={'format': 'pt', **metadata}))
            else:
                write_json(path + '.json', metadata)
                torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, f)
    except OSError as e:
        raise ConversionError(f'{path}: cannot write it ({e.strerror or e})') from None


def _unknown_field(why: str) -> Dict[str, str]:
    return {'target_mpp': 'null', 'patch_size_px': 'null', 'field_of_view_um': 'null',
            'resolution_source': why}


def _coords_resolution(coord_file: str):
    """(target_mpp, patch px, target_magnification), each or all None: unknown, unreadable."""
    try:
        found = coords_lib.read_coords(coord_file)
    except DataError:
        return None

    def number(key):
        value = found.attrs.get(key)
        return None if value is None else float(np.asarray(value).ravel()[0])
    return number('target_mpp'), found.patch_size, number('target_magnification')


def training_field_of_view(config) -> Dict[str, str]:
    """target_mpp, patch_size_px, field_of_view_um (JSON) and resolution_source of the data."""
    path = str(config.data.path or '')
    if not path:
        return _unknown_field('the run records no data.path (an imported checkpoint?): '
                              'the µm/px it trained at is unknown')
    if not os.path.exists(path):
        return _unknown_field(f'data.path {path} is not found here: the µm/px it trained at '
                              f'is unknown (convert where the tiling is to record it)')
    if not slide_source.is_slide_source(path):
        return _unknown_field(f'trained on image files ({path}), which record no µm/px: '
                              f'feed patches at the resolution and size of those files')
    inner = os.path.join(path, coords_lib.PATCHES_DIR)
    try:
        files = coords_lib.list_coord_files(inner if os.path.isdir(inner) else path).values()
    except (DataError, OSError) as e:   # the weights are still worth writing
        return _unknown_field(f'the coordinate files of {path} do not read ({e})')
    found = [r for r in map(_coords_resolution, files) if r is not None]
    kinds = sorted(set(found), key=str)
    where = f'the coordinate files of {os.path.abspath(path)}'
    if len(kinds) != 1:
        listed = ', '.join(f'{m} µm/px at {s} px' for m, s, _ in kinds[:4]) or 'none readable'
        return _unknown_field(f'{where} disagree or say nothing ({listed})')
    mpp, size, magnification = kinds[0]
    out = _unknown_field(f'{where} ({len(found)} slide{"" if len(found) == 1 else "s"})')
    out['patch_size_px'] = json.dumps(size)
    if mpp is None:
        said = f' (target_magnification {magnification:g}x)' if magnification else ''
        out['resolution_source'] += f': they record no target_mpp{said}'
        return out
    out['target_mpp'] = json.dumps(mpp)
    if size is not None:
        out['field_of_view_um'] = json.dumps(round(mpp * size, 6))
    return out


def write_torch_weights(workdir: str, out: str, with_projector: bool = False,
                        target: bool = False, step=None) -> Dict[str, str]:
    """Writes a run's encoder (online or EMA target) at `step` to `out`; returns the metadata."""
    check_destination(out)   # before the run is read
    run = run_dir.load_run(workdir, step)
    config, weights = run.config, run.weights
    if target and not weights.target_params:
        raise ConversionError(f'{config.model.name} has no EMA target encoder; drop --target')
    params, stats = jax.device_get((weights.target_params, weights.target_batch_stats) if target
                                   else (weights.params['encoder'], weights.batch_stats['encoder']))
    to_state_dict = encoder_state_dict if with_projector else backbone_state_dict
    normalization = (run.normalization.to_json() if run.normalization is not None else
                     {'mean': None, 'std': None, 'origin': 'the run records none'})
    metadata = {'arch': config.model.backbone, 'method': config.model.name,
                'contents': 'encoder (backbone + projector as fc)' if with_projector
                            else 'backbone (torchvision keys, fc removed)',
                'network': 'ema target' if target else 'online',
                'step': str(run.step), 'feat_size': str(config.model.feat_size),
                'image_size': str(config.data.image_size), **training_field_of_view(config),
                'patch_read': PATCH_READ, 'resize': RESIZE,
                'source': run.workdir, 'normalization': json.dumps(normalization)}
    save_state_dict(to_state_dict(params, stats, run.step), out, metadata)
    return metadata
