"""One command per folder (workdir_lock.py), and one `error:` line for what fails around a
command rather than in its input: a full disk, a folder made read-only or deleted while
it runs, a CSV that is not UTF-8, a recipe whose get_config() returns nothing."""
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import types

import pytest

from clusiam_jax import cli, fileio, workdir_lock
from clusiam_jax.errors import ConfigError, DataError
from tests.helpers import REPO, SyntheticLoader, mesh_of, subprocess_env

DEMO_SLIDE = os.path.join(REPO, 'clusiam_jax', 'demo_data', 'cmu-1-small-region.svs')
RECIPE = """
from tests.helpers import tiny_config


def get_config():
    return tiny_config('clusiam', num_epochs=2)
"""
# A child process that holds the locks of the folders it is given until it is killed.
HOLDER = """
import sys, time
from clusiam_jax.workdir_lock import FolderLock
for folder in sys.argv[1:]:
    FolderLock(folder, 'test', ['--mode', 'train', '--workdir', folder]).acquire()
print('locked', flush=True)
time.sleep(600)
"""


def one_error(capsys, code, expected=2):
    """The single `error:` line of a command that failed with exit status `expected`."""
    err = capsys.readouterr().err
    assert code == expected, err
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'Traceback' not in err, err
    return errors[0]


def train_argv(tmp_path, workdir, *extra):
    recipe = tmp_path / 'recipe.py'
    if not recipe.exists():
        recipe.write_text(RECIPE)
    return ['--config', str(recipe), '--workdir', str(workdir),
            f'--config.data.path={tmp_path}', *extra]


def assert_free(folder):
    """Nobody holds `folder`: its lock file is gone and the lock can be taken."""
    assert not os.path.exists(workdir_lock.lock_path(folder))
    with workdir_lock.hold(str(folder), 'test') as lock:
        assert lock is not None


@pytest.fixture
def fake_training(monkeypatch):
    """`--mode train` without training: records that the loop was reached and checks
    that the work directory is locked by this process meanwhile."""
    from clusiam_jax.train import loop
    calls = []

    def train(config, workdir):
        with open(workdir_lock.lock_path(workdir)) as f:
            assert json.load(f)['pid'] == os.getpid()
        calls.append(workdir)
        return types.SimpleNamespace(step=0)   # the state train() returns, as far as read
    monkeypatch.setattr(loop, 'train', train)
    return calls


@pytest.fixture
def synthetic_training(monkeypatch):
    """`--mode train` training for real, on the synthetic loader (no data to read)."""
    from clusiam_jax.train import loop
    real = loop.train

    def train(config, workdir):
        loader = SyntheticLoader(1, config.train.num_epochs, config.train.batch_size,
                                 config.data.image_size)
        return real(config, workdir, loader, mesh_of(1))
    monkeypatch.setattr(loop, 'train', train)


def export_run(folder):
    """A folder export takes for a run (config.json) without a checkpoint."""
    os.makedirs(folder)
    (folder / 'config.json').write_text('{}')
    return folder


# -------------------------------------------------------------------- item 9: the lock

