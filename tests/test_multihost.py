"""Two processes with 4 CPU devices each (jax.distributed, gloo) train to the same
parameters as one process with 8 devices: the global batch, BatchNorm and the cluster
loss span the processes."""
import os
import subprocess
import sys

import jax
import numpy as np
import portpicker

from clusiam_jax.train.loop import train
from tests.helpers import SyntheticLoader, subprocess_env, tiny_config

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'multihost_worker.py')


def test_two_processes_equal_one_process_with_eight_devices(tmp_path):
    port = portpicker.pick_unused_port()
    out = str(tmp_path / 'params.npz')
    workdir = str(tmp_path / 'multi')
    env = {k: v for k, v in subprocess_env().items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
    procs = [subprocess.Popen([sys.executable, WORKER, str(port), str(i), workdir, out],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]

    assert jax.device_count() == 8
    loader = SyntheticLoader(steps_per_epoch=3, num_epochs=1, batch_size=8, image_size=32)
    single = train(tiny_config('clubyol', num_epochs=1), str(tmp_path / 'single'), loader)
    expected = jax.tree.leaves(jax.device_get(single.params))
    got = np.load(out)
    assert len(got.files) == len(expected)
    for i, want in enumerate(expected):
        np.testing.assert_allclose(got[f'arr_{i}'], want, rtol=1e-4, atol=1e-5)
    # Only process 0 writes the run's files besides the checkpoints.
    assert os.path.exists(os.path.join(workdir, 'metrics.csv'))
    assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['3']
