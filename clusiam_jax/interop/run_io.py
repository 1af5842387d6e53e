"""A full TrainState around converted weights (the work directory I/O is run_dir.py)."""
import jax
import jax.numpy as jnp

from clusiam_jax.run_dir import abstract_train_state
from clusiam_jax.train.state import TrainState


def new_state(config, params, batch_stats, target_params=None, target_batch_stats=None,
              step: int = 0) -> TrainState:
    """A full TrainState around given weights: fresh optimizer state, the seed's rng."""
    _, tx, _ = abstract_train_state(config)
    params = jax.tree.map(jnp.asarray, params)
    # Same stream as create_train_state, so a run continued from here draws the same noise.
    rng = jax.random.fold_in(jax.random.PRNGKey(config.train.seed), 1)
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                      batch_stats=jax.tree.map(jnp.asarray, batch_stats),
                      opt_state=tx.init(params),
                      target_params=jax.tree.map(jnp.asarray, target_params or {}),
                      target_batch_stats=jax.tree.map(jnp.asarray, target_batch_stats or {}),
                      rng=rng)
