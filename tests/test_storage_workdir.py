"""A work directory in a bucket (gs://, s3://, loopback servers: tests/objstore.py): training
there equals training on local disk (metrics.csv rows, final parameters bit for bit), every
file is a whole object, and one lock object keeps a second command out."""
import csv
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from clusiam_jax import cli, interrupts, storage, workdir_lock
from clusiam_jax.data.skips import SkipLog
from clusiam_jax.errors import ConfigError
from clusiam_jax.interop.read_weights import read_weights, variable_names
from clusiam_jax.run_dir import load_run
from clusiam_jax.train.loop import train as train_on
from tests import helpers, kill_worker
from tests.helpers import PreemptedLoader, SyntheticLoader, assert_trees_equal, mesh_of, tiny_config

SIZES = dict(steps_per_epoch=3, num_epochs=2, batch_size=8, image_size=32)
TIME_COLUMNS = ('time_s', 'pairs_per_s')


def train(config, workdir, loader):
    return train_on(config, workdir, loader, mesh_of(1))


def metric_rows(raw: bytes):
    rows = list(csv.DictReader(io.StringIO(raw.decode('utf-8'))))
    return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in rows]


@pytest.fixture(scope='module')
def on_disk(tmp_path_factory):
    """The reference: the same run on local disk."""
    config = tiny_config('clubyol', num_epochs=2)
    workdir = str(tmp_path_factory.mktemp('local'))
    state = jax.device_get(train(config, workdir, SyntheticLoader(**SIZES)))
    with open(os.path.join(workdir, 'metrics.csv'), 'rb') as f:
        return config, state, metric_rows(f.read())


@pytest.mark.slow  # two tiny runs of about 30 s each (compiling)
def test_training_in_a_bucket_equals_local_disk(on_disk, bucket, objstore):
    config, reference, rows = on_disk
    workdir = f'{bucket}/runs/a'
    state = jax.device_get(train(config, workdir, SyntheticLoader(**SIZES)))
    assert_trees_equal(state, reference)
    objects = objstore.objects(workdir)
    assert metric_rows(objects['metrics.csv']) == rows and len(rows) == 2
    assert {'config.json', 'normalization.json'} <= set(objects)
    events = [k for k in objects if k.startswith('tb/events.out.tfevents')]
    assert len(events) == 1 and objects[events[0]]  # uploaded whole at the end
    assert not os.path.exists(os.path.join(os.getcwd(), 's3:'))  # nothing staged beside us
    # train.init_from=<the run in the bucket> reads its online weights.
    source = read_weights(workdir, config)
    assert source.path == workdir and source.arrays
    trained = variable_names({'params': reference.params, 'batch_stats': reference.batch_stats})
    assert set(source.arrays) <= set(trained)
    for name, value in source.arrays.items():
        np.testing.assert_array_equal(value, trained[name])


@pytest.mark.slow
def test_resume_after_sigterm_in_a_bucket_is_bit_exact(on_disk, bucket, objstore, tmp_path):
    config, reference, rows = on_disk
    workdir = f'{bucket}/runs/b'
    stopped = train(config, workdir, PreemptedLoader(at=4, signum=signal.SIGTERM, **SIZES))
    assert interrupts.received() == signal.SIGTERM
    assert 1 <= int(stopped.step) < 6
    # train.resume_from=<the bucket run>: a new local run continues it exactly.
    elsewhere = config.copy_and_resolve_references()
    elsewhere.train.resume_from = workdir
    continued = jax.device_get(train(elsewhere, str(tmp_path / 'continued'),
                                     SyntheticLoader(**SIZES)))
    assert_trees_equal(continued, reference)
    resumed = jax.device_get(train(config, workdir, SyntheticLoader(**SIZES)))
    assert_trees_equal(resumed, reference)
    assert metric_rows(objstore.read(f'{workdir}/metrics.csv')) == rows