def test_a_held_folder_is_refused_naming_its_holder_and_a_killed_holder_is_taken_over(
        tmp_path, capsys, caplog, fake_training):
    run, tiles = tmp_path / 'run', tmp_path / 'tiles'
    export_run(run)
    folders = [str(run), str(run / 'export'), str(tiles)]
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    holder = subprocess.Popen([sys.executable, '-c', HOLDER, *folders], cwd=REPO,
                              env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        commands = [train_argv(tmp_path, run),
                    ['--mode', 'export', '--workdir', str(run)],
                    ['--mode', 'tile', f'--config.tile.slides={DEMO_SLIDE}',
                     f'--config.tile.out_dir={tiles}']]
        for argv in commands:
            message = one_error(capsys, cli.main(argv))
            assert 'is in use by another command' in message
            assert f'pid {holder.pid} on host {socket.gethostname()} since ' in message
            assert '(launch.py --mode train --workdir ' in message
        assert fake_training == []
        assert not (run / 'log.txt').exists()  # refused before the run's log
        assert not (tiles / 'slides.csv').exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up, the lock files stay behind
        holder.wait()
    with caplog.at_level(logging.INFO, logger='clusiam_jax'):
        for folder in folders:
            assert os.path.exists(workdir_lock.lock_path(folder))
            with workdir_lock.hold(folder, 'test'):
                pass
    taken = [r.message for r in caplog.records if 'ended without releasing' in r.message]
    assert len(taken) == 3 and all(f'pid {holder.pid} ' in m for m in taken)
    for folder in folders:
        assert_free(folder)


def test_the_lock_is_released_after_a_normal_end_and_after_an_error(tmp_path, capsys,
                                                                   fake_training,
                                                                   monkeypatch):
    from clusiam_jax.train import loop
    run = tmp_path / 'run'
    assert cli.main(train_argv(tmp_path, run)) == 0
    assert fake_training == [str(run)]  # which saw the lock held (fake_training)
    assert_free(run)

    def failing(config, workdir):
        raise DataError('no usable patch')
    monkeypatch.setattr(loop, 'train', failing)
    assert 'no usable patch' in one_error(capsys, cli.main(train_argv(tmp_path, run)))
    assert_free(run)

    tiles = tmp_path / 'tiles'
    assert cli.main(['--mode', 'tile', f'--config.tile.slides={DEMO_SLIDE}',
                     f'--config.tile.out_dir={tiles}']) == 0
    assert (tiles / 'slides.csv').exists()
    assert_free(tiles)
    empty = tmp_path / 'no_slides'
    empty.mkdir()
    assert 'no slide files' in one_error(capsys, cli.main(
        ['--mode', 'tile', f'--config.tile.slides={empty}', f'--config.tile.out_dir={tiles}']))
    assert_free(tiles)

    not_trained = export_run(tmp_path / 'not_trained')
    assert 'no checkpoints' in one_error(capsys, cli.main(
        ['--mode', 'export', '--workdir', str(not_trained)]))
    assert not (not_trained / 'export').exists()  # made for the export, left empty: gone
    out = tmp_path / 'out'
    out.mkdir()
    assert 'no checkpoints' in one_error(capsys, cli.main(
        ['--mode', 'export', '--workdir', str(not_trained), f'--config.export.out_dir={out}']))
    assert_free(out)  # the user's folder stays


def test_a_folder_held_by_this_process_can_be_held_again_inside(tmp_path):
    """export.out_dir set to the work directory training holds: not a refusal of
    itself."""
    with workdir_lock.hold(str(tmp_path), '--workdir'):
        with workdir_lock.hold(str(tmp_path), '--config.export.out_dir') as inner:
            assert inner is None
        assert os.path.exists(workdir_lock.lock_path(tmp_path))  # still held
        with pytest.raises(ConfigError, match=f'pid {os.getpid()} '):
            workdir_lock.FolderLock(str(tmp_path), '--workdir').acquire()
    assert_free(tmp_path)


def test_without_flock_an_exclusive_file_locks_and_a_dead_local_holder_is_taken_over(
        tmp_path, monkeypatch, caplog):
    """File systems that refuse flock (ENOLCK): the lock file's existence is the lock;
    a holder on this host whose pid is gone is stale, one on another host is not
    guessed at."""
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, 'flock', no_flock)
    folder, path = str(tmp_path), workdir_lock.lock_path(tmp_path)

    lock = workdir_lock.FolderLock(folder, '--workdir').acquire()
    with pytest.raises(ConfigError, match=f'pid {os.getpid()} on host '):
        workdir_lock.FolderLock(folder, '--workdir').acquire()
    lock.release()
    assert not os.path.exists(path)

    gone = subprocess.Popen([sys.executable, '-c', 'pass'])
    gone.wait()
    holder = {'host': socket.gethostname(), 'pid': gone.pid, 'started': '2024-01-01T10:02:00',
              'command': 'launch.py --mode train'}
    with open(path, 'w') as f:
        json.dump(holder, f)
    with caplog.at_level(logging.INFO, logger='clusiam_jax'):
        workdir_lock.FolderLock(folder, '--workdir').acquire().release()
    assert any(f'pid {gone.pid} ' in r.message and 'gone' in r.message
               for r in caplog.records)

    with open(path, 'w') as f:
        json.dump(dict(holder, host='another-host'), f)
    with pytest.raises(ConfigError, match=f'on host another-host since 2024-01-01 10:02:00 '
                                          f'.*delete {path}'):
        workdir_lock.FolderLock(folder, '--workdir').acquire()
    assert os.path.exists(path)  # another host's lock is never removed for it


