"""Signals and divergence never change which checkpoint a run continues from.

A signal that lands while a checkpoint is being read stops the command; it is never
taken as a damaged checkpoint. A read that fails once and works on a retry is not
damage either. A diverged state is never saved, so `train.keep_checkpoints` can never
rotate the last good checkpoint away. Through the command line: signals at spread
moments of start-up and compile end with the documented status and one line, and a
`kill -9` of a job leaves none of its worker processes running.
"""
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from clusiam_jax import interrupts, run_dir
from clusiam_jax.errors import NonFiniteError
from clusiam_jax.train import trainer as trainer_lib
from clusiam_jax.train.loop import train
from tests.helpers import (
    REPO,
    SyntheticLoader,
    as_from_a_terminal,
    assert_trees_equal,
    mesh_of,
    subprocess_env,
    tiny_config,
)

SIZES = dict(steps_per_epoch=3, num_epochs=2, batch_size=8, image_size=32)


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    """A 2-epoch CluBYOL run on one device with checkpoints at steps 3 and 6."""
    workdir = str(tmp_path_factory.mktemp('run') / 'run')
    state = train(tiny_config('clubyol'), workdir, SyntheticLoader(**SIZES), mesh_of(1))
    return workdir, jax.device_get(state)


@pytest.fixture
def command_line_handlers(monkeypatch):
    """The handlers the command line installs (a signal is recorded, safe points raise),
    without the watchdog's hard exit, which would end pytest."""
    monkeypatch.setattr(interrupts, 'GRACE_S', 3600.0)
    previous = interrupts.install()
    yield
    interrupts.restore(previous)
    interrupts.reset()


def copy_run(source, tmp_path):
    workdir = str(tmp_path / 'run')
    shutil.copytree(source, workdir)
    return workdir


def signal_inside_the_read(calls, fail=True):
    """A stand-in for a checkpoint read that a SIGTERM interrupts: the signal is
    delivered inside the read; whatever the handler raises there is turned into a library
    error (as a worker thread or an event loop does), and the read then fails."""
    def read(self, step, *args, **kwargs):
        calls.append(step)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the Python-level handler runs here
        except BaseException as e:
            raise RuntimeError('the read was interrupted') from e
        raise OSError(errno.EINTR, 'Interrupted system call')
    return read


def test_a_signal_during_the_restore_stops_and_never_falls_back(
        finished_run, tmp_path, monkeypatch, command_line_handlers, caplog):
    source, final = finished_run
    workdir = copy_run(source, tmp_path)
    calls = []
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, 'clusiam_jax'):
        patch.setattr(ocp.CheckpointManager, 'restore', signal_inside_the_read(calls))
        with pytest.raises(interrupts.Interrupted):
            train(tiny_config('clubyol'), workdir, SyntheticLoader(**SIZES), mesh_of(1))
    assert calls == [6], 'an interrupted read made the run try an older checkpoint'
    assert not any('falling back' in r.message for r in caplog.records)
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']
    # Started again, the run finds step 6 intact: complete, the same parameters.
    interrupts.reset()
    resumed = train(tiny_config('clubyol'), workdir, SyntheticLoader(**SIZES), mesh_of(1))
    assert int(resumed.step) == 6
    assert_trees_equal(resumed, final)


def test_a_read_that_fails_once_is_retried_not_declared_damaged(finished_run, tmp_path,
                                                                monkeypatch, caplog):
    source, _ = finished_run
    workdir = copy_run(source, tmp_path)
    calls, original = [], ocp.CheckpointManager.restore

    def flaky(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 1:
            raise OSError(errno.EIO, 'Input/output error')  # a network file system hiccup
        return original(self, step, *args, **kwargs)
    monkeypatch.setattr(ocp.CheckpointManager, 'restore', flaky)
    with caplog.at_level(logging.WARNING, 'clusiam_jax'):
        state = train(tiny_config('clubyol'), workdir, SyntheticLoader(**SIZES), mesh_of(1))
    assert calls == [6, 6] and int(state.step) == 6
    assert not any('falling back' in r.message for r in caplog.records)


def test_a_signal_while_export_reads_the_weights_is_not_a_damaged_checkpoint(
        finished_run, monkeypatch, command_line_handlers):
    source, _ = finished_run
    calls = []
    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, 'restore',
                        lambda self, directory, *a, **k:
                        signal_inside_the_read(calls)(self, directory, *a, **k))
    with pytest.raises(interrupts.Interrupted):
        run_dir.load_run(source)
    assert len(calls) == 1


def test_a_diverged_state_is_never_saved_and_the_good_checkpoint_survives(
        finished_run, tmp_path, monkeypatch):
    """Parameters that explode through steps whose loss is still finite (the per-step
    guard cannot see them): with keep_checkpoints=1 the save would have rotated the only
    good checkpoint away."""
    source, final = finished_run
    workdir = copy_run(source, tmp_path)
    shutil.rmtree(os.path.join(workdir, 'checkpoints', '6'))
    config = tiny_config('clubyol')
    config.train.keep_checkpoints = 1
    original = trainer_lib.Trainer.compile

    def exploding(self, state=None, batch=None):
        step_fn, seconds = original(self, state, batch)

        def step(state, batch):
            state, metrics = step_fn(state, batch)
            if int(state.step) == 6:  # the last step of epoch 2, its loss still finite
                state = state.replace(params=jax.tree.map(lambda x: x * 1e30, state.params))
            return state, metrics
        return step, seconds
    with monkeypatch.context() as patch:
        patch.setattr(trainer_lib.Trainer, 'compile', exploding)
        with pytest.raises(NonFiniteError, match='diverged by step 6.*not saved.*step 3 is '
                                                 'kept') as err:
            train(config, workdir, SyntheticLoader(**SIZES), mesh_of(1))
    assert '\n' not in str(err.value)
    assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['3']
    # Restarted (the learning rate lowered, here the explosion gone), it resumes from step
    # 3 and ends where the uninterrupted run ended.
    resumed = train(config, workdir, SyntheticLoader(**SIZES), mesh_of(1))
    assert_trees_equal(resumed, final)


