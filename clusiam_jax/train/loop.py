"""The training loop: build, restore, compile, run epochs, log, checkpoint, stop, resume.

A run lives in its work directory. Started again on the same directory it resumes from
the latest checkpoint (state and data iterator), and a finished run says so and returns.
SIGTERM or Ctrl-C during training finishes the step in flight, saves a checkpoint and
returns (clusiam_jax/interrupts.py).
"""
import contextlib
import itertools
import json
import logging
import math
import os
import signal
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from clusiam_jax import data as data_lib
from clusiam_jax import interrupts, parallel, run_dir
from clusiam_jax.checkpoint import BEST_DIR, BEST_JSON, Checkpointer
from clusiam_jax.config import best_mode, config_changes, validate
from clusiam_jax.errors import CheckpointError, ConfigError
from clusiam_jax.models import METHOD_SPECS
from clusiam_jax.train import init_from
from clusiam_jax.train.metrics import (
    TB_DIR,
    EpochStats,
    MetricWriter,
    SkippedSteps,
    collapse_warnings,
)
from clusiam_jax.train.saveable import check_saveable
from clusiam_jax.train.trainer import build_trainer

log = logging.getLogger('clusiam_jax')


class _StopRequest:
    """Whether the loop should checkpoint at the current step and stop.

    One process: SIGTERM or SIGINT (interrupts.deferred) sets a flag the loop polls after
    every step. Several processes must all save at the same step: there JAX's preemption
    sync (jax.distributed turns a SIGTERM on any host into an agreed step, the same
    service orbax uses on TPU) decides, polled every step, and is recorded as a SIGTERM;
    Ctrl-C stops such a run at once, without a checkpoint.
    """

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
            log.warning('no preemption sync service: SIGTERM will not checkpoint this '
                        'multi-process run')
            self._multi_process = False
            return False
        if reached:
            interrupts.note(signal.SIGTERM)
        return reached

    @staticmethod
    def reason() -> str:
        return signal.Signals(interrupts.received()).name


def _restore_other_run(path, target):
    """(step, state, data_state) from another run's directory (its latest readable
    checkpoint) or from one of its `checkpoints/<step>` folders: train.resume_from, for a
    new work directory that continues (or forks) an earlier run."""
    workdir, step = run_dir.checkpoint_location(path)
    try:
        with contextlib.closing(Checkpointer(workdir, create=False)) as other:
            if step is None:
                step, state, data_state = other.restore_latest_readable(target,
                                                                        set_aside=False)
                if step is None:
                    raise CheckpointError(f'no checkpoint in {other.directory}')
            else:
                state, data_state = other.restore(other.checked_step(step), target)
    except CheckpointError as e:
        raise CheckpointError(f'train.resume_from={path}: {e}') from None
    log.info('starting from the checkpoint at step %d of %s (train.resume_from)', step, workdir)
    return step, state, data_state


def _record_run(workdir, config, loader):
    """config.json (naming the keys that changed since the run's last start) and the
    normalization the run trains with (normalization.json)."""
    if run_dir.is_run_dir(workdir):
        changes = config_changes(run_dir.read_run_config(workdir), config)
        if changes:
            log.warning('config differs from the one this work directory last ran with: '
                        '%s; continuing with the new one (config.json)', '; '.join(changes))
    run_dir.write_run_config(workdir, config)
    origin = getattr(loader, 'normalization_origin', 'given by the caller of train()')
    normalization = run_dir.Normalization(tuple(loader.mean), tuple(loader.std), origin)
    recorded = run_dir.read_normalization(workdir)
    if recorded is not None and (recorded.mean, recorded.std) != (normalization.mean,
                                                                  normalization.std):
        log.warning('the normalization differs from the one this run started with '
                    '(%s); the checkpoints so far were trained with that one', recorded.to_json())
    run_dir.write_normalization(workdir, normalization)


