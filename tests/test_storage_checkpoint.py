"""Checkpoints in a bucket work directory (gs:// through orbax, s3:// staged and uploaded),
against the loopback servers, each compared bit for bit with the same saves on local disk."""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from clusiam_jax import checkpoint as checkpoint_module
from clusiam_jax.checkpoint import MARKER, Checkpointer
from clusiam_jax.errors import ConfigError, DataError


def state_at(step):
    """A small train-state-like tree whose every leaf depends on the step."""
    rng = np.random.default_rng(step)
    return {'params': {'dense': {'kernel': rng.standard_normal((16, 8), np.float32),
                                 'bias': rng.standard_normal(8).astype(np.float32)}},
            'batch_stats': {'mean': rng.standard_normal(8).astype(np.float32)},
            'step': np.asarray(step, np.int32),
            'rng': rng.integers(0, 2 ** 32, 2, dtype=np.uint32)}


ABSTRACT = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_at(0))


def save_steps(workdir, steps, keep=3):
    ckpt = Checkpointer(workdir, keep)
    try:
        for step in steps:
            ckpt.save(step, state_at(step), {'index': step * 10})
        ckpt.wait()
    finally:
        ckpt.close()


def steps_in(workdir):
    ckpt = Checkpointer(workdir, create=False)
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


def restored(workdir, step=None):
    ckpt = Checkpointer(workdir, create=False)
    try:
        if step is None:
            return ckpt.restore_latest_readable(ABSTRACT)
        return (step, *ckpt.restore(step, ABSTRACT))
    finally:
        ckpt.close()


def assert_same(a, b):
    assert a[0] == b[0] and a[2] == b[2]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a[1]), jax.device_get(b[1]))


def step_keys(objstore, url):
    """{step folder name: sorted object names in it} under `url`/checkpoints."""
    out = {}
    for key in objstore.keys(f'{url}/checkpoints'):
        folder, _, rest = key.partition('/')
        out.setdefault(folder, []).append(rest)
    return out


@pytest.fixture
def orbax_paths(monkeypatch, tmp_path):
    """Every directory orbax is handed (never an s3:// one), run from an empty cwd, where
    orbax 0.12.8 would leave a './s3:' folder if it were."""
    seen, original = [], ocp.CheckpointManager.__init__

    def spy(self, directory, *args, **kwargs):
        seen.append(str(directory))
        return original(self, directory, *args, **kwargs)
    monkeypatch.setattr(ocp.CheckpointManager, '__init__', spy)
    monkeypatch.chdir(tmp_path)
    yield seen
    assert not any(p.startswith('s3:') for p in seen)
    assert not os.path.exists(tmp_path / 's3:')


def test_bucket_checkpoints_equal_local_disk_and_keep_prunes_the_bucket(
        bucket, objstore, tmp_path, orbax_paths):
    url, local = f'{bucket}/run', str(tmp_path / 'run')
    for workdir in (url, local):
        save_steps(workdir, [1, 2, 3, 4], keep=2)
    assert steps_in(url) == [3, 4]
    assert_same(restored(url), restored(local))
    assert_same(restored(url, 3), restored(local, 3))
    assert restored(url)[0] == 4
    # keep_checkpoints=2 in the bucket too: steps 1 and 2 are gone, 3 and 4 are finished.
    folders = step_keys(objstore, url)
    assert sorted(folders) == ['3', '4']
    assert all(MARKER in names for names in folders.values())
    if bucket.startswith('s3://'):  # nothing staged is left behind
        staging = os.path.join(os.environ['XDG_CACHE_HOME'], 'clusiam_jax', 'staging')
        assert not os.path.isdir(staging) or not os.listdir(staging)


@pytest.fixture(scope='module')
def tiny_trainer():
    from clusiam_jax.train.trainer import build_trainer
    from tests.helpers import SyntheticLoader, mesh_of, tiny_config
    trainer = build_trainer(tiny_config('clubyol'), mesh_of(8), 3, SyntheticLoader.mean,
                            SyntheticLoader.std)
    return trainer, trainer.init_state()


def test_a_train_state_sharded_over_8_devices_equals_local_disk(bucket, tmp_path,
                                                                tiny_trainer):
    trainer, state = tiny_trainer
    out = {}
    for name, workdir in (('bucket', f'{bucket}/run'), ('local', str(tmp_path / 'run'))):
        ckpt = Checkpointer(workdir)
        try:
            ckpt.save(3, state, {'index': 3})
            ckpt.wait()
        finally:
            ckpt.close()
        ckpt = Checkpointer(workdir, create=False)
        try:
            out[name] = ckpt.restore_latest_readable(trainer.abstract_state())
        finally:
            ckpt.close()
    assert_same(out['bucket'], out['local'])
    for a, b in zip(jax.tree.leaves(out['bucket'][1]), jax.tree.leaves(out['local'][1])):
        assert a.sharding == b.sharding


def test_a_step_without_its_marker_is_never_trusted(bucket, objstore, tmp_path):
    """A half-uploaded (s3) or unfinished (gs) step: restore takes the one before, and the
    step is saved again cleanly."""
    url, local = f'{bucket}/run', str(tmp_path / 'run')
    save_steps(url, [1, 2])
    save_steps(local, [1])
    fs = objstore.fs(bucket.split('://')[0])
    fs.rm(f'{url}/checkpoints/2/{MARKER}')
    assert steps_in(url) == [1]
    assert_same(restored(url), restored(local))
    save_steps(url, [2])
    save_steps(local, [2])
    assert_same(restored(url), restored(local))


