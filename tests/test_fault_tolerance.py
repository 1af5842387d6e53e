"""Crashes and restarts: a damaged latest checkpoint is skipped, a NaN stops the run
without touching the last good checkpoint, and checkpoints move between device counts."""
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from clusiam_jax.errors import CheckpointError, ConfigError, NonFiniteError
from clusiam_jax.train.loop import train
from tests.helpers import PreemptedLoader, SyntheticLoader, assert_trees_close, mesh_of, tiny_config

SIZES = dict(steps_per_epoch=3, num_epochs=2, batch_size=8, image_size=32)


def file_snapshot(folder):
    return {os.path.join(root, name): os.path.getmtime(os.path.join(root, name))
            for root, _, names in os.walk(folder) for name in names}


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    """A 2-epoch CluBYOL run on one device with checkpoints at steps 3 and 6."""
    workdir = str(tmp_path_factory.mktemp('run') / 'run')
    state = train(tiny_config('clubyol'), workdir, SyntheticLoader(**SIZES), mesh_of(1))
    return workdir, jax.device_get(state)


def damage(workdir, step):
    """Truncates every file of the checkpoint's state."""
    for root, _, names in os.walk(os.path.join(workdir, 'checkpoints', str(step), 'state')):
        for name in names:
            open(os.path.join(root, name), 'w').close()


def test_damaged_latest_checkpoint_is_skipped(finished_run, tmp_path, caplog):
    source, final = finished_run
    workdir = str(tmp_path / 'run')
    shutil.copytree(source, workdir)
    damage(workdir, 6)
    with caplog.at_level(logging.WARNING, logger='clusiam_jax'):
        resumed = train(tiny_config('clubyol'), workdir, SyntheticLoader(**SIZES), mesh_of(1))
    assert any('checkpoint at step 6' in r.message and 'falling back' in r.message
               for r in caplog.records)
    # Retrained from step 3 on the same batches: the same parameters, bit for bit.
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed)), jax.tree.leaves(final)):
        np.testing.assert_array_equal(a, b)
    # The unreadable step was set aside, so step 6 was really saved again (orbax skips,
    # silently, a step it still lists): a restart finds the run complete, no fallback.
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6',
                                                                         'unreadable-6']
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='clusiam_jax'):
        train(tiny_config('clubyol'), workdir, SyntheticLoader(**SIZES), mesh_of(1))
    assert any('is complete (step 6 of 6)' in r.message for r in caplog.records)
    assert not any('falling back' in r.message for r in caplog.records)


def test_no_readable_checkpoint_is_one_checkpoint_error(finished_run, tmp_path):
    source, _ = finished_run
    workdir = str(tmp_path / 'run')
    shutil.copytree(source, workdir)
    damage(workdir, 3)
    damage(workdir, 6)
    with pytest.raises(CheckpointError, match='no checkpoint in .* can be restored') as err:
        train(tiny_config('clubyol'), workdir, SyntheticLoader(**SIZES), mesh_of(1))
    assert '\n' not in str(err.value)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(finished_run, tmp_path):
    source, _ = finished_run
    workdir = str(tmp_path / 'run')
    shutil.copytree(source, workdir)
    shutil.rmtree(os.path.join(workdir, 'checkpoints', '6'))
    before = file_snapshot(os.path.join(workdir, 'checkpoints'))
    poisoned = SyntheticLoader(**SIZES)
    poisoned.std = (0.0, 0.0, 0.0)  # normalization divides by zero: inf/NaN inputs
    with pytest.raises(NonFiniteError, match=r'non-finite \w+=nan at step 3'):
        train(tiny_config('clubyol'), workdir, poisoned, mesh_of(1))
    assert file_snapshot(os.path.join(workdir, 'checkpoints')) == before


def test_a_checkpoint_of_another_model_is_a_config_error(finished_run, tmp_path):
    source, _ = finished_run
    workdir = str(tmp_path / 'run')
    shutil.copytree(source, workdir)
    with open(os.path.join(workdir, 'config.json')) as f:
        recorded = f.read()
    before = file_snapshot(os.path.join(workdir, 'checkpoints'))
    config = tiny_config('clubyol')
    config.model.num_clusters += 2
    # Not "damaged, falling back": both checkpoints are intact, of another model.
    with pytest.raises(ConfigError, match=r'step 6 .* different model .*assigner'):
        train(config, workdir, SyntheticLoader(**SIZES), mesh_of(1))
    with open(os.path.join(workdir, 'config.json')) as f:
        assert f.read() == recorded  # the run's config is not replaced by the refused one
    assert file_snapshot(os.path.join(workdir, 'checkpoints')) == before
    config.train.resume_from = source  # the same check for another run's checkpoint
    with pytest.raises(ConfigError, match='different model'):
        train(config, str(tmp_path / 'fork'), SyntheticLoader(**SIZES), mesh_of(1))
    config = tiny_config('clubyol')
    config.optim.name = 'lars'  # same parameters, another optimizer state
    with pytest.raises(ConfigError, match=r'opt_state/.* optim.name'):
        train(config, workdir, SyntheticLoader(**SIZES), mesh_of(1))


@pytest.mark.parametrize('first, second', [(8, 1), (1, 8)])
def test_checkpoint_moves_between_device_counts(tmp_path, first, second):
    config = tiny_config('clubyol')
    config.train.checkpoint_every_epochs = 0
    reference = train(config, str(tmp_path / 'straight'), SyntheticLoader(**SIZES),
                      mesh_of(second))
    workdir = str(tmp_path / 'moved')
    stopped = train(config, workdir, PreemptedLoader(at=4, **SIZES), mesh_of(first))
    assert int(stopped.step) < 6
    resumed = train(config, workdir, SyntheticLoader(**SIZES), mesh_of(second))
    assert int(resumed.step) == 6
    assert resumed.params['encoder']['projector']['linear1']['kernel'].sharding.mesh.size == second
    assert_trees_close(resumed.params, reference.params, rtol=1e-4, atol=1e-5)
    assert_trees_close(resumed.batch_stats, reference.batch_stats, rtol=1e-4, atol=1e-5)


def test_resume_from_a_run_with_a_damaged_latest_checkpoint(finished_run, tmp_path):
    """train.resume_from=RUN takes RUN's latest readable checkpoint, as a resume does."""
    source, final = finished_run
    damaged = str(tmp_path / 'damaged')
    shutil.copytree(source, damaged)
    damage(damaged, 6)
    config = tiny_config('clubyol')
    config.train.resume_from = damaged
    state = train(config, str(tmp_path / 'fork'), SyntheticLoader(**SIZES), mesh_of(1))
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(final)):
        np.testing.assert_array_equal(a, b)
    config.train.resume_from = os.path.join(damaged, 'checkpoints', '6')
    with pytest.raises(CheckpointError, match='resume_from=.*step 6.*cannot be read'):
        train(config, str(tmp_path / 'fork2'), SyntheticLoader(**SIZES), mesh_of(1))


def test_resume_from_another_runs_checkpoint(finished_run, tmp_path):
    source, final = finished_run
    config = tiny_config('clubyol')
    config.train.resume_from = os.path.join(source, 'checkpoints', '3')
    state = train(config, str(tmp_path / 'fork'), SyntheticLoader(**SIZES), mesh_of(1))
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(final)):
        np.testing.assert_array_equal(a, b)
