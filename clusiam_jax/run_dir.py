"""A run's work directory: config.json, normalization.json and checkpoints/<step>/. Reading
restores the weights only: no optimizer, nothing from `train/`."""
import contextlib
import dataclasses
import json
import logging
import os
from typing import Optional, Tuple

import jax
import ml_collections

from clusiam_jax import fileio, parallel, storage
from clusiam_jax.checkpoint import BEST_DIR, BEST_JSON, LATEST_DIR, Checkpointer
from clusiam_jax.config import check_rules, default_config
from clusiam_jax.errors import CheckpointError, ConfigError
from clusiam_jax.models import METHOD_SPECS, SSLNetwork, build_network
from clusiam_jax.state import Weights, init_weights

log = logging.getLogger('clusiam_jax')

CONFIG_NAME = 'config.json'
NORMALIZATION_NAME = 'normalization.json'


def _tuples(value):  # ConfigDict's tuple fields reject lists
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _merge(dst, src, prefix=''):
    for key, value in src.items():
        if key not in dst:
            log.warning('ignoring key %s%s of the run config (unknown to this version)',
                        prefix, key)
        elif isinstance(dst[key], ml_collections.ConfigDict) and isinstance(value, dict):
            _merge(dst[key], value, f'{prefix}{key}.')
        else:
            dst[key] = _tuples(value)


def config_text(config) -> str:
    return config.to_json_best_effort(indent=2, sort_keys=True)


def is_run_dir(path: str) -> bool:
    return storage.isfile(storage.join(path, CONFIG_NAME))


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = storage.join(workdir, CONFIG_NAME)  # read over today's defaults
    if not storage.isfile(path):  # a bucket has no folders: only the object tells
        if not storage.is_url(workdir) and not os.path.isdir(workdir):
            raise CheckpointError(f'run directory not found: {workdir}')
        raise CheckpointError(f'{workdir} has no {CONFIG_NAME}: not a run directory (train '
                              f'first, or point at a run)')
    try:
        saved = json.loads(storage.read_bytes(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f'{path} is not valid JSON ({e}); restore it from the '
                          f'config the run was started with') from None
    config = default_config()
    _merge(config, saved)
    try:
        check_rules(config.model, 'model')
    except ConfigError as e:
        raise ConfigError(f'{path}: {e}') from None
    return config


def write_run_config(workdir: str, config):
    fileio.write_text(storage.join(workdir, CONFIG_NAME), config_text(config))


@dataclasses.dataclass(frozen=True)
class Normalization:
    """The per-channel mean and std (of pixels in [0, 1]) a run trained with."""
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    origin: str

    def to_json(self) -> dict:
        return {'mean': list(self.mean), 'std': list(self.std), 'origin': self.origin}


def write_normalization(workdir: str, normalization: Normalization):
    fileio.write_json(storage.join(workdir, NORMALIZATION_NAME), normalization.to_json())


def read_normalization(workdir: str, fallback_config=None) -> Optional[Normalization]:
    """normalization.json, else `fallback_config`'s data.mean/std when set, else None."""
    path = storage.join(workdir, NORMALIZATION_NAME)
    if storage.isfile(path):
        try:
            saved = json.loads(storage.read_bytes(path))
            mean, std = (tuple(float(v) for v in saved[key]) for key in ('mean', 'std'))
            return Normalization(mean, std, str(saved.get('origin', '')))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f'{path} is damaged ({e}); delete it and give '
                                  f'--config.data.mean/std') from None
    data = fallback_config.data if fallback_config is not None else None
    if data is not None and data.mean is not None and data.std is not None:
        return Normalization(tuple(data.mean), tuple(data.std), "the run config's data.mean/std")
    return None


def abstract_weights(config) -> Weights:
    network = build_network(config.model)
    has_target = METHOD_SPECS[config.model.name].has_target
    return jax.eval_shape(lambda: init_weights(network, has_target, config.train.seed,
                                               config.data.image_size))


@dataclasses.dataclass(frozen=True)
class Run:
    """A run read back for inference: its config, network and the weights of one step."""
    workdir: str
    config: ml_collections.ConfigDict
    network: SSLNetwork
    weights: Weights
    normalization: Optional[Normalization]

    @property
    def step(self) -> int:
        return int(jax.device_get(self.weights.step))


def checkpoint_location(path: str) -> Tuple[str, Optional[int]]:
    path = path.rstrip('/') if storage.is_url(path) else os.path.abspath(path)
    parent, name = storage.split(path)  # a run directory or its checkpoints/<step>
    if storage.split(parent)[1] == 'checkpoints' and name.isdigit():
        return storage.split(parent)[0], int(name)
    return path, None


def read_best(workdir: str) -> Optional[dict]:
    path = storage.join(workdir, BEST_JSON)
    if not storage.isfile(path):
        return None
    return json.loads(storage.read_bytes(path))


def load_run(workdir: str, step=None) -> Run:
    """A run with the weights of checkpoint `step`: a number, 'latest'/None or 'best'."""
    config = read_run_config(workdir)
    replicated = parallel.replicated(parallel.make_mesh(jax.local_devices()))
    shapes = abstract_weights(config)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            {name: getattr(shapes, name) for name in Weights.__dataclass_fields__})
    subdir = BEST_DIR if step == 'best' else LATEST_DIR
    with contextlib.closing(Checkpointer(workdir, create=False, subdir=subdir)) as checkpointer:
        step = checkpointer.checked_step(None if step in ('latest', 'best') else step)
        restored = checkpointer.restore_weights(step, abstract)
    where = workdir if storage.is_url(workdir) else os.path.abspath(workdir)
    return Run(workdir=where, config=config, network=build_network(config.model),
               weights=Weights(**restored), normalization=read_normalization(workdir, config))


def write_run(workdir: str, config, state, normalization: Optional[Normalization] = None):
    storage.makedirs(workdir)
    write_run_config(workdir, config)
    if normalization is not None:
        write_normalization(workdir, normalization)
    with contextlib.closing(Checkpointer(workdir)) as checkpointer:
        checkpointer.save(int(state.step), state)

