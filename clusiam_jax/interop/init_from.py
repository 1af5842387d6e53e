"""train.init_from's reader: PyTorch and safetensors weights -> a `train.init_from.Source`.

What it reads (the file's keys decide, after a `module.` prefix is stripped):
  a torchvision / timm ResNet state_dict     `conv1.weight`, `layer1.0...`, `fc.*`: the
      (.pth/.pt via torch, .safetensors      backbone; `fc.0 ... fc.7` (our `convert
      without it)                            to-torch --with-projector`) the projector; a
                                             classifier `fc.weight/bias` is not used
  an original CluSiam/CluBYOL checkpoint     `encoder.*`, `predictor.*`, `cluster_*`
      ({'state_dict': ...}, .pth.tar)        (`target_encoder.*` is not used: the target
                                             starts as a copy of the online encoder)
  a work directory of ours                   train.init_from.read_run
Names map through interop/layout.py and from_torch.fill_variables, as `convert
from-torch` maps them; the original's frozen projector bias is folded into the
following BatchNorm's running mean the same way. The file's backbone (stages, block,
width) must be the run's model.backbone; anything else is one ConversionError line.
The training loop cannot import this layer: the command line passes `read_weights` to
`train()` (read_init).
"""
import os

from clusiam_jax import run_dir
from clusiam_jax.errors import ConversionError
from clusiam_jax.interop import from_torch, layout
from clusiam_jax.train.init_from import Source, read_run, variable_names

TORCHVISION = 'torchvision/timm ResNet state_dict'
ORIGINAL = 'original CluSiam/CluBYOL checkpoint'


def state_dict_source(state_dict, config, path: str) -> Source:
    """The arrays of a state_dict (NumPy, torch layout) under our names, for `config`."""
    shapes = run_dir.abstract_weights(config)
    if any(key.startswith('encoder.') for key in state_dict):
        kind, backbone_prefix, module_fn, sub = ORIGINAL, 'encoder.', layout.network_module, ''
        abstract = {'params': shapes.params, 'batch_stats': shapes.batch_stats}
    elif 'conv1.weight' in state_dict:
        kind, backbone_prefix, module_fn, sub = TORCHVISION, '', layout.encoder_module, 'encoder'
        abstract = {'params': shapes.params['encoder'],
                    'batch_stats': shapes.batch_stats['encoder']}
    else:
        raise ConversionError(f'train.init_from={path} holds neither a torchvision/timm ResNet '
                              f'state_dict (conv1.weight, layer1.0.*) nor an original '
                              f'CluSiam/CluBYOL checkpoint (encoder.*); its keys start '
                              f'{", ".join(sorted(state_dict)[:3])}')
    try:
        found = from_torch.infer_backbone(state_dict, backbone_prefix)
    except ConversionError as e:
        raise ConversionError(f'train.init_from={path}: {e}') from None
    if found != config.model.backbone:
        raise ConversionError(f'train.init_from={path} holds a {found} backbone; this run '
                              f'trains a {config.model.backbone} (model.backbone)')
    remaining = dict(state_dict)
    problems = {'missing': [], 'shape': []}   # missing keys: the report's fresh arrays
    variables = from_torch.fill_variables(remaining, abstract, module_fn, '', problems)
    encoder_stats = (variables['batch_stats'] if sub
                     else variables['batch_stats'].get('encoder', {}))
    if 'mean' in encoder_stats.get('projector', {}).get('bn3', {}):
        from_torch.fold_projector_bias(remaining, encoder_stats, backbone_prefix, problems)
    unused = sorted(key for key in remaining if not key.endswith('.num_batches_tracked'))
    if sub:
        variables = {collection: {sub: tree} for collection, tree in variables.items()}
    return Source(path=os.path.abspath(path), kind=kind, arrays=variable_names(variables),
                  unused=tuple(unused), notes=tuple(problems['shape']))


def read_weights(path: str, config) -> Source:
    """train.init_from's source: a run of ours (a directory), else a weights file."""
    if os.path.isdir(path):
        return read_run(path, config)
    try:
        state_dict, _ = from_torch.load_state_dict_file(path)
    except ConversionError as e:
        raise ConversionError(f'train.init_from: {e}') from None
    if not state_dict:
        raise ConversionError(f'train.init_from={path} holds no tensors')
    return state_dict_source(state_dict, config, path)