def test_a_second_command_is_refused_while_the_lock_object_is_held(bucket, objstore):
    folder = f'{bucket}/run'
    with workdir_lock.hold(folder, '--workdir', ['--workdir', folder]):
        held = objstore.read(f'{folder}/{workdir_lock.LOCK_NAME}')
        assert b'"pid"' in held
        with pytest.raises(ConfigError, match='is in use by another command: pid'):
            workdir_lock.BucketLock(folder, '--workdir').acquire()
        # Another process (the CLI's own check) is refused the same way, with one line.
        code = ('import sys; from clusiam_jax import workdir_lock\n'
                'try:\n    workdir_lock.BucketLock(sys.argv[1], "--workdir").acquire()\n'
                'except Exception as e:\n    print(e); sys.exit(3)\n')
        other = subprocess.run([sys.executable, '-c', code, folder], capture_output=True,
                               text=True, env={**os.environ, 'PYTHONPATH': os.getcwd()})
        assert other.returncode == 3 and 'in use by another command' in other.stdout
        assert objstore.read(f'{folder}/{workdir_lock.LOCK_NAME}') == held
    assert workdir_lock.LOCK_NAME not in objstore.keys(bucket + '/run')
    # A holder killed on this host (its pid gone) is taken over, as on local disk.
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          capture_output=True, text=True).stdout.strip()
    storage.write_bytes(f'{folder}/{workdir_lock.LOCK_NAME}',
                        ('{"host": "%s", "pid": %s}' % (os.uname().nodename, dead)).encode())
    lock = workdir_lock.BucketLock(folder, '--workdir').acquire()
    lock.release()
    assert workdir_lock.LOCK_NAME not in objstore.keys(bucket + '/run')


def test_the_lock_object_is_renewed_and_taken_over_when_its_lease_ends(bucket, objstore,
                                                                       monkeypatch):
    """A host killed or preempted cannot release its lock: the holder renews it, and a
    lock left unrenewed for STALE_S is taken over (by a restart on another host)."""
    folder, now = f'{bucket}/run', time.time()
    url = f'{folder}/{workdir_lock.LOCK_NAME}'

    def elsewhere(renewed):
        storage.write_bytes(url, json.dumps({'host': 'another-vm', 'pid': 1, 'token': 'x',
                                             'renewed': renewed}).encode())

    elsewhere(now - 5)
    with pytest.raises(ConfigError, match='in use by another command: pid 1 on host another'):
        workdir_lock.BucketLock(folder, '--workdir').acquire()
    elsewhere(now - workdir_lock.BucketLock.STALE_S - 5)
    monkeypatch.setattr(workdir_lock.BucketLock, 'RENEW_S', 0.1)
    lock = workdir_lock.BucketLock(folder, '--workdir').acquire()
    first = json.loads(objstore.read(url))
    assert first['pid'] == os.getpid() and first['renewed'] >= now
    deadline = time.time() + 20
    while json.loads(objstore.read(url))['renewed'] == first['renewed']:
        assert time.time() < deadline, 'never renewed'
        time.sleep(0.05)
    lock.release()
    assert workdir_lock.LOCK_NAME not in objstore.keys(folder)


def stale_lease(url):
    storage.write_bytes(url, json.dumps({'host': 'another-vm', 'pid': 1, 'token': 'old',
                                         'renewed': time.time() - 10_000}).encode())


def test_of_two_commands_taking_over_one_stale_lease_one_wins(bucket, objstore, monkeypatch):
    """Both read the stale lease; B takes it over before A acts: A's takeover (only of the
    version it read) fails and A is refused, instead of deleting B's lock and holding too."""
    folder = f'{bucket}/run'
    url = f'{folder}/{workdir_lock.LOCK_NAME}'
    stale_lease(url)
    real, held, b = storage.read_bytes, [], workdir_lock.BucketLock(folder, '--workdir', ['b'])

    def b_first(path):
        data = real(path)
        if path == url and not held:
            held.append(b)
            b.acquire()
        return data
    monkeypatch.setattr(storage, 'read_bytes', b_first)
    with pytest.raises(ConfigError, match='in use by another command'):
        workdir_lock.BucketLock(folder, '--workdir', ['a']).acquire()
    monkeypatch.undo()
    assert json.loads(objstore.read(url))['token'] == held[0]._token
    held[0].release()
    assert workdir_lock.LOCK_NAME not in objstore.keys(folder)


