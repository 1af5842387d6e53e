"""A synthetic stand-in for the data pipeline, with the loader interface the loop uses.

Batches are a pure function of (seed, batch index), so runs are reproducible and a
restored iterator state continues with exactly the batch an uninterrupted run would see.
"""
import numpy as np


class SyntheticIterator:
    def __init__(self, loader):
        self.loader, self.index = loader, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.index >= self.loader.steps_per_epoch * self.loader.num_epochs:
            raise StopIteration
        rng = np.random.default_rng([self.loader.seed, self.index])
        shape = (self.loader.batch_size, self.loader.image_size, self.loader.image_size, 3)
        self.index += 1
        local = self.loader.batch_size // self.loader.process_count
        share = slice(self.loader.process_index * local, (self.loader.process_index + 1) * local)
        return {'view1': rng.integers(0, 256, shape, dtype=np.uint8)[share],
                'view2': rng.integers(0, 256, shape, dtype=np.uint8)[share]}

    def get_state(self):
        return {'index': self.index}

    def set_state(self, state):
        self.index = int(state['index'])


class SyntheticLoader:
    mean = (0.6684, 0.5115, 0.6791)
    std = (0.2521, 0.2875, 0.2100)

    def __init__(self, steps_per_epoch, num_epochs, batch_size, image_size, seed=0,
                 process_index=0, process_count=1):
        self.steps_per_epoch, self.num_epochs = steps_per_epoch, num_epochs
        self.batch_size, self.image_size, self.seed = batch_size, image_size, seed
        self.num_records = steps_per_epoch * batch_size
        # Multi-host: each process yields its contiguous share of every global batch.
        self.process_index, self.process_count = process_index, process_count

    def iterator(self):
        return SyntheticIterator(self)