# ------------------------------------------------------ item 13: one line, not a traceback

def test_a_recipe_whose_get_config_returns_none_is_one_line(tmp_path, capsys):
    recipe = tmp_path / 'recipe.py'
    recipe.write_text('def get_config():\n    config = None  # forgot to return it\n')
    message = one_error(capsys, cli.main(['--config', str(recipe), '--workdir',
                                          str(tmp_path / 'run')]))
    assert f'--config {recipe}: get_config() returned NoneType, not a ConfigDict' in message
    assert not (tmp_path / 'run').exists()


def test_a_splits_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    splits = tmp_path / 'splits.csv'
    splits.write_bytes('slide_id,split,label\nnévus_1,train,tumor\n'.encode('latin-1'))
    message = one_error(capsys, cli.main(['--mode', 'eval', 'knn', '--export',
                                          str(tmp_path), '--splits', str(splits)]))
    assert (f'splits file {splits} is not UTF-8 text (byte 0xe9 at position 22, line 2): '
            f'save it as UTF-8 CSV') in message
    # Excel's "CSV UTF-8" starts with a byte-order mark: read as the same columns.
    from clusiam_jax.eval.splits import read_splits
    splits.write_bytes('slide_id,split\nnévus_1,train\n'.encode('utf-8-sig'))
    assert read_splits(str(splits)) == {'névus_1': ('train', '')}


def test_a_slides_csv_that_is_not_utf8_is_one_line(tmp_path, capsys):
    slides = tmp_path / 'slides.csv'
    slides.write_bytes(f'path,slide_id\n{DEMO_SLIDE},névus\n'.encode('latin-1'))
    message = one_error(capsys, cli.main(['--mode', 'tile', f'--config.tile.slides={slides}',
                                          f'--config.tile.out_dir={tmp_path / "tiles"}']))
    assert f'{slides} is not UTF-8 text (byte 0xe9' in message


def test_a_manifest_that_is_not_utf8_is_one_line(tmp_path, capsys):
    manifest = tmp_path / 'patches.csv'
    manifest.write_bytes('path,slide_id\npatch_0_0.png,névus\n'.encode('latin-1'))
    message = one_error(capsys, cli.main(['--config', 'configs/demo.py', '--workdir',
                                          str(tmp_path / 'run'),
                                          f'--config.data.path={manifest}']))
    assert f'{manifest} is not UTF-8 text (byte 0xe9' in message


# TensorStore's report of a full disk under an orbax save, as it reaches the main thread.
TENSORSTORE_ENOSPC = (
    'RESOURCE_EXHAUSTED: Error writing "rng/0" in OCDBT database at local file "/runs/a/'
    'checkpoints/4.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": Failed '
    'writing: "/runs/a/checkpoints/4.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/'
    'ocdbt.process_0/d/bdf2fe61": Failed to write 45337 bytes to file 7: No space left on '
    "device [os_error_code='28']")


