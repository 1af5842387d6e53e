"""kill -9 in the middle of an epoch, after a checkpoint: the restarted run ends with the
parameters of an uninterrupted one, bit for bit (XLA on CPU is deterministic)."""
import os
import signal
import subprocess
import sys
import time

from clusiam_jax.run_dir import load_run
from tests import kill_worker
from tests.helpers import assert_trees_equal, subprocess_env

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'kill_worker.py')


def test_sigkill_mid_epoch_then_restart_equals_uninterrupted(tmp_path):
    workdir = str(tmp_path / 'killed')
    env = subprocess_env(BATCH_DELAY_S='1.0')
    proc = subprocess.Popen([sys.executable, WORKER, workdir], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first_checkpoint = os.path.join(workdir, 'checkpoints', '3')
    deadline = time.time() + 600
    while not os.path.isdir(first_checkpoint):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, 'no checkpoint after the first epoch'
        time.sleep(0.2)
    time.sleep(1.5)  # into the second epoch (1 s per batch), before its checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3']

    restarted = subprocess.run([sys.executable, WORKER, workdir], capture_output=True,
                               text=True, timeout=900, env=subprocess_env())
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    # The progress bars show it restarted at epoch 2, the one the kill interrupted.
    assert 'epoch 2/3' in restarted.stderr and 'epoch 1/3' not in restarted.stderr

    resumed = load_run(workdir).weights
    reference = kill_worker.run(str(tmp_path / 'straight'))
    assert_trees_equal(resumed, reference.weights())
