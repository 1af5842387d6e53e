"""`convert from-torch`: an original checkpoint -> a weights-only run (+ imported_from.json)."""
import os
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clusiam_jax import fileio, interrupts, run_dir, storage
from clusiam_jax.config import method_config
from clusiam_jax.errors import CheckpointError, ConfigError, ConversionError
from clusiam_jax.interop import read_weights
from clusiam_jax.state import Weights

IMPORT_INFO = 'imported_from.json'


def import_state_dict(state_dict: Dict, model: Optional[str] = None, seed: int = 0,
                      mean: Optional[Sequence[float]] = None,
                      std: Optional[Sequence[float]] = None):
    """(the recipe with the checkpoint's sizes, Weights at step 0) of an original state_dict."""
    detected = 'clubyol' if any(k.startswith('target_encoder.') for k in state_dict) else 'clusiam'
    if model is not None and model != detected:
        has = 'has' if detected == 'clubyol' else 'has no'
        raise ConversionError(f'--model {model} but the checkpoint is a {detected} one (it '
                              f'{has} target_encoder.* keys)')
    sizes = {'feat_size': 'encoder.fc.6.weight', 'pred_hidden': 'predictor.0.weight',
             'num_clusters': 'cluster_assigner.0.weight'}
    missing = sorted(key for key in sizes.values() if key not in state_dict)
    if missing:
        raise ConversionError(f'not a CluSiam/CluBYOL checkpoint: missing {", ".join(missing)}')
    config = method_config(detected)
    config.model.backbone = read_weights.infer_backbone(state_dict)
    for name, key in sizes.items():
        config.model[name] = int(state_dict[key].shape[0])
    config.train.seed = seed
    if mean is not None:
        config.data.mean = tuple(float(v) for v in mean)
    if std is not None:
        config.data.std = tuple(float(v) for v in std)
    return config, weights_of(*read_weights.state_dict_to_variables(state_dict, config))


def weights_of(params, batch_stats, target_params=None, target_batch_stats=None,
               step: int = 0) -> Weights:
    return jax.tree.map(jnp.asarray, Weights(
        step=np.asarray(step, np.int32), params=params, batch_stats=batch_stats,
        target_params=target_params or {}, target_batch_stats=target_batch_stats or {}))


def import_checkpoint(path: str, out: str, model: Optional[str] = None, seed: int = 0,
                      mean=None, std=None):
    """Writes `out`, atomically, as a weights-only run of the checkpoint; (config, weights)."""
    if storage.is_url(out):  # os.path would write a local './gs:' folder
        raise ConfigError(f'--out {out}: convert from-torch writes a local folder only (a bucket '
                          f'run needs its checkpoint markers); convert locally, then train with '
                          f'train.init_from=<that folder>')
    if storage.is_url(path):
        raise ConfigError(f'{path}: convert from-torch reads a local checkpoint file only; '
                          f'download it first')
    if os.path.isfile(out):
        raise ConversionError(f'--out {out} is a file, not a folder')
    if os.path.isdir(out) and os.listdir(out):
        what = ('holds checkpoints' if os.path.isdir(os.path.join(out, 'checkpoints'))
                else 'is not empty')
        raise CheckpointError(f'{out} already {what}; choose another --out')
    state_dict, epoch = read_weights.load_state_dict_file(path)
    config, weights = import_state_dict(state_dict, model, seed, mean, std)
    normalization = (None if mean is None else run_dir.Normalization(
        tuple(config.data.mean), tuple(config.data.std), 'given to convert from-torch'))
    m = config.model
    info = {'source': os.path.abspath(path), 'epoch': epoch, 'model': m.name,
            'backbone': m.backbone, 'feat_size': m.feat_size, 'pred_hidden': m.pred_hidden,
            'num_clusters': m.num_clusters, 'tensors': len(state_dict), 'step': 0}
    out = os.path.abspath(out)
    interrupts.check()
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with fileio.atomic_write(out, folder=True) as staging:
            run_dir.write_run(staging, config, weights, normalization)
            fileio.write_json(os.path.join(staging, IMPORT_INFO), info)
    except OSError as e:
        raise ConversionError(f'--out {out}: cannot write there ({e.strerror})') from None
    return config, weights
