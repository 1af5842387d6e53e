"""Orbax checkpoints (train state, data iterator state) in `<workdir>/checkpoints/<step>/`."""
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
BEST_DIR = 'best_checkpoint'  # by train.best_metric; BEST_JSON says its step and value
BEST_JSON = 'best_checkpoint.json'


class Checkpointer:
    def __init__(self, workdir: str, max_to_keep: int = 3, create: bool = True,
                 subdir: str = LATEST_DIR):
        self.directory = os.path.join(os.path.abspath(workdir), subdir)
        if not create and not os.path.isdir(self.directory):
            if subdir == BEST_DIR:
                raise CheckpointError(f'{workdir} has no best checkpoint (train with '
                                      f'train.best_metric and the monitor to keep one)')
            raise CheckpointError(f'{workdir} has no checkpoints/ folder: train first, or '
                                  f'point at a run')
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self):
        return sorted(self.manager.all_steps())

    def checked_step(self, step=None) -> int:
        steps = self.all_steps()
        if not steps and os.path.basename(self.directory) == BEST_DIR:
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
        items = {'state': ocp.args.StandardSave(state)}
        if data_state is not None:
            items['data'] = ocp.args.JsonSave(data_state)
        if not self._writing(lambda: self.manager.save(step, args=ocp.args.Composite(**items))):
            raise CheckpointError(f'the checkpoint at step {step} was not written: '
                                  f'{self.directory} already lists step {max(self.all_steps())}')

    def restore(self, step: int, abstract_state):
        """(state, data_state or None); ConfigError first for another model or optimizer."""
        self._check_shapes(step, abstract_state)
        items = {'state': ocp.args.StandardRestore(abstract_state)}
        # Items are sub-directories (orbax's item metadata warns about unhandled items).
        has_data = os.path.isdir(os.path.join(self.directory, str(step), 'data'))
        if has_data:
            items['data'] = ocp.args.JsonRestore()
        restored = self._read(step, lambda: self.manager.restore(
            step, args=ocp.args.Composite(**items)))
        return restored['state'], (restored['data'] if has_data else None)

    def restore_weights(self, step: int, abstract_weights: dict) -> dict:
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

    def _read(self, step, read):
        """`read()`, retried once: damage only if it fails twice and is no stop request."""
        for attempt in (1, 2):
            try:
                return read()
            except Exception as e:  # orbax and tensorstore raise many kinds
                interrupts.check()  # an interrupted read says nothing about the file
                if attempt == 2:
                    raise CheckpointError(f'the checkpoint at step {step} in {self.directory} '
                                          f'cannot be read ({one_line(e)})') from e
                log.warning('reading the checkpoint at step %d in %s failed (%s); trying '
                            'again in 1 s', step, self.directory, one_line(e))
                time.sleep(1.0)  # a passing failure (a network file system) passes
                interrupts.check()

    def _state_path(self, step):
        return epath.Path(self.directory) / str(step) / 'state'

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
        damaged ones become `unreadable-<step>` (orbax would skip every save up to them)."""
        unreadable = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data_state = self.restore(step, abstract_state)
            except ConfigError:
                raise  # an intact checkpoint of another model: falling back cannot help
            except CheckpointError as e:  # failed twice, and no stop request: damaged
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
                target = os.path.join(self.directory, f'unreadable-{step}')
                n = 1
                while os.path.exists(target):
                    target = os.path.join(self.directory, f'unreadable-{step}-{n}')
                    n += 1
                os.replace(os.path.join(self.directory, str(step)), target)
                log.warning('moved the unreadable checkpoint at step %d aside to %s', step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices('clusiam_jax: unreadable checkpoints')
        self.manager.reload()

    def wait(self):
        self._writing(self.manager.wait_until_finished)

    def close(self):
        self.wait()
        self.manager.close()

    def _writing(self, call):
        try:  # an OS error naming no file (orbax's background writes) names this folder
            return call()
        except OSError as e:
            if e.filename is None and e.errno is not None:
                raise OSError(e.errno, e.strerror or os.strerror(e.errno), self.directory) from e
            raise


def one_line(error, limit=300):
    return f'{type(error).__name__}: ' + ' '.join(str(error).split())[:limit]


def leaf_name(path) -> str:  # 'params/encoder/.../kernel'
    return jax.tree_util.keystr(path, simple=True, separator='/')


def _shapes_by_path(tree):
    return {leaf_name(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
