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
`<file>.json` beside it). Any other name is refused, and so is a place that cannot be
written (checked before the run is read; a write that fails is one ConversionError line).

The metadata says how to feed the weights as the export fed them (`training_field_of_view`,
PATCH_READ, RESIZE): the µm/px and patch size of the tiling the run trained on, how a
patch is read and how it is resized to `image_size`, and the normalization. README.md
(PyTorch interoperability) has these steps as code, which tests/test_torch_preprocessing.py
runs against an export.
"""
import io
import json
import os
from typing import Dict, Optional

import numpy as np

from clusiam_jax import run_dir
from clusiam_jax.errors import ConversionError, DataError
from clusiam_jax.fileio import atomic_write
from clusiam_jax.interop import layout

SAFETENSORS = ('.safetensors',)
TORCH_PICKLE = ('.pth', '.pt')

# How the export turns a slide region into the network's input (slides/reader.read_patch,
# then export/embed.py's _load_patch -> data/augment.resized_crop, then
# models/preprocess.normalize_input); written into the metadata.
PATCH_READ = ("slides: the level-0 square of patch_size_level0 px (the tiling's coords "
              'attribute, round(patch_size_px * target_mpp / level-0 µm/px)) read from the '
              'coarsest pyramid level not coarser than target_mpp (1% tolerance), transparent '
              'pixels over white, resized to patch_size_px with OpenCV INTER_AREA (INTER_LINEAR '
              'if enlarged)')
RESIZE = ('the whole patch (no crop) resized to image_size x image_size: PIL bilinear '
          '(antialiased) when it is larger, OpenCV INTER_LINEAR when it is not; then /255 and '
          '(x - mean) / std per channel')


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


def check_destination(path: str):
    """ConversionError (one line) unless `path` is a file this format can be written to:
    a .safetensors / .pth / .pt name, not a folder, in an existing folder."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in SAFETENSORS + TORCH_PICKLE:
        raise ConversionError(f'{path}: name the file .safetensors (no torch needed) or '
                              f'.pth / .pt (torch.save, needs torch)')
    if os.path.isdir(path):
        raise ConversionError(f'{path} is a folder: give the file to write, e.g. '
                              f'{os.path.join(path, "encoder.safetensors")}')
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        above = folder
        while not os.path.exists(above) and os.path.dirname(above) != above:
            above = os.path.dirname(above)
        why = (f'{above} is a file, not a folder' if os.path.isfile(above)
               else f'the folder {folder} does not exist (create it first)')
        raise ConversionError(f'{path}: cannot write it: {why}')
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConversionError(f'{path}: cannot write it: no permission to write in {folder}')


def _serialized(state_dict: Dict[str, np.ndarray], ext: str,
                metadata: Dict[str, str]) -> bytes:
    """The file's bytes: made in memory, so that only plain writes touch the disk."""
    if ext in SAFETENSORS:
        from safetensors.numpy import save
        # 'format': 'pt' tells Hugging Face-style loaders these are PyTorch tensors.
        return save(state_dict, metadata={'format': 'pt', **metadata})
    try:
        import torch
    except ImportError:
        raise ConversionError('writing a .pth / .pt file needs torch (pip install -r '
                              'requirements-torch.txt); a .safetensors file does not') from None
    buffer = io.BytesIO()
    torch.save({k: torch.from_numpy(np.array(v))  # a writable copy
                for k, v in state_dict.items()}, buffer)
    return buffer.getvalue()


def _write_bytes(path: str, data: bytes):
    """Atomically (temporary name, then rename); the mode a plain `open` gives."""
    with atomic_write(path) as tmp:
        with open(tmp, 'wb') as f:
            f.write(data)


def save_state_dict(state_dict: Dict[str, np.ndarray], path: str,
                    metadata: Optional[Dict[str, str]] = None):
    """Writes `path` in the format its extension names (module docstring), atomically;
    ConversionError (one line naming the path and why) when it cannot."""
    check_destination(path)
    ext = os.path.splitext(path)[1].lower()
    data = _serialized(state_dict, ext, metadata or {})
    try:
        if ext in TORCH_PICKLE:
            _write_bytes(path + '.json', json.dumps(metadata or {}, indent=2).encode())
        _write_bytes(path, data)
    except OSError as e:
        raise ConversionError(f'{path}: cannot write it ({e.strerror or e})') from None


def _unknown_field(why: str) -> Dict[str, str]:
    return {'target_mpp': 'null', 'patch_size_px': 'null', 'field_of_view_um': 'null',
            'resolution_source': why}


def _coords_resolution(coord_file: str):
    """(target_mpp or None, patch size in px or None, target_magnification or None) of a
    coordinate file's attributes (TRIDENT's schema, ours with target_mpp; CLAM's patch
    size is at its patch_level, no µm/px); None when the file does not read."""
    import h5py
    try:
        with h5py.File(coord_file, 'r') as f:
            attrs = dict(f['coords'].attrs)
    except (OSError, KeyError):
        return None

    def number(key):
        value = attrs.get(key)
        return None if value is None else float(np.asarray(value).ravel()[0])
    size = number('patch_size')
    if size is not None and 'patch_size_level0' not in attrs:   # CLAM
        size = size // max(1.0, number('custom_downsample') or 1.0)
    return (number('target_mpp'), None if size is None else int(size),
            number('target_magnification'))


def training_field_of_view(config) -> Dict[str, str]:
    """What the run's training data (config.data.path) says about the patches the encoder
    saw, as metadata strings: `target_mpp` (µm/px), `patch_size_px` (px at that
    resolution), `field_of_view_um` (their product), each JSON (`null` when unknown), and
    `resolution_source`: where they come from, or why they are unknown. Only a tiling
    (coordinate files) records a resolution; image files have none."""
    path = str(config.data.path or '')
    if not path:
        return _unknown_field('the run records no data.path (an imported checkpoint?): '
                              'the µm/px it trained at is unknown')
    if not os.path.exists(path):
        return _unknown_field(f'data.path {path} is not found here: the µm/px it trained at '
                              f'is unknown (convert where the tiling is to record it)')
    from clusiam_jax.data import slide_source
    if not slide_source.is_slide_source(path):
        return _unknown_field(f'trained on image files ({path}), which record no µm/px: '
                              f'feed patches at the resolution and size of those files')
    from clusiam_jax.slides import coords as coords_lib
    inner = os.path.join(path, coords_lib.PATCHES_DIR)
    folder = inner if os.path.isdir(inner) else path
    try:
        files = coords_lib.list_coord_files(folder).values()
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
    """Writes a run's encoder (online or EMA target) to `out`; returns the metadata.
    `step`: a step, 'latest' (None) or 'best'."""
    check_destination(out)   # before the run is read
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
                **training_field_of_view(config),
                'patch_read': PATCH_READ, 'resize': RESIZE,
                'source': run.workdir,
                'normalization': json.dumps(
                    normalization.to_json() if normalization is not None else
                    {'mean': None, 'std': None, 'origin': 'the run records none'})}
    save_state_dict(state_dict, out, metadata)
    return metadata


def _to_numpy(tree):
    import jax
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