def train(config, workdir: str, loader=None, mesh=None):
    """Trains per `config` in `workdir`; returns the final TrainState.

    `loader` defaults to the data pipeline for `config.data.path`; tests may inject one
    with the same interface (steps_per_epoch, mean, std, iterator()). `mesh` defaults to
    all devices. A run stopped by SIGTERM or Ctrl-C returns the state it checkpointed;
    `interrupts.received()` then says which signal stopped it.
    """
    mesh = parallel.make_mesh() if mesh is None else mesh
    validate(config, num_devices=mesh.devices.size, check_data_path=loader is None)
    os.makedirs(workdir, exist_ok=True)
    # Safe points (interrupts.py): a signal before the training loop stops the command
    # at the next one, never inside a library call.
    interrupts.check()
    if loader is None:
        # A resumed run keeps the normalization it started with, whatever the data now.
        recorded = run_dir.read_normalization(workdir) if config.data.mean is None else None
        loader = data_lib.create_train_loader(config, workdir=workdir,
                                              process_index=jax.process_index(),
                                              process_count=jax.process_count(),
                                              recorded=recorded)
    interrupts.check()
    # Seconds to minutes on a CPU with nothing else said: say what is happening.
    log.info('building %s (%s, %d clusters) and its initial state on %d devices',
             config.model.name, config.model.backbone, config.model.num_clusters,
             mesh.devices.size)
    trainer = build_trainer(config, mesh, loader.steps_per_epoch, loader.mean, loader.std)
    run = _Run(config, workdir, trainer, loader.steps_per_epoch)
    run.monitor = _build_monitor(config, loader, trainer)
    interrupts.check()
    with contextlib.closing(Checkpointer(workdir, config.train.keep_checkpoints)) as ckpt, \
            contextlib.closing(_BestCheckpoint(workdir, config)) as best:
        run.best = best
        state, data_state = run.restore(ckpt, loader)
        interrupts.check()
        if int(jax.device_get(state.step)) >= run.total_steps:
            return state
        iterator = loader.iterator()
        if data_state is not None:
            iterator.set_state(data_state)
        try:
            batches = data_lib.prefetch_to_device(iterator, parallel.batch_sharded(mesh),
                                                  config.data.prefetch, with_state=True)
            with contextlib.closing(MetricWriter(workdir, enabled=run.is_main)) as writer:
                return run.epochs(state, batches, ckpt, writer)
        finally:
            if hasattr(iterator, 'close'):
                iterator.close()


def _build_monitor(config, loader, trainer):
    """The monitor (train/monitor.py) of a run with monitor.every_epochs, else None."""
    mon = config.monitor
    if not mon.every_epochs:
        return None
    from clusiam_jax.data import sources as sources_lib
    from clusiam_jax.train import monitor as monitor_lib
    if mon.data_path:
        records, source = sources_lib.open_source(mon.data_path, config.data.slide_dir)
        pool = np.arange(len(records))
    elif getattr(loader, 'monitor_source', None) is not None:
        records, source, pool = loader.monitor_source
    else:
        raise ConfigError("monitor.holdout holds out slides of the data pipeline's source; "
                          'this run was given its own loader: use monitor.data_path')
    seed = int(config.train.seed)
    chosen = pool[monitor_lib.sample_indices(len(pool), int(mon.num_patches), seed)]
    monitor_set = monitor_lib.build_monitor_set(records, source, chosen, config, seed)
    metric = config.train.best_metric.removeprefix('monitor/')
    if metric.startswith('knn') and (monitor_set.labels is None or
                                     len(set(monitor_set.slides)) < 2):
        raise ConfigError(f'train.best_metric={config.train.best_metric} needs a monitor set '
                          f'with labels on every patch and at least 2 slides')
    log.info('monitor: %d patches (%s), every %d epochs%s', len(monitor_set.images),
             mon.data_path or f'{mon.holdout:g} of the training slides held out',
             mon.every_epochs, '' if monitor_set.labels is None else ', with labels (kNN)')
    return monitor_lib.Monitor(trainer.network, trainer.mean, trainer.std, monitor_set,
                               trainer.mesh, config.model.num_clusters,
                               float(mon.min_rankme), seed)


def _last_step(ckpt):
    """The newest checkpoint step on disk (or being written), or None."""
    steps = ckpt.all_steps()
    return steps[-1] if steps else None


class _BestCheckpoint:
    """train.best_metric: the best state so far in best_checkpoint/ (one kept) and
    best_checkpoint.json; the latest checkpoints are kept as usual, and resume uses them."""

    def __init__(self, workdir, config):
        self.workdir, self.metric = workdir, config.train.best_metric
        self.mode = best_mode(config.train)
        # Every process saves (orbax writes each one's shards); process 0 writes the json.
        self.ckpt = Checkpointer(workdir, 1, subdir=BEST_DIR) if self.metric else None
        recorded = run_dir.read_best(workdir) if self.metric else None
        same = recorded and (recorded['metric'], recorded.get('mode')) == (self.metric,
                                                                           self.mode)
        self.value = recorded['value'] if same else None

    def better(self, value) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if self.value is None:
            return True
        return value > self.value if self.mode == 'max' else value < self.value

    def offer(self, step, epoch, scores, state, data_state):
        """Saves `state` as the best when its score beats the best so far."""
        if self.ckpt is None or scores.get('collapse'):   # never keep a collapsed state
            return
        value = scores.get(self.metric.removeprefix('monitor/'))
        if not self.better(value):
            return
        # A run resumed from before an earlier best replays steps: orbax only saves steps
        # beyond the last it holds, so the old best goes first.
        for old in self.ckpt.all_steps():
            if old >= step:
                self.ckpt.manager.delete(old)
        if not self.ckpt.manager.save(step, args=self.ckpt.save_args(state, data_state)):
            raise CheckpointError(f'the best checkpoint at step {step} was not saved')
        self.ckpt.wait()
        self.value = value
        if jax.process_index() == 0:
            run_dir.write_text_atomically(
                os.path.join(self.workdir, BEST_JSON),
                json.dumps({'step': step, 'epoch': epoch, 'metric': self.metric,
                            'value': value, 'mode': self.mode}, indent=1))
            log.info('best checkpoint: step %d (%s %.4g)', step, self.metric, value)

    def close(self):
        if self.ckpt is not None:
            self.ckpt.close()


