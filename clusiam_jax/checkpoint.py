"""Orbax checkpoints of a run: the train state plus the data iterator's state.

Checkpoints live in `<workdir>/checkpoints/<step>/`, are written asynchronously and
atomically (orbax writes to a temporary directory and renames it), and the last
`train.keep_checkpoints` are kept. Restoring takes an abstract target carrying the
shardings of the current mesh, so optax states come back as their own types and the
state lands on however many devices this run has.
"""
import logging
import os

import jax
import orbax.checkpoint as ocp


log = logging.getLogger('clusiam_jax')


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), 'checkpoints')


class Checkpointer:
    def __init__(self, workdir: str, max_to_keep: int = 3):
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=True)
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, state, data_state=None):
        items = {'state': ocp.args.StandardSave(state)}
        if data_state is not None:
            items['data'] = ocp.args.JsonSave(data_state)
        self.manager.save(step, args=ocp.args.Composite(**items))

    def restore(self, step: int, abstract_state):
        """Returns (state, data_state or None) placed as `abstract_state`'s shardings."""
        items = {'state': ocp.args.StandardRestore(abstract_state)}
        # Each item is a sub-directory of the step's directory (asking orbax for the item
        # metadata instead warns about every item it was not given a handler for).
        has_data = os.path.isdir(os.path.join(self.directory, str(step), 'data'))
        if has_data:
            items['data'] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored['state'], (restored['data'] if has_data else None)

    def restore_latest_readable(self, abstract_state):
        """(step, state, data_state) of the newest checkpoint that restores, else Nones.

        A checkpoint cut short by a crash (kill -9 mid-write, a full disk) or damaged
        later is skipped with a warning, falling back to the one before it; orbax's
        atomic rename already keeps unfinished saves out of the step list.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data_state = self.restore(step, abstract_state)
                return step, state, data_state
            except Exception as e:  # noqa: BLE001 - any failure means: not usable
                reason = ' '.join(str(e).split())[:300]
                log.warning('checkpoint at step %d in %s cannot be restored (%s: %s); '
                            'falling back to the previous one', step, self.directory,
                            type(e).__name__, reason)
        if self.manager.all_steps():
            raise RuntimeError(f'no checkpoint in {self.directory} can be restored; move '
                               f'the folder away to start afresh')
        return None, None, None

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state):
    """ShapeDtypeStructs with the shardings of `state` (a restore target)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
