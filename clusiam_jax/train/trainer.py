"""The one builder of what trains (the loop, benchmarks, tests), from a validated config."""
import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from clusiam_jax import parallel
from clusiam_jax.models import METHOD_SPECS, SSLNetwork, build_network
from clusiam_jax.models.conv import compiler_options
from clusiam_jax.state import TrainState, create_train_state
from clusiam_jax.train.optimizer import ema_momentum, make_optimizer
from clusiam_jax.train.step import make_train_step


@dataclasses.dataclass(frozen=True)
class Trainer:
    config: object
    mesh: Mesh
    network: SSLNetwork
    tx: optax.GradientTransformation
    mean: Sequence[float]
    std: Sequence[float]
    step_fn: Callable          # the pure step (state, batch) -> (state, metrics)

    @property
    def has_target(self) -> bool:
        return METHOD_SPECS[self.network.method].has_target

    def new_state(self) -> TrainState:
        """Unplaced: call under jit or eval_shape."""
        return create_train_state(self.network, self.tx, self.has_target,
                                  self.config.train.seed, self.config.data.image_size)

    def init_state(self) -> TrainState:
        return jax.jit(self.new_state, out_shardings=parallel.replicated(self.mesh))()

    def abstract_state(self) -> TrainState:
        replicated = parallel.replicated(self.mesh)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            jax.eval_shape(self.new_state))

    @functools.cached_property
    def step(self):
        """jit over the mesh: state replicated (and donated), batch split along `data`."""
        replicated = parallel.replicated(self.mesh)
        return jax.jit(self.step_fn, in_shardings=(replicated, parallel.batch_sharded(self.mesh)),
                       out_shardings=(replicated, replicated), donate_argnums=0,
                       compiler_options=compiler_options(self.network.conv_impl))

    def compile(self, state, batch):
        start = time.perf_counter()
        return self.step.lower(state, batch).compile(), time.perf_counter() - start


def build_trainer(config, mesh=None, steps_per_epoch: int = 1, mean=None, std=None) -> Trainer:
    """steps_per_epoch shapes schedules; mean/std (default data.mean/std) normalize in the step."""
    mesh = parallel.make_mesh() if mesh is None else mesh
    mean = config.data.mean if mean is None else mean
    std = config.data.std if std is None else std
    if mean is None or std is None:
        raise ValueError('build_trainer needs mean/std, or data.mean/std in the config')
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    network = build_network(config.model)
    tx, lr_schedule = make_optimizer(config, steps_per_epoch)
    ema_schedule = ema_momentum(config, steps_per_epoch * config.train.num_epochs)
    step_fn = make_train_step(network, tx, config, mean, std, lr_schedule, ema_schedule)
    return Trainer(config, mesh, network, tx, mean, std, step_fn)


def random_batch(trainer: Trainer, seed: int = 0, batch_size=None):
    """Two views of random uint8 pixels, placed like a real batch (for benchmarks)."""
    size = trainer.config.data.image_size
    shape = (batch_size or trainer.config.train.batch_size, size, size, 3)
    rng, sharding = np.random.default_rng(seed), parallel.batch_sharded(trainer.mesh)
    return {name: jax.device_put(rng.integers(0, 256, shape, dtype=np.uint8), sharding)
            for name in ('view1', 'view2')}
