"""The train state: everything a step reads and writes, as one pytree.

The BYOL-type target (EMA copy of the encoder) keeps its own BatchNorm statistics, which
come from its own training-mode forward passes and are never averaged (SPEC s5).
For SimSiam-type methods the target fields are empty dicts.
"""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    target_params: Any
    target_batch_stats: Any
    rng: jax.Array      # raw uint32[2] key; each step folds in its step number


def create_train_state(network, tx, has_target: bool, seed: int, image_size: int) -> TrainState:
    """Initial state. Call under jit with out_shardings to place it (see loop.py)."""
    # Parameters are drawn with the 'rbg' generator: one XLA op per draw instead of an
    # unrolled threefry, which halves the init compile time on CPU. Its values are a
    # deterministic function of the seed on a given backend. The training stream (Gumbel
    # noise) stays threefry, whose values do not depend on how the batch is sharded.
    init_key = jax.random.key(seed, impl='rbg')
    train_key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    variables = network.init(init_key, dummy, train=True)
    params, batch_stats = variables['params'], variables['batch_stats']
    if has_target:
        # The target starts as an exact copy of the online encoder, as deepcopy in the original.
        target_params = jax.tree.map(jnp.copy, params['encoder'])
        target_batch_stats = jax.tree.map(jnp.copy, batch_stats['encoder'])
    else:
        target_params, target_batch_stats = {}, {}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), target_params=target_params,
                      target_batch_stats=target_batch_stats, rng=train_key)