# ---------------------------------------------------------------- the command line

# The demo at the tiny model's size; many epochs, so the run never ends by itself.
TINY_DEMO = ['--config', 'configs/demo.py', '--config.model.backbone=resnet_tiny',
             '--config.data.image_size=32', '--config.train.num_epochs=1000',
             '--config.export.after_training=False']
FATAL = ('Traceback', 'Fatal Python error', 'Segmentation fault', 'Exception ignored',
         'core dumped')


def _launch(args, log_dir):
    """The command with its output in files: a pipe nobody reads until the end fills up
    (64 kB of progress bars) and blocks the command before it can react to a signal."""
    out = open(os.path.join(log_dir, f'out{len(os.listdir(log_dir))}.txt'), 'w+')
    proc = subprocess.Popen([sys.executable, 'launch.py'] + args, cwd=REPO,
                            preexec_fn=as_from_a_terminal,
                            env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT,
                            text=True)
    proc.output = out
    return proc


def _output(proc):
    proc.output.seek(0)
    return proc.output.read()


@pytest.mark.slow
def test_signals_at_spread_moments_of_start_up_and_compile(tmp_path, demo_tiles):
    """20 signals, SIGTERM and Ctrl-C alternating, from import to the end of the first
    compile, three commands at a time (a loaded machine): each ends with the documented
    status (SIGTERM 0, Ctrl-C 130), a stop line, and nothing fatal."""
    # From after Python's own start-up (before it, the default actions apply) to past the
    # first compile of this tiny model on a loaded 2-core machine.
    delays = np.linspace(0.4, 16.0, 20)
    logs = tmp_path / 'logs'
    logs.mkdir()
    pending = list(enumerate(delays))
    running, results = [], []
    while pending or running:
        while pending and len(running) < 3:
            i, delay = pending.pop(0)
            signum = signal.SIGTERM if i % 2 == 0 else signal.SIGINT
            proc = _launch(TINY_DEMO + ['--workdir', str(tmp_path / f'run{i}'),
                                        f'--config.data.path={demo_tiles}'], logs)
            running.append((proc, time.time() + delay, signum, delay, False))
        still = []
        for proc, at, signum, delay, sent in running:
            if not sent and time.time() >= at:
                proc.send_signal(signum)
                sent = True
            if sent and proc.poll() is not None:
                results.append((signum, delay, proc.returncode, _output(proc)))
            else:
                still.append((proc, at, signum, delay, sent))
        running = still
        time.sleep(0.05)
    for signum, delay, code, err in results:
        what = f'{signal.Signals(signum).name} at {delay:.1f} s: exit {code}\n{err[-2000:]}'
        assert code == (0 if signum == signal.SIGTERM else 130), what
        assert f'stopped by {signal.Signals(signum).name}' in err or \
            f'{signal.Signals(signum).name}: saved a checkpoint' in err, what
        assert not any(word in err for word in FATAL), what


def _children(pid):
    """Pids whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    fields = f.read().rsplit(')', 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pids):
    alive = []
    for pid in pids:
        try:
            with open(f'/proc/{pid}/stat') as f:
                if f.read().rsplit(')', 1)[1].split()[0] != 'Z':
                    alive.append(pid)
        except OSError:
            pass
    return alive


def _kill_9_then_no_worker_lives(proc, workers_at_least, timeout=120):
    deadline = time.time() + timeout
    while len(_children(proc.pid)) < workers_at_least and time.time() < deadline:
        assert proc.poll() is None, _output(proc)[-3000:]
        time.sleep(0.1)
    workers = _children(proc.pid)
    assert len(workers) >= workers_at_least
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while _alive(workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(workers), f'workers {_alive(workers)} outlived their job'


@pytest.mark.slow
def test_kill_9_of_training_and_tiling_leaves_no_worker(tmp_path, demo_tiles):
    logs = tmp_path / 'logs'
    logs.mkdir()
    train_proc = _launch(TINY_DEMO + ['--workdir', str(tmp_path / 'run'),
                                      f'--config.data.path={demo_tiles}',
                                      '--config.data.num_workers=2'], logs)
    _kill_9_then_no_worker_lives(train_proc, workers_at_least=2)

    from configs import demo
    slides = tmp_path / 'slides'
    slides.mkdir()
    for i in range(12):
        os.symlink(demo.DEMO_SLIDE, slides / f'slide{i}.svs')
    tile_proc = _launch(['--mode', 'tile', f'--config.tile.slides={slides}',
                         f'--config.tile.out_dir={tmp_path / "tiles"}',
                         '--config.tile.num_workers=2'], logs)
    _kill_9_then_no_worker_lives(tile_proc, workers_at_least=2)