class _Run:
    """One start of a run: what it restores, compiles and trains, and how it reports."""

    def __init__(self, config, workdir, trainer, steps_per_epoch):
        self.config, self.workdir, self.trainer = config, workdir, trainer
        self.steps_per_epoch = steps_per_epoch
        self.num_epochs = config.train.num_epochs
        self.total_steps = steps_per_epoch * self.num_epochs
        self.is_main = jax.process_index() == 0
        self.has_cluster_head = METHOD_SPECS[config.model.name].has_cluster_head
        self.monitor, self.best = None, None

    def restore(self, ckpt, loader):
        """(state, data iterator state or None): the latest readable checkpoint, else
        train.resume_from's, else a fresh state (created only then, with train.init_from's
        weights when set). Records config and normalization."""
        config = self.config
        target = self.trainer.abstract_state()
        latest, restored, data_state = ckpt.restore_latest_readable(target)
        if latest is None and config.train.resume_from:
            latest, restored, data_state = _restore_other_run(config.train.resume_from, target)
        if latest is None:  # before config.json: weights that do not fit leave no trace
            restored, _ = init_from.initial_state(self.trainer)
        elif config.train.init_from:
            log.info('train.init_from=%s is not applied: this run resumes from its checkpoint '
                     '(init_from only starts a fresh run)', config.train.init_from)
        if self.is_main:  # only now: a config the checkpoints refuse must not replace the run's
            _record_run(self.workdir, config, loader)
        if latest is None:
            return restored, None
        if latest >= self.total_steps:
            log.info('run in %s is complete (step %d of %d); nothing to do', self.workdir,
                     latest, self.total_steps)
        else:
            log.info('resuming from the checkpoint at step %d of %d (epoch %d of %d, '
                     '%d steps in)', latest, self.total_steps,
                     latest // self.steps_per_epoch + 1, self.num_epochs,
                     latest % self.steps_per_epoch)
        return restored, data_state

    def compile_on_first_batch(self, state, batches):
        """(compiled step, the batches with the first one put back). Said out loud: the
        first compile of a ResNet step takes seconds to minutes and looks like a hang."""
        config, mesh = self.config, self.trainer.mesh
        first = next(batches)
        log.info('compiling the train step (%s, %s, batch %d at %d px on %d devices); the '
                 'first compile takes a while', config.model.name, config.model.backbone,
                 config.train.batch_size, config.data.image_size, mesh.devices.size)
        step_fn, seconds = self.trainer.compile(state, first[0])
        log.info('compiled in %.1f s', seconds)
        interrupts.check()
        return step_fn, itertools.chain([first], batches)

    def epochs(self, state, batches, ckpt, writer):
        config, is_main = self.config, self.is_main
        step_fn, batches = self.compile_on_first_batch(state, batches)
        if is_main:
            log.info('TensorBoard: tensorboard --logdir %s',
                     os.path.join(self.workdir, TB_DIR))
        step = int(jax.device_get(state.step))
        log_every = max(1, config.train.log_every_steps)
        pairs_per_step = config.train.batch_size
        data_state = None
        skips = (SkippedSteps(self.workdir, config.train.max_consecutive_skips, write=is_main)
                 if config.train.on_nonfinite == 'skip' else None)
        stop = _StopRequest()
        # One bar over the whole run, moved only at log steps after the metrics are
        # fetched: steps are dispatched asynchronously, so counting dispatches would make
        # the ETA swing.
        bar = tqdm(total=self.total_steps, initial=step, unit='step', disable=not is_main,
                   dynamic_ncols=True, smoothing=0.1)

        def stop_here(saved):
            if not saved:
                stats.flush()  # never checkpoint a non-finite state
                self.save(ckpt, step, state, data_state)
            ckpt.wait()  # inside the deferral: a signal now cannot cut the save short
            bar.update(step - synced)
            log.warning('%s: saved a checkpoint at step %d of %d and stopped; start the '
                        'same command again to resume', stop.reason(), step, self.total_steps)
            return state

        with interrupts.deferred(enabled=jax.process_count() == 1), contextlib.closing(bar):
            for epoch in range(step // self.steps_per_epoch, self.num_epochs):
                stats = EpochStats(skips)
                first = synced = step
                end = (epoch + 1) * self.steps_per_epoch
                bar.set_description(f'epoch {epoch + 1}/{self.num_epochs}')
                start_time = time.perf_counter()
                while step < end:
                    try:
                        batch, data_state = next(batches)
                    except StopIteration:
                        raise RuntimeError(f'the data iterator ended at step {step}, before '
                                           f'the {self.total_steps} steps of the run') from None
                    state, metrics = step_fn(state, batch)
                    stats.add(step, metrics)
                    step += 1
                    if step % log_every == 0 or step == end:
                        window = stats.flush()
                        elapsed = time.perf_counter() - start_time
                        rate = (step - first) * pairs_per_step / max(elapsed, 1e-9)
                        bar.update(step - synced)
                        synced = step
                        bar.set_postfix(loss=f"{window.get('loss', math.nan):.4f}",
                                        pairs_s=f'{rate:.1f}')
                        writer.scalars(step, window)
                    if step < end and stop.requested(step):
                        return stop_here(saved=False)
                # The epoch is complete: its row and checkpoint first, then a pending stop.
                elapsed = time.perf_counter() - start_time   # the monitor's time is its own
                scores = self.monitor_epoch(epoch, state)
                self.end_epoch(epoch, stats, step, first, elapsed, writer, scores)
                every = config.train.checkpoint_every_epochs
                saved = (every > 0 and (epoch + 1) % every == 0) or step == self.total_steps
                collapsed = bool(scores) and scores['collapse'] and config.train.stop_on_collapse
                if scores or saved or collapsed:
                    check_saveable(state, step, _last_step(ckpt))
                if scores:
                    self.best.offer(step, epoch + 1, scores, state, data_state)
                if saved or collapsed:
                    ckpt.save(step, state, data_state)
                if collapsed:
                    ckpt.wait()
                    bar.update(step - synced)
                    log.warning('train.stop_on_collapse: the monitor flags collapse at epoch '
                                '%d (%s); saved a checkpoint at step %d and stopped', epoch + 1,
                                '; '.join(self.monitor.warnings), step)
                    return state
                if stop.requested(step):
                    return stop_here(saved)
            ckpt.wait()
        return state

    @staticmethod
    def save(ckpt, step, state, data_state):
        check_saveable(state, step, _last_step(ckpt))
        ckpt.save(step, state, data_state)

    def monitor_epoch(self, epoch, state):
        """The monitor's scores at this epoch (every monitor.every_epochs and the last),
        else {}; the monitor's time is in the scores as `seconds`."""
        every = self.config.monitor.every_epochs
        if self.monitor is None or not ((epoch + 1) % every == 0 or
                                        epoch + 1 == self.num_epochs):
            return {}
        start = time.perf_counter()
        scores = self.monitor.scores({'params': state.params,
                                      'batch_stats': state.batch_stats},
                                     judge_clusters=epoch > 0)
        scores['seconds'] = round(time.perf_counter() - start, 3)
        return scores

    def end_epoch(self, epoch, stats, step, first, elapsed, writer, scores=None):
        """The epoch's CSV row, TensorBoard scalars, log lines and collapse warnings."""
        pairs_per_step = self.config.train.batch_size
        means = stats.means()
        row = dict(means, epoch=epoch + 1, step=step, time_s=round(elapsed, 3),
                   pairs_per_s=round((step - first) * pairs_per_step / elapsed, 3))
        row.update({f'monitor_{k}': v for k, v in (scores or {}).items()})
        writer.epoch_row(row)
        writer.scalars(epoch + 1, {'pairs_per_s': row['pairs_per_s']}, prefix='epoch/')
        if scores:
            writer.scalars(epoch + 1, scores, prefix='monitor/')
        if not self.is_main:
            return
        log.info('epoch %d/%d: %s', epoch + 1, self.num_epochs,
                 ', '.join(f'{k}={v:.4g}' for k, v in sorted(means.items())))
        if scores:
            log.info('epoch %d monitor: %s', epoch + 1,
                     ', '.join(f'{k}={v:.4g}' for k, v in sorted(scores.items())))
            for warning in self.monitor.warnings:
                log.warning('epoch %d monitor: %s', epoch + 1, warning)
        # Logits start near uniform: judge collapse only after a full epoch.
        if self.has_cluster_head and epoch > 0:
            samples = stats.count * 2 * pairs_per_step  # assignments in the means
            for warning in collapse_warnings(means, self.config.model.num_clusters, samples):
                log.warning('epoch %d: %s', epoch + 1, warning)