def test_a_holder_that_loses_its_lease_stops_and_leaves_the_new_lock(bucket, objstore,
                                                                     monkeypatch):
    """Another command takes the lock over between the renewal's read and its write: the
    renewal (only of the version read) fails, the command is asked to stop (SIGTERM at the
    next safe point), and release ends in one line, leaving the other's lock."""
    folder = f'{bucket}/run'
    url = f'{folder}/{workdir_lock.LOCK_NAME}'
    monkeypatch.setattr(workdir_lock.BucketLock, 'RENEW_S', 0.1)
    real, other = storage.read_bytes, json.dumps({'host': 'another-vm', 'pid': 1,
                                                  'token': 'theirs',
                                                  'renewed': time.time()}).encode()

    def taken_meanwhile(path):
        data = real(path)
        if path == url and threading.current_thread().name == 'clusiam-lock-renewal':
            storage.write_bytes(url, other)
        return data
    interrupts.reset()
    lock = workdir_lock.BucketLock(folder, '--workdir').acquire()
    monkeypatch.setattr(storage, 'read_bytes', taken_meanwhile)
    try:
        deadline = time.time() + 20
        while not lock.lost:
            assert time.time() < deadline, 'the lost lease was never noticed'
            time.sleep(0.05)
        assert interrupts.received() == signal.SIGTERM
        monkeypatch.undo()
        with pytest.raises(ConfigError, match='another command took over its lock') as err:
            lock.release()
        assert '\n' not in str(err.value)
    finally:
        interrupts.reset()
    assert objstore.read(url) == other


def test_log_txt_in_a_bucket_is_rewritten_whole_and_goes_on(bucket, objstore, monkeypatch):
    workdir = f'{bucket}/run'
    url = f'{workdir}/{cli.LOG_NAME}'
    root = logging.getLogger()
    logger = logging.getLogger('clusiam_jax')
    logger.setLevel(logging.INFO)

    def session(lines):
        before = list(root.handlers)
        cli.log_to_workdir(workdir, ['--workdir', workdir])
        handler = next(h for h in root.handlers if h not in before)
        try:
            for line in lines:
                logger.info(line)
        finally:
            root.removeHandler(handler)
            handler.close()

    monkeypatch.setattr(cli, 'LOG_UPLOAD_EVERY_S', 1e9)
    session(['first run'])  # uploaded at the end only
    text = objstore.read(url).decode()
    assert text.count('launch.py --workdir') == 1 and text.endswith('first run\n')
    monkeypatch.setattr(cli, 'LOG_UPLOAD_EVERY_S', 0.0)  # every line: the object is whole
    session(['resumed'])
    text = objstore.read(url).decode()
    assert text.count('launch.py --workdir') == 2
    assert text.index('first run') < text.index('resumed') and text.endswith('resumed\n')


def test_a_failing_bucket_never_stalls_logging(bucket, objstore, monkeypatch):
    """log.txt is uploaded from a thread (one try per interval): a bucket that hangs for
    seconds and then fails holds no logging call; the last upload at close has every line."""
    from clusiam_jax.errors import DataError
    workdir = f'{bucket}/run'
    url = f'{workdir}/{cli.LOG_NAME}'
    real, calls = storage.write_bytes, []

    def hanging(target, data):
        calls.append(target)
        if len(calls) == 1:
            time.sleep(3.0)
            raise DataError(f'cannot write {target}: 503 Service Unavailable')
        real(target, data)
    monkeypatch.setattr(storage, 'write_bytes', hanging)
    monkeypatch.setattr(storage, 'upload', lambda local, target: hanging(
        target, open(local, 'rb').read()))
    monkeypatch.setattr(cli, 'LOG_UPLOAD_EVERY_S', 0.05)
    logger = logging.getLogger('clusiam_jax')
    logger.setLevel(logging.INFO)
    root = logging.getLogger()
    before = list(root.handlers)
    cli.log_to_workdir(workdir, ['--workdir', workdir])
    handler = next(h for h in root.handlers if h not in before)
    try:
        start = time.monotonic()
        for i in range(40):
            logger.info('line %d', i)
            time.sleep(0.02)
        assert time.monotonic() - start < 2.5, 'a logging call waited on the bucket'
        assert len(calls) == 1  # the first upload still hangs: no second one queued
    finally:
        root.removeHandler(handler)
        handler.close()
    text = objstore.read(url).decode()
    assert text.endswith('line 39\n')


def test_skip_list_in_a_bucket_is_shared_and_whole(bucket, objstore, caplog):
    url = f'{bucket}/run/skipped_files.txt'
    with caplog.at_level(logging.WARNING):
        SkipLog(url).record('a.svs', 'unreadable')
        SkipLog(url).record('a.svs', 'unreadable')  # another worker: listed once, logged once
        SkipLog(url).record('b.svs', 'unreadable')
    assert objstore.read(url) == b'a.svs\nb.svs\n'
    assert sum('skipping a.svs' in r.getMessage() for r in caplog.records) == 1
    assert SkipLog(url).paths() == ['a.svs', 'b.svs']


