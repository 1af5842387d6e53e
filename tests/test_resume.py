"""A run stopped by SIGTERM (a scheduler) or SIGINT (Ctrl-C) checkpoints at the current
step and, started again, ends exactly where an uninterrupted run ends (same batches, same
parameters)."""
import os
import signal

import jax
import pytest

from clusiam_jax import interrupts
from clusiam_jax.train.loop import train as train_on
from tests.helpers import PreemptedLoader, SyntheticLoader, assert_trees_equal, mesh_of, tiny_config

SIZES = dict(steps_per_epoch=3, num_epochs=2, batch_size=8, image_size=32)


def train(config, workdir, loader):
    # One device: sharding is tested in test_step.py, and it compiles faster.
    return train_on(config, workdir, loader, mesh_of(1))


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    config = tiny_config('clubyol', num_epochs=2)
    config.train.checkpoint_every_epochs = 0  # only the signal's and the final checkpoint
    state = train(config, str(tmp_path_factory.mktemp('straight')), SyntheticLoader(**SIZES))
    return config, jax.device_get(state)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_and_resume_matches_uninterrupted(uninterrupted, tmp_path,
                                                               signum):
    config, reference = uninterrupted
    workdir = str(tmp_path / 'stopped')
    stopped = train(config, workdir, PreemptedLoader(at=4, signum=signum, **SIZES))
    assert interrupts.received() == signum
    stopped_step = int(stopped.step)
    # The batch that carried the signal was drawn ahead by the prefetch; the loop stops
    # after the step in flight, in the middle of epoch 2.
    assert 1 <= stopped_step < 6
    assert os.listdir(os.path.join(workdir, 'checkpoints')) == [str(stopped_step)]
    # The handlers that were there before are back (pytest's own Ctrl-C handling).
    assert signal.getsignal(signal.SIGINT) is not interrupts._handle

    resumed = jax.device_get(train(config, workdir, SyntheticLoader(**SIZES)))
    assert int(resumed.step) == 6
    assert_trees_equal(resumed, reference)