def test_environment_failures_are_found_in_what_libraries_raise():
    found = fileio.environment_failure
    assert found(ValueError(TENSORSTORE_ENOSPC)) == (
        'cannot write the checkpoint /runs/a/checkpoints/4: No space left on device '
        '(ENOSPC); free some space and start the same command again')
    # Wrapped by orbax's clean-up (raised while handling it) or re-raised from it.
    try:
        try:
            raise ValueError(TENSORSTORE_ENOSPC)
        except ValueError:
            raise RuntimeError('save finalize failed')  # noqa: B904
    except RuntimeError as e:
        assert found(e).startswith('cannot write the checkpoint /runs/a/checkpoints/4:')
    wrapped = RuntimeError('wrapped')
    wrapped.__cause__ = OSError(errno.EROFS, 'Read-only file system', '/runs/a/x.json.tmp12')
    assert found(wrapped) == ('cannot write /runs/a/x.json: Read-only file system (EROFS); '
                              'the file system is read-only (remounted after an error?)')
    # h5py names the file only in its text.
    h5 = OSError(errno.ENOSPC, "Unable to synchronously create file (unable to open file: "
                               "name = '/out/h5_files/s1.h5.tmp99', errno = 28)")
    assert found(h5).startswith('cannot write /out/h5_files/s1.h5: No space left on device')
    # The folder of a save in flight deleted: TensorStore gives only its status.
    gone = ValueError('NOT_FOUND: Error opening "zarr" driver: Error writing "params.a/.zarray"'
                      ' in OCDBT database at local file "/runs/a/checkpoints/1.orbax-checkpoint-'
                      'tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": Error reading Byte '
                      'range [0, 171) of local file "/runs/a/checkpoints/1.orbax-checkpoint-'
                      'tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/d/7b5e" [tensorstore_'
                      'spec=\'{"path":"/runs/a/"}\']')
    assert found(gone) == ('cannot access the checkpoint /runs/a/checkpoints/1: No such file or '
                           'directory (ENOENT); was the folder moved or deleted while the '
                           'command ran?')
    # Bugs keep their traceback: no errno of the environment anywhere, or a missing file
    # that the code was handling when the bug struck.
    assert found(ValueError('shapes (3,) and (4,) differ')) is None
    try:
        try:
            open('/no/such/cache.json')
        except FileNotFoundError:
            raise TypeError('a bug while computing the cache')  # noqa: B904
    except TypeError as e:
        assert found(e) is None
    assert found(OSError(errno.EINVAL, 'Invalid argument')) is None


def test_a_folder_deleted_mid_run_is_one_line(tmp_path, capsys, monkeypatch,
                                              synthetic_training):
    """The run's folder deleted between checkpoints (one in flight could make rmtree race
    orbax; that form of the failure is checked above on TensorStore's message)."""
    from clusiam_jax.train.metrics import MetricWriter
    run = tmp_path / 'run'
    real_row = MetricWriter.epoch_row

    def epoch_row(self, row):
        if row['epoch'] == 2:
            shutil.rmtree(run)
        return real_row(self, row)
    monkeypatch.setattr(MetricWriter, 'epoch_row', epoch_row)
    message = one_error(capsys, cli.main(train_argv(
        tmp_path, run, '--config.train.checkpoint_every_epochs=0')), expected=1)
    assert message == (f'error: cannot access {run}/metrics.csv: No such file or directory '
                       f'(ENOENT); was the folder moved or deleted while the command ran?')
    assert not run.exists()


def test_a_full_disk_during_export_is_one_line(tmp_path, capsys, monkeypatch):
    """The export's files fail to write: one line naming the file, the folder's lock
    released."""
    from clusiam_jax.export import run as export_run_lib
    run = export_run(tmp_path / 'run')
    out = tmp_path / 'out'
    out.mkdir()

    class Job:
        out_dir, slide_ids = str(out), ['s1']

        def run_export(self):
            raise OSError(errno.ENOSPC, "Unable to synchronously create file (unable to "
                                        f"open file: name = '{out}/h5_files/s1.h5.tmp7', "
                                        "errno = 28)")
    monkeypatch.setattr(export_run_lib, 'prepare_export', lambda *args: Job())
    message = one_error(capsys, cli.main(['--mode', 'export', '--workdir', str(run),
                                          f'--config.export.out_dir={out}']), expected=1)
    assert message.startswith(f'error: cannot write {out}/h5_files/s1.h5: No space left on '
                              f'device (ENOSPC)')
    assert_free(out)


