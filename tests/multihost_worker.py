"""One process of the two-process test (test_multihost.py): 4 CPU devices each."""
import os
import sys

os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['XLA_FLAGS'] = ('--xla_force_host_platform_device_count=4 '
                           '--xla_backend_optimization_level=0')

import jax
import numpy as np

from clusiam_jax import parallel


def main(port, process_id, workdir, out):
    parallel.initialize_distributed(f'127.0.0.1:{port}', 2, process_id)
    from clusiam_jax.train.loop import train
    from tests.helpers import SyntheticLoader, tiny_config
    assert jax.process_count() == 2 and jax.device_count() == 8
    loader = SyntheticLoader(steps_per_epoch=3, num_epochs=1, batch_size=8, image_size=32,
                             process_index=jax.process_index(), process_count=2)
    state = train(tiny_config('clubyol', num_epochs=1), workdir, loader)
    if jax.process_index() == 0:
        leaves = jax.tree.leaves(jax.device_get(state.params))
        np.savez(out, *leaves)


if __name__ == '__main__':
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