def test_a_damaged_step_falls_back_and_is_set_aside(bucket, objstore, tmp_path, caplog):
    url, local = f'{bucket}/run', str(tmp_path / 'run')
    save_steps(url, [1, 2])
    save_steps(local, [1])
    fs = objstore.fs(bucket.split('://')[0])
    damaged = [k for k in objstore.keys(f'{url}/checkpoints/2/state') if k != MARKER]
    for key in damaged:
        fs.pipe_file(f'{url}/checkpoints/2/state/{key}', b'')
    assert_same(restored(url), restored(local))  # falls back to step 1
    folders = step_keys(objstore, url)
    assert sorted(folders) == ['1', 'unreadable-2']
    assert MARKER not in folders['unreadable-2']  # never a finished step again
    assert {n.removeprefix('state/') for n in folders['unreadable-2']} >= set(damaged)
    save_steps(url, [2])  # the step number is free again
    save_steps(local, [2])
    assert_same(restored(url), restored(local))


def test_no_readable_step_is_one_checkpoint_error(bucket, objstore):
    url = f'{bucket}/run'
    save_steps(url, [1])
    fs = objstore.fs(bucket.split('://')[0])
    for key in objstore.keys(f'{url}/checkpoints/1/state'):
        if key != MARKER:
            fs.pipe_file(f'{url}/checkpoints/1/state/{key}', b'')
    with pytest.raises(checkpoint_module.CheckpointError, match='no checkpoint in .* can be'):
        restored(url)


def test_delete_removes_a_step_from_the_bucket(bucket, objstore, tmp_path):
    """What the monitor does before it keeps a replayed step's best again."""
    url, local = f'{bucket}/run', str(tmp_path / 'run')
    for workdir in (url, local):
        save_steps(workdir, [1, 2])
        ckpt = Checkpointer(workdir)
        try:
            ckpt.delete(2)
            assert ckpt.all_steps() == [1]
            ckpt.save(2, state_at(20), {'index': 200})
            ckpt.wait()
        finally:
            ckpt.close()
    assert sorted(step_keys(objstore, url)) == ['1', '2']
    assert_same(restored(url), restored(local))


def test_staging_a_killed_process_left_is_removed(objstore, tmp_path):
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          capture_output=True, text=True, check=True).stdout.strip()
    url = objstore.new_bucket('s3') + '/run'
    key = checkpoint_module.hashlib.sha256(f'{url}/checkpoints'.encode()).hexdigest()[:16]
    root = os.path.join(os.environ['XDG_CACHE_HOME'], 'clusiam_jax', 'staging')
    host = checkpoint_module.socket.gethostname()
    os.makedirs(os.path.join(root, f'{key}-{dead}-{host}-left', '3'))
    # ~/.cache shared over NFS: another host's folder, whatever its pid, is not ours to judge.
    elsewhere = f'{key}-{dead}-other-host-7-left'
    os.makedirs(os.path.join(root, elsewhere, '3'))
    mine = Checkpointer(url)
    try:
        assert sorted(n for n in os.listdir(root) if n.startswith(key)) == sorted([
            os.path.basename(mine._orbax_dir), elsewhere])
        assert os.path.basename(mine._orbax_dir).startswith(f'{key}-{os.getpid()}-{host}-')
    finally:
        mine.close()
    assert [n for n in os.listdir(root) if n.startswith(key)] == [elsewhere]
    import shutil
    shutil.rmtree(os.path.join(root, elsewhere))  # other tests expect no staging left


def test_an_s3_work_directory_takes_one_process(monkeypatch):
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    with pytest.raises(ConfigError, match='s3:// takes one process') as err:
        Checkpointer('s3://bucket/run')
    assert '\n' not in str(err.value)


def test_a_missing_bucket_is_one_line(bucket):
    with pytest.raises(DataError, match='does not exist') as err:
        Checkpointer(f'{bucket}-missing/run')
    assert '\n' not in str(err.value)


def test_an_outage_while_restoring_the_newest_step_fails_and_keeps_it(bucket, objstore,
                                                                      monkeypatch):
    """A bucket failing (an outage, a 403) is no damage: the command ends with storage's
    DataError, and the newest step keeps its marker (it was set aside before)."""
    from clusiam_jax import storage
    url = f'{bucket}/run'
    save_steps(url, [1, 2])

    def outage(path, *args, **kwargs):
        raise storage.Unreadable(f'cannot read {path}: 503 Service Unavailable')

    def orbax_fails(self, step, *args, **kwargs):  # gs://: orbax reads the bucket itself
        raise ValueError(f'tensorstore: reading step {step} failed')
    monkeypatch.setattr(storage, 'download', outage)        # s3://: staging the step
    monkeypatch.setattr(storage, 'read_bytes', outage)      # gs://: asking the bucket after
    if bucket.startswith('gs://'):
        monkeypatch.setattr(ocp.CheckpointManager, 'restore', orbax_fails)
    with pytest.raises(DataError, match='503') as err:
        restored(url)
    assert not isinstance(err.value, checkpoint_module.CheckpointError)
    monkeypatch.undo()
    folders = step_keys(objstore, url)
    assert sorted(folders) == ['1', '2'] and MARKER in folders['2']
    assert restored(url)[0] == 2
