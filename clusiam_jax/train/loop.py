"""The training loop. Work between epochs is done by hooks (train/monitor.py): `hook(epoch, step,
state, data_state)` -> (metrics named as in TensorBoard, a reason to stop or None)."""
import contextlib
import itertools
import logging
import math
import signal
import time

import jax
from jax.experimental import multihost_utils
from tqdm import tqdm

from clusiam_jax import interrupts, parallel, run_dir, storage, workdir_lock
from clusiam_jax.checkpoint import Checkpointer
from clusiam_jax.config import config_changes, validate
from clusiam_jax.data import create_train_loader, stain_norm
from clusiam_jax.errors import CheckpointError
from clusiam_jax.models import METHOD_SPECS
from clusiam_jax.models.conv import resolve_conv_impl
from clusiam_jax.train import init_from
from clusiam_jax.train.metrics import (
    EpochStats,
    InputTelemetry,
    MetricWriter,
    SkippedSteps,
    collapse_warnings,
    input_line,
)
from clusiam_jax.train.monitor import MonitorHook
from clusiam_jax.train.prefetch import prefetch_to_device
from clusiam_jax.train.saveable import check_saveable
from clusiam_jax.train.trainer import build_trainer

log = logging.getLogger('clusiam_jax')


class _StopRequest:
    """Stop at this step: a signal here or, with several processes, JAX's preemption sync point."""

    def __init__(self):
        self._multi_process = jax.process_count() > 1

    def requested(self, step: int) -> bool:
        if interrupts.received() is not None:
            if self._multi_process:
                # Only this process saw it: a save would wait for the others forever.
                raise interrupts.Interrupted(interrupts.received())
            return True
        if not self._multi_process:
            return False
        try:
            reached = multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # no preemption service in this cluster set-up
            log.warning('no preemption sync service: SIGTERM will not checkpoint this run')
            self._multi_process = False
            return False
        if reached:
            interrupts.note(signal.SIGTERM)
        return reached


def _close_writer(writer):
    """A lost lease fenced the work directory (storage.fence): this run's last events stay
    unwritten there; the one line that ends the run says why."""
    try:
        writer.close()
    except storage.Fenced:
        pass


def _restore_other_run(path, target):
    """(step, state, data_state) of train.resume_from: a run directory or a checkpoint."""
    workdir, step = run_dir.checkpoint_location(path)
    try:
        with contextlib.closing(Checkpointer(workdir, create=False)) as other:
            if step is None:
                step, state, data_state = other.restore_latest_readable(target, set_aside=False)
                if step is None:
                    raise CheckpointError(f'no checkpoint in {other.directory}')
            else:
                state, data_state = other.restore(other.checked_step(step), target)
    except CheckpointError as e:
        raise CheckpointError(f'train.resume_from={path}: {e}') from None
    log.info('starting from the checkpoint at step %d of %s (train.resume_from)', step, workdir)
    return step, state, data_state


def _record_run(workdir, config, loader):
    """config.json (naming changed keys) and normalization.json."""
    if run_dir.is_run_dir(workdir):
        changes = config_changes(run_dir.read_run_config(workdir), config)
        if changes:
            log.warning('config differs from the one this work directory last ran with: '
                        '%s; continuing with the new one (config.json)', '; '.join(changes))
    run_dir.write_run_config(workdir, config)
    stain_norm.record(workdir, getattr(loader, 'transform', None))
    origin = getattr(loader, 'normalization_origin', 'given by the caller of train()')
    normalization = run_dir.Normalization(tuple(loader.mean), tuple(loader.std), origin)
    recorded = run_dir.read_normalization(workdir)
    if recorded is not None and (recorded.mean, recorded.std) != (normalization.mean,
                                                                  normalization.std):
        log.warning('the normalization differs from the one this run started with '
                    '(%s); the checkpoints so far were trained with that one', recorded.to_json())
    run_dir.write_normalization(workdir, normalization)


