"""A training process for test_kill.py: tiny CluBYOL on synthetic data, one device.

Batches from the second epoch on are slowed down so the parent can SIGKILL the process
in the middle of that epoch, after the first epoch's checkpoint is on disk.
"""
import os
import sys
import time

from clusiam_jax.train.loop import train
from tests.helpers import SyntheticIterator, SyntheticLoader, mesh_of, tiny_config

SIZES = dict(steps_per_epoch=3, num_epochs=3, batch_size=8, image_size=32)


class SlowIterator(SyntheticIterator):
    def __next__(self):
        if self.index >= self.loader.steps_per_epoch:
            time.sleep(float(os.environ.get('BATCH_DELAY_S', '0')))
        return super().__next__()


class SlowLoader(SyntheticLoader):
    def iterator(self):
        return SlowIterator(self)


def config():
    c = tiny_config('clubyol', num_epochs=SIZES['num_epochs'])
    c.train.checkpoint_every_epochs = 1
    return c


def run(workdir):
    return train(config(), workdir, SlowLoader(**SIZES), mesh_of(1))


if __name__ == '__main__':
    run(sys.argv[1])
