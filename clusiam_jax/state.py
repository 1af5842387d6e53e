"""What a run learns: the train state, and the `Weights` export and conversion read (no
optimizer). The BYOL-type target keeps its own BatchNorm statistics (docs/method.md §5)."""
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
    def online_variables(self):  # for `network.apply`
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
        return Weights(**{name: getattr(self, name) for name in Weights.__dataclass_fields__})


def init_weights(network, has_target: bool, seed: int, image_size: int) -> Weights:
    # 'rbg': one XLA op per draw, far faster to compile on CPU than an unrolled threefry.
    init_key = jax.random.key(seed, impl='rbg')
    dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    variables = network.init(init_key, dummy, train=True)
    return fresh_weights(variables['params'], variables['batch_stats'], has_target)


def fresh_weights(params, batch_stats, has_target: bool) -> Weights:
    """Weights at step 0; a target is an exact copy of the encoder (deepcopy in the original)."""
    def target(tree):
        return jax.tree.map(jnp.copy, tree['encoder']) if has_target else {}
    return Weights(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                   target_params=target(params), target_batch_stats=target(batch_stats))


def state_from_weights(weights: Weights, tx, seed: int) -> TrainState:
    return TrainState(**{name: getattr(weights, name) for name in Weights.__dataclass_fields__},
                      opt_state=tx.init(weights.params),
                      rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1))


def create_train_state(network, tx, has_target: bool, seed: int, image_size: int) -> TrainState:
    """Initial state. Call under jit with out_shardings to place it (train/trainer.py)."""
    return state_from_weights(init_weights(network, has_target, seed, image_size), tx, seed)