def _restore(config, workdir, trainer, ckpt, loader):
    """(state, data state or None): the latest checkpoint, train.resume_from's, or fresh."""
    target, total_steps = trainer.abstract_state(), loader.steps_per_epoch * config.train.num_epochs
    latest, restored, data_state = ckpt.restore_latest_readable(target)
    if latest is None and config.train.resume_from:
        latest, restored, data_state = _restore_other_run(config.train.resume_from, target)
    if latest is None:  # before config.json: weights that do not fit leave no trace
        restored, _ = init_from.initial_state(trainer)
    elif config.train.init_from:
        log.info('train.init_from=%s is not applied: this run resumes from its checkpoint '
                 '(init_from only starts a fresh run)', config.train.init_from)
    if jax.process_index() == 0:  # only now: a config the checkpoints refuse keeps the run's
        _record_run(workdir, config, loader)
    if latest is None:
        return restored, None
    if latest >= total_steps:
        log.info('run in %s is complete (step %d of %d); nothing to do', workdir, latest,
                 total_steps)
    else:
        log.info('resuming from the checkpoint at step %d of %d (epoch %d of %d, %d steps in)',
                 latest, total_steps, latest // loader.steps_per_epoch + 1,
                 config.train.num_epochs, latest % loader.steps_per_epoch)
    return restored, data_state