def test_a_resumed_run_replaces_the_rows_of_the_epochs_it_replays(tmp_path):
    """Epochs 2 and 3 were logged, then the disk filled before epoch 2's checkpoint: the
    resumed run trains them again and metrics.csv keeps one row per epoch, the new ones."""
    import csv

    from clusiam_jax.train.metrics import MetricWriter
    writer = MetricWriter(str(tmp_path))
    for epoch in (1, 2, 3):
        writer.epoch_row({'epoch': epoch, 'step': epoch, 'loss': 1.0})
    writer.close()
    resumed = MetricWriter(str(tmp_path))
    resumed.epoch_row({'epoch': 2, 'step': 2, 'loss': 0.5})
    resumed.epoch_row({'epoch': 3, 'step': 3, 'loss': 0.25})
    resumed.close()
    with open(tmp_path / 'metrics.csv') as f:
        rows = [(r['epoch'], r['loss']) for r in csv.DictReader(f)]
    assert rows == [('1', '1.0'), ('2', '0.5'), ('3', '0.25')]


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs of its own when this process may mount one (root with
    CAP_SYS_ADMIN), else None."""
    mount = tmp_path / 'disk'
    mount.mkdir()
    try:
        done = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64m', 'tmpfs', str(mount)],
                              capture_output=True)
    except OSError:  # no mount command
        done = None
    if done is None or done.returncode:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(['umount', '-l', str(mount)], check=True)


def test_a_full_disk_mid_run_is_one_line_and_keeps_the_last_checkpoint(
        tmp_path, capsys, monkeypatch, synthetic_training, small_disk):
    """The disk fills up at the end of epoch 3. On a tmpfs of its own (where the test
    may mount one) for real: epoch 1's checkpoint is surely on disk then (orbax starts a
    save only after the one before finished; epoch 2's may be in flight), epoch 3's save
    fails in TensorStore, orbax's threads log it and the main thread gets TensorStore's
    ValueError. Elsewhere, writing the metrics.csv row raises ENOSPC. Either way: one
    line (no traceback, not even in orbax's log records), exit 1, the last checkpoint
    written before intact, the reason in log.txt, the lock released."""
    from clusiam_jax import run_dir
    from clusiam_jax.train.metrics import MetricWriter
    run = (small_disk or tmp_path) / 'run'
    real_row = MetricWriter.epoch_row

    def epoch_row(self, row):
        if row['epoch'] == 3 and small_disk is None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.csv_path)
        real_row(self, row)
        if row['epoch'] == 3:
            with open(small_disk / 'filler', 'wb') as f, pytest.raises(OSError):
                while True:
                    f.write(b'\0' * (1 << 16))
                    f.flush()
            # Room for log lines, none for a checkpoint (about 1 MB here).
            os.truncate(small_disk / 'filler', os.path.getsize(small_disk / 'filler') -
                        (1 << 17))
    monkeypatch.setattr(MetricWriter, 'epoch_row', epoch_row)
    message = one_error(capsys, cli.main(train_argv(
        tmp_path, run, '--config.train.num_epochs=4')), expected=1)
    # Where the disk filled up decides the file named: a checkpoint's data (TensorStore)
    # or its metadata (orbax's own threads, which name no file: the checkpoint folder).
    assert message.startswith((f'error: cannot write the checkpoint {run}/',
                               f'error: cannot write {run}/checkpoints') if small_disk else
                              f'error: cannot write {run}/')
    assert message.endswith(': No space left on device (ENOSPC); free some space and start '
                            'the same command again')
    with open(run / 'log.txt') as f:
        assert message in f.read()  # an unattended run says why it ended
    if small_disk is not None:
        os.remove(small_disk / 'filler')
    assert run_dir.load_run(str(run)).step in (1, 2)
    assert_free(run)
