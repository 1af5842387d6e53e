"""train.on_nonfinite='skip': a step with a NaN/Inf loss or gradient leaves the state as
it was (counters advance), finite steps are untouched by the option, the loop logs and
lists the skipped steps and stops when too many come in a row."""
import logging
import os

import jax
import numpy as np
import pytest

from clusiam_jax.errors import NonFiniteError
from clusiam_jax.train.loop import train
from clusiam_jax.train.metrics import SkippedSteps
from clusiam_jax.train.trainer import build_trainer
from tests.helpers import SyntheticIterator, SyntheticLoader, mesh_of, tiny_config

SIZES = dict(steps_per_epoch=3, num_epochs=2, batch_size=8, image_size=32)


def as_float(batch):
    """The views as float32 in [0, 1] (what on-device augmentation hands the network)."""
    return {k: v.astype(np.float32) / 255.0 for k, v in batch.items()}


def poison(batch):
    """The float32 views with one NaN pixel: the step normalizes it to a NaN input, so
    its loss and gradient are NaN."""
    views = as_float(batch)
    views['view1'][0, 0, 0, 0] = np.nan
    return views


class PoisonedLoader(SyntheticLoader):
    """SyntheticLoader of float32 batches, those at `steps` poisoned (one input dtype
    throughout: the loop compiles its step for the first batch's)."""

    def __init__(self, steps, **sizes):
        super().__init__(**sizes)
        self.poisoned_steps = set(steps)

    def iterator(self):
        loader = self

        class Iterator(SyntheticIterator):
            def __next__(self):
                index = self.index
                batch = super().__next__()
                return poison(batch) if index in loader.poisoned_steps else as_float(batch)
        return Iterator(self)


def leaves(tree):
    return jax.tree.leaves(jax.device_get(tree))


@pytest.fixture(scope='module')
def one_step():
    """A tiny CluBYOL's first step from the same state: finite under both modes, and
    a poisoned batch under 'skip'."""
    steps = {}
    for mode in ('stop', 'skip'):
        c = tiny_config('clubyol')
        c.train.on_nonfinite = mode
        trainer = build_trainer(c, mesh_of(1), SIZES['steps_per_epoch'], SyntheticLoader.mean,
                                SyntheticLoader.std)
        steps[mode] = jax.jit(trainer.step_fn)  # not donating: state0 is reused
    batch = as_float(next(SyntheticLoader(**SIZES).iterator()))
    return trainer.init_state(), batch, steps


def test_skip_mode_leaves_finite_steps_as_they_were(one_step):
    state0, batch, steps = one_step
    stopped, stop_metrics = steps['stop'](state0, batch)
    skipped, skip_metrics = steps['skip'](state0, batch)
    assert float(skip_metrics.pop('skipped')) == 0.0
    for a, b in zip(leaves(stopped), leaves(skipped)):
        np.testing.assert_array_equal(a, b)
    assert jax.device_get(stop_metrics) == jax.device_get(skip_metrics)


def test_a_rejected_step_keeps_every_float_and_advances_every_counter(one_step):
    state0, batch, steps = one_step
    accepted, _ = steps['skip'](state0, batch)
    poisoned = dict(batch, view1=batch['view1'].copy())
    poisoned['view1'][0, 0, 0, 0] = np.nan
    rejected, metrics = steps['skip'](state0, poisoned)
    metrics = jax.device_get(metrics)
    assert np.isnan(metrics['loss']) and float(metrics['skipped']) == 1.0
    counters = 0
    for before, after, reference in zip(leaves(state0), leaves(rejected), leaves(accepted)):
        if np.issubdtype(after.dtype, np.floating):
            np.testing.assert_array_equal(after, before)  # params, momentum, BN, target
        else:
            np.testing.assert_array_equal(after, reference)  # as after a taken step
            counters += int(np.any(after != before))
    assert counters >= 2  # the step and the optimizer's schedule count moved


def test_the_loop_skips_a_poisoned_batch_and_goes_on(tmp_path, caplog):
    config = tiny_config('clubyol')
    config.train.on_nonfinite = 'skip'
    workdir = str(tmp_path / 'run')
    with caplog.at_level(logging.WARNING, logger='clusiam_jax'):
        state = train(config, workdir, PoisonedLoader([2], **SIZES), mesh_of(1))
    assert int(state.step) == 6
    assert all(np.all(np.isfinite(x)) for x in leaves(state.params))
    with open(os.path.join(workdir, SkippedSteps.FILE_NAME)) as f:
        assert [line.split()[0] for line in f] == ['2']
    assert any(r.message.startswith('step 2: loss=nan') for r in caplog.records)


def test_too_many_skips_in_a_row_stop_the_run(tmp_path):
    config = tiny_config('clubyol')
    config.train.on_nonfinite = 'skip'
    config.train.max_consecutive_skips = 2
    workdir = str(tmp_path / 'run')
    with pytest.raises(NonFiniteError, match='3 steps in a row up to step 3'):
        train(config, workdir, PoisonedLoader(range(1, 6), **SIZES), mesh_of(1))
    with open(os.path.join(workdir, SkippedSteps.FILE_NAME)) as f:
        assert [line.split()[0] for line in f] == ['1', '2', '3']
    # Two skips in a row were allowed: epoch 1 ended and was checkpointed.
    assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['3']