def test_a_cleared_skip_list_in_a_bucket_starts_anew(bucket, objstore):
    """The host's local copy holds no lines the object has: a list removed (a new run) is
    not filled again with the old run's lines."""
    url = f'{bucket}/run/skipped_files.txt'
    SkipLog(url).record('old.svs', 'unreadable')
    objstore.fs(bucket[:2]).rm(url)
    SkipLog(url).record('new.svs', 'unreadable')
    assert objstore.read(url) == b'new.svs\n'


def test_each_process_writes_its_own_skip_list_in_a_bucket(bucket, objstore, monkeypatch):
    """Several processes: skipped_files-<process>.txt each (no host rewrites another's);
    a worker process keeps its parent's name."""
    import pickle
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    monkeypatch.setattr(jax, 'process_index', lambda: 1)
    log = SkipLog(f'{bucket}/run/skipped_files.txt')
    log.record('a.svs', 'unreadable')
    monkeypatch.setattr(jax, 'process_index', lambda: 0)
    pickle.loads(pickle.dumps(log)).record('b.svs', 'unreadable')
    assert objstore.keys(f'{bucket}/run') == ['skipped_files-1.txt']
    assert objstore.read(f'{bucket}/run/skipped_files-1.txt') == b'a.svs\nb.svs\n'


@pytest.mark.slow
def test_launch_py_with_the_work_directory_in_a_bucket(bucket, objstore, demo_tiles):
    """The command a pod runs: training, its log, its lock; a second command on the same
    work directory meanwhile is refused with one line and writes nothing there."""
    workdir = f'{bucket}/run'
    args = [sys.executable, 'launch.py', '--config', 'configs/demo.py', '--workdir', workdir,
            f'--config.data.path={demo_tiles}', '--config.model.backbone=resnet_tiny',
            '--config.data.image_size=32', '--config.export.after_training=False',
            '--config.train.num_epochs=2']
    where = dict(cwd=helpers.REPO, env=helpers.subprocess_env(), text=True)
    first = subprocess.Popen(args, stderr=subprocess.PIPE, **where)
    seen = []
    for line in first.stderr:  # the lock is held from before this line to the end
        seen.append(line)
        if 'compiling the train step' in line:
            break
    second = subprocess.run(args, capture_output=True, timeout=300, **where)
    rest = first.communicate(timeout=600)[1]
    assert first.returncode == 0, ''.join(seen) + rest
    assert second.returncode == 2 and second.stderr.count('error:') == 1, second.stderr
    assert f'--workdir {workdir} is in use by another command' in second.stderr
    keys = objstore.keys(workdir)
    assert workdir_lock.LOCK_NAME not in keys  # released
    assert {'config.json', 'normalization.json', 'metrics.csv', cli.LOG_NAME} <= set(keys)
    log = objstore.read(f'{workdir}/{cli.LOG_NAME}').decode()
    assert log.count('launch.py --config') == 1  # the refused command wrote no line
    assert 'compiled in' in log and f'run complete: {workdir}' in log


@pytest.mark.slow
def test_sigkill_mid_epoch_in_a_bucket_then_restart_equals_uninterrupted(bucket, objstore,
                                                                         tmp_path):
    """kill -9 in epoch 2 of a run in a bucket (as tests/test_kill.py on disk): the restart
    trusts only the step with its marker and ends bit for bit as an uninterrupted run."""
    workdir = f'{bucket}/killed'
    worker = [sys.executable, os.path.join(helpers.REPO, 'tests', 'kill_worker.py'), workdir]
    proc = subprocess.Popen(worker, env=helpers.subprocess_env(BATCH_DELAY_S='1.0'),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while 'checkpoints/3/commit_success.txt' not in objstore.keys(workdir):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, 'no checkpoint after the first epoch'
        time.sleep(0.2)
    time.sleep(1.5)  # into the second epoch (1 s per batch), before its checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows_before = objstore.read(f'{workdir}/metrics.csv')
    restarted = subprocess.run(worker, capture_output=True, text=True, timeout=900,
                               env=helpers.subprocess_env())
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert 'epoch 2/3' in restarted.stderr and 'epoch 1/3' not in restarted.stderr
    reference = kill_worker.run(str(tmp_path / 'straight'))
    assert_trees_equal(load_run(workdir).weights, reference.weights())
    rows = metric_rows(objstore.read(f'{workdir}/metrics.csv'))
    assert metric_rows(rows_before) == rows[:1] and [r['epoch'] for r in rows] == ['1', '2', '3']
