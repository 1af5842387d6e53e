"""Orbax checkpoints (train state, data iterator state) in `<workdir>/checkpoints/<step>/`.
A gs:// work directory goes through orbax's own GCS support; orbax 0.12.8 cannot write s3://
(it even makes a local './s3:/' folder), so there orbax works in a local staging folder and
each finished step is uploaded, its marker last."""
import hashlib
import logging
import os
import shutil
import socket
import tempfile
import time

import jax
import orbax.checkpoint as ocp
from etils import epath
from etils.epath import backend as epath_backend
from jax.experimental import multihost_utils

from clusiam_jax import fileio, interrupts, storage
from clusiam_jax.errors import CheckpointError, ConfigError, DataError
from clusiam_jax.workdir_lock import check_lease, pid_alive

log = logging.getLogger('clusiam_jax')

LATEST_DIR = 'checkpoints'
BEST_DIR = 'best_checkpoint'  # by train.best_metric; BEST_JSON says its step and value
BEST_JSON = 'best_checkpoint.json'
# A step in a bucket is finished only with this object (orbax writes it last on gs://; we
# upload it last on s3://): a step folder without it is never trusted.
MARKER = 'commit_success.txt'


class Checkpointer:
    def __init__(self, workdir: str, max_to_keep: int = 3, create: bool = True,
                 subdir: str = LATEST_DIR):
        self.workdir = workdir
        self.directory = storage.join(workdir if storage.is_url(workdir)
                                      else os.path.abspath(workdir), subdir)
        # s3: orbax sees the staging folder; the bucket's steps are the ones with a marker.
        self._staged = self.directory.startswith('s3://')
        if self._staged and jax.process_count() > 1:
            raise ConfigError(f'a work directory on s3:// takes one process ({workdir} with '
                              f'{jax.process_count()}): orbax cannot write s3:// itself; use '
                              f'gs:// or a shared file system for pod jobs')
        if storage.is_url(self.directory) and create:
            storage.makedirs(self.directory)  # one line for a missing bucket
        if not create and not storage.isdir(self.directory):
            if subdir == BEST_DIR:
                raise CheckpointError(f'{workdir} has no best checkpoint (train with '
                                      f'train.best_metric and the monitor to keep one)')
            raise CheckpointError(f'{workdir} has no checkpoints/ folder: train first, or '
                                  f'point at a run')
        self.max_to_keep = max_to_keep
        _forget_listings(self.directory)  # another process (or a test) may have changed it
        self._orbax_dir = _staging_folder(self.directory) if self._staged else self.directory
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                               create=create or self._staged,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self._orbax_dir, options=options)
        self._remote_steps = self._list_remote() if self._staged else None

    def all_steps(self):
        if self._staged:
            return list(self._remote_steps)
        return sorted(self.manager.all_steps())

    def _list_remote(self):
        """The steps in the bucket that have their marker (a fresh listing)."""
        names = storage.find_files(self.directory)
        return sorted(int(n.split('/')[0]) for n in names
                      if n.split('/')[0].isdigit() and n == f'{n.split("/")[0]}/{MARKER}')

    def checked_step(self, step=None) -> int:
        steps = self.all_steps()
        if not steps and storage.split(self.directory)[1] == BEST_DIR:
            raise CheckpointError(f'no best checkpoint in {self.directory}: no monitor epoch '
                                  f'has improved train.best_metric yet (or every one was '
                                  f'flagged as collapsed); export the latest instead')
        if not steps:
            raise CheckpointError(f'no checkpoint in {self.directory}: train first')
        if step is not None and step not in steps:
            raise CheckpointError(f'no checkpoint at step {step} in {self.directory}; it '
                                  f'has {", ".join(map(str, steps))}')
        return steps[-1] if step is None else step

    def save(self, step: int, state, data_state=None):
        # Never into a bucket folder another command took over (its lease renewed otherwise,
        # so the save has a whole lease); tensorstore's writes pass by storage's fence.
        check_lease(self.workdir)
        items = {'state': ocp.args.StandardSave(state)}
        if data_state is not None:
            items['data'] = ocp.args.JsonSave(data_state)
        if self._staged and self._remote_steps and self._remote_steps[-1] >= step:
            saved = False  # orbax's rule on disk: no step at or below the last one
        else:
            saved = self._writing(lambda: self.manager.save(step, args=ocp.args.Composite(
                **items)))
        if not saved:
            raise CheckpointError(f'the checkpoint at step {step} was not written: '
                                  f'{self.directory} already lists step {max(self.all_steps())}')
        if self._staged:  # synchronous: the step is in the bucket when save returns
            self._writing(self.manager.wait_until_finished)
            self._upload(step)

    def _upload(self, step):
        """The staged step's files, then its marker; then the steps beyond keep_checkpoints
        (marker first: a step half deleted is never trusted)."""
        url = storage.join(self.directory, str(step))
        if storage.isdir(url):  # a half upload of a killed run: stale objects go first
            storage.remove(url, recursive=True)
        storage.upload(os.path.join(self._orbax_dir, str(step)), url, recursive=True)
        storage.write_bytes(storage.join(url, MARKER), f'uploaded step {step}\n'.encode())
        self._remote_steps = sorted(set(self._remote_steps) | {step})
        if self.max_to_keep:
            for old in self._remote_steps[:-self.max_to_keep]:
                self._delete_remote(old)

    def delete(self, step: int):
        """Removes checkpoint `step` (the monitor replaces a replayed step's best)."""
        if not self._staged:
            self.manager.delete(step)
            return
        if step in self.manager.all_steps():  # its staged copy
            self.manager.delete(step)
        self._delete_remote(step)

    def _delete_remote(self, step):
        url = storage.join(self.directory, str(step))
        storage.remove(storage.join(url, MARKER))
        storage.remove(url, recursive=True)
        self._remote_steps = [s for s in self._remote_steps if s != step]

    def restore(self, step: int, abstract_state):
        """(state, data_state or None); ConfigError first for another model or optimizer."""
        self._stage(step)
        self._check_shapes(step, abstract_state)
        items = {'state': ocp.args.StandardRestore(abstract_state)}
        # Items are sub-directories (orbax's item metadata warns about unhandled items).
        has_data = storage.isdir(storage.join(self._orbax_dir, str(step), 'data'))
        if has_data:
            items['data'] = ocp.args.JsonRestore()
        restored = self._read(step, lambda: self.manager.restore(
            step, args=ocp.args.Composite(**items)))
        return restored['state'], (restored['data'] if has_data else None)

    def restore_weights(self, step: int, abstract_weights: dict) -> dict:
        self._stage(step)
        self._check_shapes(step, abstract_weights, partial=True,
                           advice="the run's config.json does not match its checkpoints")
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_weights)
        args = ocp.args.PyTreeRestore(item=abstract_weights, partial_restore=True,
                                      restore_args=restore_args)
        try:
            return self._read(step, lambda: ocp.PyTreeCheckpointHandler().restore(
                self._state_path(step), args=args))
        except CheckpointError as e:
            raise CheckpointError(f'{e}; move it away to use the one before') from None

    def _stage(self, step):
        """s3: the bucket's step into the staging folder (whole, or orbax does not see it)."""
        local = os.path.join(self._orbax_dir, str(step)) if self._staged else None
        if local is None or os.path.isdir(local):
            return
        url = storage.join(self.directory, str(step))
        partial = local + '.download'
        shutil.rmtree(partial, ignore_errors=True)
        try:
            for name in storage.find_files(url):
                if name != MARKER:
                    os.makedirs(os.path.dirname(os.path.join(partial, name)), exist_ok=True)
                    storage.download(storage.join(url, name), os.path.join(partial, name))
        except DataError:  # the store failing (an outage, a 403): not the step's damage
            raise
        except Exception as e:  # a transient failure is retried inside; the rest is damage
            interrupts.check()
            raise CheckpointError(f'the checkpoint at step {step} in {self.directory} '
                                  f'cannot be read ({one_line(e)})') from e
        os.replace(partial, local)
        self.manager.reload()

    def _read(self, step, read):
        """`read()`, retried once: damage only if it fails twice and is no stop request."""
        for attempt in (1, 2):
            try:
                return read()
            except Exception as e:  # orbax and tensorstore raise many kinds
                interrupts.check()  # an interrupted read says nothing about the file
                if attempt == 2:
                    self._store_answers(step)  # else an outage would set a good step aside
                    raise CheckpointError(f'the checkpoint at step {step} in {self.directory} '
                                          f'cannot be read ({one_line(e)})') from e
                log.warning('reading the checkpoint at step %d in %s failed (%s); trying '
                            'again in 1 s', step, self.directory, one_line(e))
                time.sleep(1.0)  # a passing failure (a network file system) passes
                interrupts.check()

    def _store_answers(self, step):
        """A DataError if the bucket does not answer for `step` (orbax's own reads of gs://
        say no HTTP status): a read that failed then is no sign of damage."""
        if storage.is_url(self.directory):
            storage.read_bytes(storage.join(self.directory, str(step), MARKER))

    def _state_path(self, step):
        return epath.Path(self._orbax_dir) / str(step) / 'state'

    def _check_shapes(self, step, abstract_state, partial=False,
                      advice="use the config it was trained with (the run's config.json) "
                             'or a new --workdir'):
        """ConfigError naming the first array (parameters first) whose stored shape differs."""
        try:
            # The item handler: a Checkpointer would warn about step metadata.
            have = _shapes_by_path(ocp.StandardCheckpointHandler().metadata(self._state_path(step)))
        except Exception:  # damaged or foreign: restore() reports it
            return
        want = _shapes_by_path(abstract_state)
        if partial:
            fields = {k.split('/')[0] for k in want}
            have = {k: v for k, v in have.items() if k.split('/')[0] in fields}
        differ = [k for k in have.keys() | want.keys() if have.get(k) != want.get(k)]
        if not differ:
            return
        key = min(differ, key=lambda k: (not k.startswith('params/'), k))
        hint = '; optim.name or optim.fix_pred_lr changed?' if key.startswith('opt_state/') else ''
        if not partial and not any(k.startswith('opt_state/') for k in have):
            hint = ('; it holds weights only (convert from-torch): train from them in a new '
                    '--workdir with train.init_from')
        raise ConfigError(f'the checkpoint at step {step} in {self.directory} holds a '
                          f'different model or optimizer than this config ({key}: stored '
                          f'{have.get(key, "absent")}, this config {want.get(key, "absent")}'
                          f'{hint}): {advice}')

    def restore_latest_readable(self, abstract_state, set_aside: bool = True):
        """(step, state, data_state) of the newest checkpoint that restores, else Nones; newer
        damaged ones become `unreadable-<step>` (orbax would skip every save up to them); a
        bucket failing (storage's DataError) ends the command as it is: a restart retries."""
        unreadable = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, data_state = self.restore(step, abstract_state)
            except ConfigError:
                raise  # an intact checkpoint of another model: falling back cannot help
            except CheckpointError as e:  # failed twice, the store answers, no stop: damaged
                log.warning('checkpoint at step %d in %s cannot be restored (%s); falling back '
                            'to the previous one', step, self.directory, one_line(e.__cause__ or e))
                unreadable.append(step)
                continue
            if unreadable and set_aside:
                self._set_aside(unreadable)
            return step, state, data_state
        if unreadable:
            raise CheckpointError(f'no checkpoint in {self.directory} can be restored '
                                  f'(each is damaged; see the warnings above); move the '
                                  f'folder away to start afresh')
        return None, None, None

    def _set_aside(self, steps):
        if jax.process_index() == 0:
            for step in steps:
                target = storage.join(self.directory, f'unreadable-{step}')
                n = 1
                while storage.exists(target):
                    target = storage.join(self.directory, f'unreadable-{step}-{n}')
                    n += 1
                source = storage.join(self.directory, str(step))
                if storage.is_url(source):
                    self._set_aside_remote(step, source, target)
                else:
                    os.replace(source, target)
                log.warning('moved the unreadable checkpoint at step %d aside to %s', step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices('clusiam_jax: unreadable checkpoints')
        _forget_listings(self.directory)
        self.manager.reload()

    def _set_aside_remote(self, step, source, target):
        """A bucket cannot rename: the marker goes first (one delete: from then on the step is
        unfinished and never trusted, whatever a kill leaves), then the objects are copied
        inside the store to `target` for a person to inspect, then deleted."""
        storage.remove(storage.join(source, MARKER))
        for name in storage.find_files(source):
            storage.copy(storage.join(source, name), storage.join(target, name))
        storage.remove(source, recursive=True)
        if self._staged:
            shutil.rmtree(os.path.join(self._orbax_dir, str(step)), ignore_errors=True)
            self._remote_steps = [s for s in self._remote_steps if s != step]

    def wait(self):
        self._writing(self.manager.wait_until_finished)

    def close(self):
        try:
            self.wait()
            self.manager.close()
        finally:
            if self._staged:
                shutil.rmtree(self._orbax_dir, ignore_errors=True)

    def _writing(self, call):
        try:  # an OS error naming no file (orbax's background writes) names this folder
            return call()
        except OSError as e:
            if e.filename is None and e.errno is not None:
                raise OSError(e.errno, e.strerror or os.strerror(e.errno), self.directory) from e
            raise


def _forget_listings(url: str) -> None:
    """gs://: orbax lists through epath's own gcsfs instance, whose listing cache does not
    see objects that storage (another instance) or another process changed; a path's entry
    only drops its parents' listings, not its sub-folders'."""
    if url.startswith('gs://'):
        epath_backend.fsspec_backend.fs(url).invalidate_cache()  # gcsfs: parents only


def _staging_folder(url: str) -> str:
    """A fresh local folder for one Checkpointer of `url`: `$XDG_CACHE_HOME/clusiam_jax/
    staging/<hash of url>-<pid>-<host>-*`; folders a killed process of this host left for the
    same url go (~/.cache may be shared over NFS: another host's pids are not looked at)."""
    root = fileio.cache_root('staging')
    os.makedirs(root, exist_ok=True)
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    host = socket.gethostname().replace('/', '_')
    for name in os.listdir(root):
        # mkdtemp's suffix has no '-'; a host name may have some.
        parts = name.split('-')
        if (len(parts) > 3 and parts[0] == key and parts[1].isdigit()
                and '-'.join(parts[2:-1]) == host and not pid_alive(int(parts[1]))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f'{key}-{os.getpid()}-{host}-', dir=root)


def one_line(error, limit=300):
    return f'{type(error).__name__}: ' + ' '.join(str(error).split())[:limit]


def leaf_name(path) -> str:  # 'params/encoder/.../kernel'
    return jax.tree_util.keystr(path, simple=True, separator='/')


def _shapes_by_path(tree):
    return {leaf_name(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
