"""Reading and writing work directories (config.json + orbax checkpoints) for conversion.

A converted checkpoint becomes a work directory like a training run's, so everything
downstream (`launch.py --mode export`, evaluation, resuming training) takes it as is.
"""
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from clusiam_jax.checkpoint import Checkpointer
from clusiam_jax.config import default_config
from clusiam_jax.models import METHOD_SPECS, build_network
from clusiam_jax.train.optimizer import make_optimizer
from clusiam_jax.train.state import TrainState, create_train_state

CONFIG_NAME = 'config.json'


def _merge(dst, src):
    for key, value in src.items():
        if key not in dst:
            raise ValueError(f'unknown config key {key!r} in {CONFIG_NAME}')
        if isinstance(dst[key], ml_collections.ConfigDict):
            _merge(dst[key], value)
        else:
            # JSON has no tuples; ConfigDict's tuple fields (data.mean/std) reject lists.
            dst[key] = tuple(value) if isinstance(value, list) else value


def read_config(workdir: str) -> ml_collections.ConfigDict:
    with open(os.path.join(workdir, CONFIG_NAME)) as f:
        saved = json.load(f)
    config = default_config()
    _merge(config, saved)
    return config


def write_config(workdir: str, config):
    """As the training loop writes it, so a later `train` on the directory sees no change."""
    path = os.path.join(workdir, CONFIG_NAME)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)


def abstract_state(config):
    """(network, tx, ShapeDtypeStruct TrainState) exactly as training builds them.

    steps_per_epoch only shapes the lr schedule, never the optimizer state's structure.
    """
    network = build_network(config.model)
    tx, _ = make_optimizer(config, 1)
    spec = METHOD_SPECS[config.model.name]
    shapes = jax.eval_shape(lambda: create_train_state(
        network, tx, spec.has_target, config.train.seed, config.data.image_size))
    return network, tx, shapes


def new_state(config, params, batch_stats, target_params=None, target_batch_stats=None,
              step: int = 0) -> TrainState:
    """A full TrainState around given weights: fresh optimizer state, the seed's rng."""
    _, tx, _ = abstract_state(config)
    params = jax.tree.map(jnp.asarray, params)
    # Same stream as create_train_state, so a run continued from here draws the same noise.
    rng = jax.random.fold_in(jax.random.PRNGKey(config.train.seed), 1)
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                      batch_stats=jax.tree.map(jnp.asarray, batch_stats),
                      opt_state=tx.init(params),
                      target_params=jax.tree.map(jnp.asarray, target_params or {}),
                      target_batch_stats=jax.tree.map(jnp.asarray, target_batch_stats or {}),
                      rng=rng)


def write_run(workdir: str, config, state: TrainState):
    """config.json + checkpoints/<step>/ (orbax), as a training run leaves them."""
    os.makedirs(workdir, exist_ok=True)
    write_config(workdir, config)
    checkpointer = Checkpointer(workdir)
    try:
        checkpointer.save(int(state.step), state)
    finally:
        checkpointer.close()


def restore_run(workdir: str, step: Optional[int] = None):
    """(config, TrainState) of a work directory's checkpoint (the latest by default)."""
    config = read_config(workdir)
    _, _, shapes = abstract_state(config)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
    checkpointer = Checkpointer(workdir)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints')
        state, _ = checkpointer.restore(step, abstract)
    finally:
        checkpointer.close()
    return config, state
