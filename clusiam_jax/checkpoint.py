"""Orbax checkpoints of a run: the train state plus the data iterator's state.

Checkpoints live in `<workdir>/checkpoints/<step>/`, are written asynchronously and
atomically (orbax writes to a temporary directory and renames it), and the last
`train.keep_checkpoints` are kept. Restoring takes an abstract target carrying the
shardings of the current mesh, so optax states come back as their own types and the
state lands on however many devices this run has. Inference restores only the weights
(`restore_weights`, an orbax partial restore): no optimizer is built or read.
"""
import logging
import os
import time

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from clusiam_jax import interrupts
from clusiam_jax.errors import CheckpointError, ConfigError

log = logging.getLogger('clusiam_jax')


LATEST_DIR = 'checkpoints'
# Pause before the second try of a checkpoint read that failed.
RETRY_S = 1.0
# The best checkpoint by train.best_metric, beside the latest ones; BEST_JSON says which
# step, by which metric and value.
BEST_DIR = 'best_checkpoint'
BEST_JSON = 'best_checkpoint.json'


def checkpoint_dir(workdir: str, subdir: str = LATEST_DIR) -> str:
    return os.path.join(os.path.abspath(workdir), subdir)


class Checkpointer:
    def __init__(self, workdir: str, max_to_keep: int = 3, create: bool = True,
                 subdir: str = LATEST_DIR):
        """create=False for reading another run: a missing checkpoints/ folder stays
        missing (FileNotFoundError) instead of being made inside that run. `subdir`:
        checkpoints/ (the latest ones) or best_checkpoint/ (the best one)."""
        if not create and not os.path.isdir(checkpoint_dir(workdir, subdir)):
            if subdir == BEST_DIR:
                raise CheckpointError(f'{workdir} has no best checkpoint (train with '
                                      f'train.best_metric and the monitor to keep one)')
            raise CheckpointError(f'{workdir} has no checkpoints/ folder: train first, or '
                                  f'point at a run')
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                               enable_async_checkpointing=True)
        self.directory = checkpoint_dir(workdir, subdir)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self):
        return sorted(self.manager.all_steps())

    def checked_step(self, step=None) -> int:
        """`step` (default: the latest) if this run has a checkpoint there, else
        CheckpointError listing the steps it has."""
        steps = self.all_steps()
        if not steps and os.path.basename(self.directory) == BEST_DIR:
            raise CheckpointError(f'no best checkpoint in {self.directory}: no monitor epoch '
                                  f'has improved train.best_metric yet (or every one was '
                                  f'flagged as collapsed); export the latest instead')
        if not steps:
            raise CheckpointError(f'no checkpoint in {self.directory}: train first')
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f'no checkpoint at step {step} in {self.directory}; it '
                                  f'has {", ".join(map(str, steps))}')
        return step

    @staticmethod
    def save_args(state, data_state=None):
        items = {'state': ocp.args.StandardSave(state)}
        if data_state is not None:
            items['data'] = ocp.args.JsonSave(data_state)
        return ocp.args.Composite(**items)

    def save(self, step: int, state, data_state=None):
        """Starts writing checkpoint `step`. CheckpointError when orbax declines (it skips,
        silently, any step not beyond the newest it lists): a run must never say it saved
        what it did not."""
        if not self._writing(lambda: self.manager.save(
                step, args=self.save_args(state, data_state))):
            raise CheckpointError(f'the checkpoint at step {step} was not written: '
                                  f'{self.directory} already lists step '
                                  f'{max(self.all_steps())}')

    def restore(self, step: int, abstract_state):
        """Returns (state, data_state or None) placed as `abstract_state`'s shardings.

        A checkpoint of another model or optimizer (its stored arrays differ from
        `abstract_state`'s: a changed num_clusters, feat_size, backbone, method, optim.name
        or fix_pred_lr) raises ConfigError from the checkpoint's metadata, before any
        array is read.
        """
        self._check_shapes(step, abstract_state)
        items = {'state': ocp.args.StandardRestore(abstract_state)}
        # Each item is a sub-directory of the step's directory (asking orbax for the item
        # metadata instead warns about every item it was not given a handler for).
        has_data = os.path.isdir(os.path.join(self.directory, str(step), 'data'))
        if has_data:
            items['data'] = ocp.args.JsonRestore()
        restored = self._read(step, lambda: self.manager.restore(
            step, args=ocp.args.Composite(**items)))
        return restored['state'], (restored['data'] if has_data else None)

    def _read(self, step, read):
        """`read()`, whose failure is evidence of a damaged checkpoint only when it is not
        a stop request and it fails again: a signal, a dropped network file system
        connection or a busy disk are not damage, and declaring an intact checkpoint
        damaged rolls the run back to an older one. CheckpointError after the retry."""
        for attempt in (1, 2):
            try:
                return read()
            except Exception as e:  # orbax and tensorstore raise many kinds
                interrupts.check()  # an interrupted read says nothing about the file
                if attempt == 2:
                    raise CheckpointError(f'the checkpoint at step {step} in '
                                          f'{self.directory} cannot be read '
                                          f'({_one_line(e)})') from e
                log.warning('reading the checkpoint at step %d in %s failed (%s); trying '
                            'again in %g s', step, self.directory, _one_line(e), RETRY_S)
                time.sleep(RETRY_S)  # a passing failure (a network file system) passes
                interrupts.check()

    def restore_weights(self, step: int, abstract_weights: dict) -> dict:
        """The entries of `abstract_weights` (a dict of top-level state fields, e.g.
        params and batch_stats) from the checkpoint at `step`, without the rest (the
        optimizer state): an orbax partial restore. CheckpointError if it cannot be read."""
        self._check_shapes(step, abstract_weights, partial=True,
                           advice="the run's config.json does not match its checkpoints")
        args = ocp.args.PyTreeRestore(
            item=abstract_weights, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_weights))
        try:
            return self._read(step, lambda: ocp.PyTreeCheckpointHandler().restore(
                self._state_path(step), args=args))
        except CheckpointError as e:
            raise CheckpointError(f'{e}; move it away to use the one before') from None

    def _state_path(self, step):
        return epath.Path(self.directory) / str(step) / 'state'

    def _check_shapes(self, step, abstract_state, partial=False,
                      advice="use the config it was trained with (the run's config.json) "
                             'or a new --workdir'):
        difference = self._stored_shape_difference(step, abstract_state, partial)
        if difference:
            raise ConfigError(f'the checkpoint at step {step} in {self.directory} holds a '
                              f'different model or optimizer than this config '
                              f'({difference}): {advice}')

    def _stored_shape_difference(self, step, abstract_state, partial=False):
        """The first array whose stored shape differs from abstract_state's (parameters
        first), as 'params/cluster_head/assigner/bias: stored (10,), this config (20,)';
        None when all match or when the checkpoint's metadata cannot be read (then
        restoring says what is wrong). With `partial`, stored arrays outside
        abstract_state's top-level fields are not compared."""
        try:
            # The item handler, not a Checkpointer: that one warns about step metadata.
            stored = ocp.StandardCheckpointHandler().metadata(self._state_path(step))
            have = _shapes_by_path(stored)
        except Exception:  # damaged or foreign: restore() reports it
            return None
        want = _shapes_by_path(abstract_state)
        if partial:
            fields = {k.split('/')[0] for k in want}
            have = {k: v for k, v in have.items() if k.split('/')[0] in fields}
        differ = [k for k in have.keys() | want.keys() if have.get(k) != want.get(k)]
        if not differ:
            return None
        key = min(differ, key=lambda k: (not k.startswith('params/'), k))
        hint = ('; optim.name or optim.fix_pred_lr changed?'
                if key.startswith('opt_state/') else '')
        return (f'{key}: stored {have.get(key, "absent")}, this config '
                f'{want.get(key, "absent")}{hint}')

    def restore_latest_readable(self, abstract_state, set_aside: bool = True):
        """(step, state, data_state) of the newest checkpoint that restores, else Nones.

        A checkpoint cut short by a crash (kill -9 mid-write, a full disk) or damaged
        later is skipped with a warning, falling back to the one before it; orbax's
        atomic rename already keeps unfinished saves out of the step list. With
        `set_aside` (this run's own checkpoints), the newer unreadable ones are then
        renamed `unreadable-<step>`: left in the list, orbax would skip every save up to
        their step, and the run could never pass them. Nothing is set aside when no
        checkpoint restores.
        """
        unreadable = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data_state = self.restore(step, abstract_state)
            except ConfigError:
                raise  # an intact checkpoint of another model: falling back cannot help
            except CheckpointError as e:  # failed twice, and no stop request: damaged
                log.warning('checkpoint at step %d in %s cannot be restored (%s); '
                            'falling back to the previous one', step, self.directory,
                            _one_line(e.__cause__ or e))
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
        """Renames the checkpoints of `steps` to unreadable-<step> (kept, for a person to
        look at or move back), so that orbax lists and saves past them."""
        if jax.process_index() == 0:
            for step in steps:
                target = os.path.join(self.directory, f'unreadable-{step}')
                n = 1
                while os.path.exists(target):
                    target = os.path.join(self.directory, f'unreadable-{step}-{n}')
                    n += 1
                os.replace(os.path.join(self.directory, str(step)), target)
                log.warning('moved the unreadable checkpoint at step %d aside to %s', step,
                            target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices('clusiam_jax: unreadable checkpoints')
        self.manager.reload()

    def wait(self):
        """Until the asynchronous saves are on disk."""
        self._writing(self.manager.wait_until_finished)

    def close(self):
        self._writing(self.manager.wait_until_finished)
        self.manager.close()

    def _writing(self, call):
        """`call()`; an OS error of a save that names no file (orbax writes its metadata
        in background threads, whose errors surface here or at the next save) is raised
        again naming this checkpoint folder, so the one-line error says where."""
        try:
            return call()
        except OSError as e:
            if e.filename is None and e.errno is not None:
                raise OSError(e.errno, e.strerror or os.strerror(e.errno),
                              self.directory) from e
            raise


def _one_line(error, limit=300):
    return f'{type(error).__name__}: ' + ' '.join(str(error).split())[:limit]


def leaf_name(path) -> str:
    """'params/encoder/.../kernel' for a pytree key path: on disk attributes and
    namedtuple fields are dict keys, so paths are named alike in a state and in its
    stored metadata."""
    def name(entry):
        for attr in ('key', 'name', 'idx'):
            if hasattr(entry, attr):
                return str(getattr(entry, attr))
        return str(entry)
    return '/'.join(name(e) for e in path)


def _shapes_by_path(tree):
    """{'params/encoder/.../kernel': shape} for a state or its stored metadata."""
    return {leaf_name(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}

