"""What a run learns, as pytrees: the full train state, and the weights inference needs.

The BYOL-type target (EMA copy of the encoder) keeps its own BatchNorm statistics, which
come from its own training-mode forward passes and are never averaged (docs/method.md
§5). For SimSiam-type methods the target fields are empty dicts.

`Weights` is the part of a checkpoint that export and conversion read (parameters and
BatchNorm statistics, online and target): restoring it needs no optimizer.
"""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


class Weights(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    target_params: Any
    target_batch_stats: Any

    @property
    def online_variables(self):
        """{'params', 'batch_stats'} of the online network, for `network.apply`."""
        return {'params': self.params, 'batch_stats': self.batch_stats}


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    target_params: Any
    target_batch_stats: Any
    rng: jax.Array      # raw uint32[2] key; each step folds in its step number

    def weights(self) -> Weights:
        return Weights(step=self.step, params=self.params, batch_stats=self.batch_stats,
                       target_params=self.target_params,
                       target_batch_stats=self.target_batch_stats)


def init_weights(network, has_target: bool, seed: int, image_size: int) -> Weights:
    """Freshly initialised weights at step 0 (the target an exact copy of the encoder)."""
    # Parameters are drawn with the 'rbg' generator: one XLA op per draw instead of an
    # unrolled threefry, which compiles much faster on CPU. Its values are a
    # deterministic function of the seed on a given backend.
    init_key = jax.random.key(seed, impl='rbg')
    dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    variables = network.init(init_key, dummy, train=True)
    params, batch_stats = variables['params'], variables['batch_stats']
    if has_target:
        # The target starts as an exact copy of the online encoder, as deepcopy in the original.
        target_params = jax.tree.map(jnp.copy, params['encoder'])
        target_batch_stats = jax.tree.map(jnp.copy, batch_stats['encoder'])
    else:
        target_params, target_batch_stats = {}, {}
    return Weights(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                   target_params=target_params, target_batch_stats=target_batch_stats)


def train_rng(seed: int) -> jax.Array:
    """The training stream (Gumbel noise, on-device augmentation): threefry, whose values
    do not depend on how the batch is sharded."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 1)


def state_from_weights(weights: Weights, tx, seed: int) -> TrainState:
    """A TrainState around given weights with a fresh optimizer state."""
    return TrainState(step=weights.step, params=weights.params,
                      batch_stats=weights.batch_stats, opt_state=tx.init(weights.params),
                      target_params=weights.target_params,
                      target_batch_stats=weights.target_batch_stats, rng=train_rng(seed))


def create_train_state(network, tx, has_target: bool, seed: int, image_size: int) -> TrainState:
    """Initial state. Call under jit with out_shardings to place it (train/trainer.py)."""
    return state_from_weights(init_weights(network, has_target, seed, image_size), tx, seed)
