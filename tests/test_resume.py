"""A run stopped by SIGTERM checkpoints at the current step and, started again, ends
exactly where an uninterrupted run ends (same batches, same parameters)."""
import os
import signal

import jax
import numpy as np

from clusiam_jax import parallel
from clusiam_jax.train.loop import train as train_all_devices
from fakes import SyntheticIterator, SyntheticLoader
from tiny import tiny_config


def train(config, workdir, loader):
    # One device: sharding is tested in test_step.py, and it compiles faster.
    return train_all_devices(config, workdir, loader, parallel.make_mesh(jax.devices()[:1]))


class PreemptedIterator(SyntheticIterator):
    """Sends this process SIGTERM when batch `at` is drawn, as a scheduler would."""

    def __init__(self, loader, at):
        super().__init__(loader)
        self.at = at

    def __next__(self):
        if self.index == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__next__()


class PreemptedLoader(SyntheticLoader):
    def __init__(self, at, **kwargs):
        super().__init__(**kwargs)
        self.at = at

    def iterator(self):
        return PreemptedIterator(self, self.at)


def test_sigterm_checkpoints_and_resume_matches_uninterrupted(tmp_path):
    config = tiny_config('clubyol', num_epochs=2)
    config.train.checkpoint_every_epochs = 0  # only the SIGTERM and the final checkpoint
    sizes = dict(steps_per_epoch=3, num_epochs=2, batch_size=8, image_size=32)

    reference = jax.device_get(train(config, str(tmp_path / 'straight'),
                                     loader=SyntheticLoader(**sizes)))

    workdir = str(tmp_path / 'preempted')
    stopped = train(config, workdir, loader=PreemptedLoader(at=4, **sizes))
    stopped_step = int(stopped.step)
    # The batch that carried the signal was drawn ahead by the prefetch; the loop stops
    # after the step in flight, in the middle of epoch 2.
    assert 1 <= stopped_step < 6
    assert os.listdir(os.path.join(workdir, 'checkpoints')) == [str(stopped_step)]

    resumed = jax.device_get(train(config, workdir, loader=SyntheticLoader(**sizes)))
    assert int(resumed.step) == 6
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)
