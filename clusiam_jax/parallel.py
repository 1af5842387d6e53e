"""Device mesh and shardings: the batch split along a `data` axis, the state replicated, so
BatchNorm statistics and the cluster loss see the global batch, as the single-GPU original."""
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
    """Joins a multi-process run (JAX finds the coordinator when not given); CPU needs gloo."""
    if os.environ.get('JAX_PLATFORMS', '').startswith('cpu'):
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