def train(config, workdir: str, loader=None, mesh=None):
    """The final (or signal-checkpointed) state; default loader: data.path's, mesh: all devices."""
    mesh = parallel.make_mesh() if mesh is None else mesh
    validate(config, num_devices=mesh.devices.size, check_data_path=loader is None)
    storage.makedirs(workdir)  # a bucket: only the bucket must exist
    interrupts.check()  # safe points: a signal before the loop stops the command here
    # The monitor's slides and patch transform: only the data pipeline's own loader has them.
    held_out = transform = None
    if loader is None:
        # A resumed run keeps the normalization it started with, whatever the data now.
        recorded = run_dir.read_normalization(workdir) if config.data.mean is None else None
        loader = create_train_loader(config, workdir=workdir, process_index=jax.process_index(),
                                     process_count=jax.process_count(), recorded=recorded)
        held_out, transform = loader.held_out, loader.transform
    interrupts.check()
    log.info('building %s (%s, %d clusters) and its initial state on %d devices', config.model.name,
             config.model.backbone, config.model.num_clusters, mesh.devices.size)
    trainer = build_trainer(config, mesh, loader.steps_per_epoch, loader.mean, loader.std)
    steps_per_epoch, num_epochs = loader.steps_per_epoch, config.train.num_epochs
    total_steps, is_main = steps_per_epoch * num_epochs, jax.process_index() == 0
    # Closed in reverse: the bar and the signal deferral, the writer, the iterator, hooks, ckpt.
    with contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(contextlib.closing(
            Checkpointer(workdir, config.train.keep_checkpoints)))
        hooks = []
        if config.monitor.every_epochs:
            hooks.append(stack.enter_context(contextlib.closing(
                MonitorHook(config, workdir, trainer, held_out, ckpt, transform))))
        interrupts.check()
        state, data_state = _restore(config, workdir, trainer, ckpt, loader)
        interrupts.check()
        if int(jax.device_get(state.step)) >= total_steps:
            return state
        iterator = loader.iterator()
        if data_state is not None:
            iterator.set_state(data_state)
        if hasattr(iterator, 'close'):
            stack.callback(iterator.close)
        if hasattr(loader, 'close'):   # the read-ahead threads stop with the loop
            stack.callback(loader.close)
        batches = prefetch_to_device(iterator, parallel.batch_sharded(mesh),
                                     config.data.prefetch, with_state=True)
        writer = MetricWriter(workdir, enabled=is_main)
        stack.callback(_close_writer, writer)
        # Bucket reads of this process's batches (process 0 logs its own: hosts read alike).
        reads = InputTelemetry(iterator, loader)
        head = next(batches)
        log.info('compiling the train step (%s, %s, %s on %s convolutions, batch %d at %d px on '
                 '%d devices); the first compile takes a while', config.model.name,
                 config.model.backbone, config.model.dtype,
                 resolve_conv_impl(config.model.conv_impl, config.model.dtype),
                 config.train.batch_size, config.data.image_size, mesh.devices.size)
        step_fn, seconds = trainer.compile(state, head[0])
        log.info('compiled in %.1f s', seconds)
        interrupts.check()
        batches = itertools.chain([head], batches)
        if is_main:
            log.info('TensorBoard: tensorboard --logdir %s', writer.tb_dir)
        step, data_state = int(jax.device_get(state.step)), None
        log_every = max(1, config.train.log_every_steps)
        skips = (SkippedSteps(workdir, config.train.max_consecutive_skips, write=is_main)
                 if config.train.on_nonfinite == 'skip' else None)
        stop = _StopRequest()
        # Moved at log steps, after the fetch: counting async dispatches swings the ETA.
        bar = tqdm(total=total_steps, initial=step, unit='step', disable=not is_main,
                   dynamic_ncols=True, smoothing=0.1)

        def stop_here(reason, saved, resume=True):
            # A lost lease asks to stop as SIGTERM does: then nothing more is saved.
            workdir_lock.check_lease(workdir)
            if not saved:
                stats.flush()  # never checkpoint a non-finite state
                check_saveable(state, step, ckpt)
                ckpt.save(step, state, data_state)
            ckpt.wait()  # inside the deferral: a signal now cannot cut the save short
            bar.update(step - synced)
            log.warning('%s: saved a checkpoint at step %d of %d and stopped%s', reason, step,
                        total_steps, '; start the same command again to resume' * resume)
            return state
        stack.enter_context(interrupts.deferred(enabled=jax.process_count() == 1))
        stack.enter_context(contextlib.closing(bar))
        for epoch in range(step // steps_per_epoch, num_epochs):
            stats = EpochStats(skips)
            first = synced = step
            end = (epoch + 1) * steps_per_epoch
            bar.set_description(f'epoch {epoch + 1}/{num_epochs}')
            start_time = time.perf_counter()
            while step < end:
                try:
                    batch, data_state = next(batches)
                except StopIteration:
                    raise RuntimeError(f'the data iterator ended at step {step}, before '
                                       f'the {total_steps} steps of the run') from None
                state, metrics = step_fn(state, batch)
                stats.add(step, metrics)
                step += 1
                if step % log_every == 0 or step == end:
                    window = stats.flush()
                    elapsed = time.perf_counter() - start_time
                    rate = (step - first) * config.train.batch_size / max(elapsed, 1e-9)
                    bar.update(step - synced)
                    synced = step
                    loss = window.get('loss', math.nan)
                    bar.set_postfix(loss=f'{loss:.4f}', pairs_s=f'{rate:.1f}')
                    writer.scalars(step, window)
                    window_reads = reads.window()
                    if window_reads is not None:
                        writer.scalars(step, window_reads, prefix='input/')
                if step < end and stop.requested(step):
                    return stop_here(signal.Signals(interrupts.received()).name, saved=False)
            # The epoch is complete: its row and checkpoint first, then a pending stop; none
            # of them once another command took the work directory over (the lease renewed
            # here gives them a whole lease to finish in).
            elapsed = time.perf_counter() - start_time   # the hooks' time is their own
            workdir_lock.check_lease(workdir)
            hooked, stops = {}, []
            for hook in hooks:
                metrics, reason = hook(epoch + 1, step, state, data_state)
                hooked.update(metrics)
                stops += [reason] if reason else []
            means = stats.means()
            row = dict(means, epoch=epoch + 1, step=step, time_s=round(elapsed, 3),
                       pairs_per_s=round((step - first) * config.train.batch_size / elapsed, 3))
            row.update({k.replace('/', '_'): v for k, v in hooked.items()})
            row.update(reads.epoch())
            writer.epoch_row(row)
            writer.scalars(epoch + 1, {'epoch/pairs_per_s': row['pairs_per_s'], **hooked},
                           prefix='')
            if is_main:
                log.info('epoch %d/%d: %s%s', epoch + 1, num_epochs,
                         ', '.join(f'{k}={v:.4g}' for k, v in sorted(means.items())),
                         input_line(row))
            # Logits start near uniform: judge collapse only after a full epoch.
            if is_main and METHOD_SPECS[config.model.name].has_cluster_head and epoch > 0:
                samples = stats.count * 2 * config.train.batch_size  # assignments in the means
                for warning in collapse_warnings(means, config.model.num_clusters, samples):
                    log.warning('epoch %d: %s', epoch + 1, warning)
            every = config.train.checkpoint_every_epochs
            saved = (bool(stops) or step == total_steps
                     or (every > 0 and (epoch + 1) % every == 0))
            if saved:
                check_saveable(state, step, ckpt)
                ckpt.save(step, state, data_state)
            if stops:
                return stop_here('; '.join(stops), saved=True, resume=False)
            if stop.requested(step):
                return stop_here(signal.Signals(interrupts.received()).name, saved)
        ckpt.wait()
        return state
