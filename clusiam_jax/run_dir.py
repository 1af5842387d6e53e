"""A run's work directory: `config.json` plus orbax checkpoints under `checkpoints/`.

Training writes it, `launch.py --mode export` and `convert to-torch` read it, and
`convert from-torch` writes one from an original PyTorch checkpoint: one reader and one
writer serve them all, so every producer's directories load everywhere.
"""
import json
import logging
import os

import jax
import ml_collections

from clusiam_jax import parallel
from clusiam_jax.checkpoint import Checkpointer, checkpoint_dir
from clusiam_jax.config import ConfigError, default_config
from clusiam_jax.models import METHOD_SPECS, build_network
from clusiam_jax.train.optimizer import make_optimizer
from clusiam_jax.train.state import create_train_state

log = logging.getLogger('clusiam_jax')

CONFIG_NAME = 'config.json'


def _tuples(value):
    """JSON lists -> tuples (ConfigDict's tuple fields, e.g. data.mean, reject lists)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


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


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was written with, over today's defaults."""
    path = os.path.join(workdir, CONFIG_NAME)
    with open(path) as f:
        try:
            saved = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f'{path} is not valid JSON ({e}); restore it from the '
                              f'config the run was started with') from None
    config = default_config()
    _merge(config, saved)
    return config


def write_run_config(workdir: str, config):
    """Atomically (temporary file, then rename): a crash never leaves half a config."""
    path = os.path.join(workdir, CONFIG_NAME)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(config_text(config))
    os.replace(tmp, path)


def abstract_train_state(config):
    """(network, tx, ShapeDtypeStruct TrainState) exactly as training builds them; no compute.

    steps_per_epoch only shapes the lr schedule, never the optimizer state's structure.
    """
    network = build_network(config.model)
    tx, _ = make_optimizer(config, 1)
    spec = METHOD_SPECS[config.model.name]
    shapes = jax.eval_shape(lambda: create_train_state(
        network, tx, spec.has_target, config.train.seed, config.data.image_size))
    return network, tx, shapes


def load_run(workdir: str, step=None, mesh=None, config=None):
    """(config, network, state) of a run: its config.json and a checkpoint (latest default).

    The state is restored onto `mesh` (default: this process's devices), replicated.
    `config` is used only when the work directory has no config.json.
    """
    if os.path.exists(os.path.join(workdir, CONFIG_NAME)):
        config = read_run_config(workdir)
    elif config is None:
        raise FileNotFoundError(f'{workdir} has no {CONFIG_NAME} (not a run directory?)')
    else:
        log.warning('%s has no %s; using the given config for the model', workdir, CONFIG_NAME)
    if not os.path.isdir(checkpoint_dir(workdir)):
        raise FileNotFoundError(f'{workdir} has no checkpoints/ folder: train first, or '
                                f'point --workdir at a run')
    mesh = mesh if mesh is not None else parallel.make_mesh(jax.local_devices())
    network, _, shapes = abstract_train_state(config)
    replicated = parallel.replicated(mesh)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)
    _, state, _ = restore_checkpoint(workdir, abstract, step)
    return config, network, state


def restore_checkpoint(workdir: str, abstract_state, step=None):
    """(step, state, data_state) of a run's checkpoint (the latest by default)."""
    checkpointer = Checkpointer(workdir, create=False)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f'no checkpoint in {checkpoint_dir(workdir)}')
        state, data_state = checkpointer.restore(step, abstract_state)
    finally:
        checkpointer.close()
    return step, state, data_state


def write_run(workdir: str, config, state):
    """config.json + checkpoints/<step>/, as a training run leaves them."""
    os.makedirs(workdir, exist_ok=True)
    write_run_config(workdir, config)
    checkpointer = Checkpointer(workdir)
    try:
        checkpointer.save(int(state.step), state)
    finally:
        checkpointer.close()
