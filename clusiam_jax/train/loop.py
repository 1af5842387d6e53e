"""The training loop: build, restore, run epochs, log, checkpoint, resume.

A run lives in its work directory. Started again on the same directory it resumes from
the latest checkpoint (state and data iterator), and a finished run says so and returns.
"""
import collections
import logging
import math
import os
import signal
import threading
import time

import jax
from jax.experimental import multihost_utils
from tqdm import tqdm

from clusiam_jax import data as data_lib
from clusiam_jax import parallel, run_dir
from clusiam_jax.checkpoint import Checkpointer, abstract_like
from clusiam_jax.config import validate
from clusiam_jax.models import METHOD_SPECS, build_network
from clusiam_jax.models.conv import compiler_options
from clusiam_jax.train.logging_utils import MetricWriter, collapse_warnings
from clusiam_jax.train.optimizer import ema_momentum, make_optimizer
from clusiam_jax.train.state import create_train_state
from clusiam_jax.train.step import make_train_step

log = logging.getLogger('clusiam_jax')


class NonFiniteError(FloatingPointError):
    """A NaN/Inf metric; raised before anything is checkpointed."""


class _StopRequest:
    """A preemption notice asks the loop to checkpoint at the current step and stop.

    One process: SIGTERM (what schedulers send before evicting a job) sets a flag; the
    loop finishes the step in flight, saves the state and the data iterator position,
    and returns normally (exit status 0). Several processes must all save at the same
    step: there JAX's preemption sync (jax.distributed turns a SIGTERM on any host into
    an agreed step, the same service orbax uses on TPU) decides, polled every step.
    """

    def __init__(self):
        self.signalled = False
        self._previous = None
        self._multi_process = jax.process_count() > 1

    def __enter__(self):
        if not self._multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signalled = True

    def requested(self, step: int) -> bool:
        if not self._multi_process:
            return self.signalled
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # no preemption service in this cluster set-up
            log.warning('no preemption sync service: SIGTERM will not checkpoint this '
                        'multi-process run')
            self._multi_process = False  # no handler was installed: never stops
            return False

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class SkippedSteps:
    """train.on_nonfinite='skip': the steps the train step rejected (NaN/Inf loss or
    gradient, state left as it was), each logged and appended to
    <workdir>/nonfinite_steps.txt; more than `max_in_a_row` in a row end the run, since
    a run that only skips has diverged. The count in a row restarts with the process."""

    FILE_NAME = 'nonfinite_steps.txt'

    def __init__(self, workdir: str, max_in_a_row: int, write: bool):
        self.path = os.path.join(workdir, self.FILE_NAME) if write else None
        self.max_in_a_row, self.in_a_row = max_in_a_row, 0

    def accepted(self):
        self.in_a_row = 0

    def skipped(self, step: int, metrics: dict):
        self.in_a_row += 1
        values = f"loss={float(metrics['loss'])} grad_norm={float(metrics['grad_norm'])}"
        log.warning('step %d: %s; skipped (the state is unchanged, the batch is consumed)',
                    step, values)
        if self.path:
            with open(self.path, 'a') as f:
                f.write(f'{step} {values}\n')
        if self.in_a_row > self.max_in_a_row:
            raise NonFiniteError(f'{self.in_a_row} steps in a row up to step {step} had a '
                                 f'non-finite loss or gradient (train.max_consecutive_skips='
                                 f'{self.max_in_a_row}); the last checkpoint is untouched')


class EpochStats:
    """Host-side means of the per-step metrics, fetched only at log steps.

    Without `skips`, a non-finite metric raises NonFiniteError; with it, the steps the
    train step marked `skipped` go to `skips` and are left out of the means.
    """

    def __init__(self, skips: SkippedSteps = None):
        self.pending, self.sums, self.count = [], collections.defaultdict(float), 0
        self.skips, self.skipped = skips, 0

    def add(self, step, metrics):
        self.pending.append((step, metrics))

    def flush(self):
        """Fetches the pending device metrics (a host sync) and returns their means."""
        fetched = jax.device_get([m for _, m in self.pending])
        window, n, skipped = collections.defaultdict(float), 0, 0
        for (step, _), metrics in zip(self.pending, fetched):
            if self.skips is not None:
                if metrics.pop('skipped') > 0:
                    skipped += 1
                    self.skips.skipped(step, metrics)
                    continue
                self.skips.accepted()
            for name, value in metrics.items():
                value = float(value)
                if not math.isfinite(value):
                    raise NonFiniteError(f'non-finite {name}={value} at step {step}; '
                                         f'no checkpoint was written for it')
                window[name] += value
                self.sums[name] += value
            n += 1
        self.count += n
        self.skipped += skipped
        self.pending = []
        means = {k: v / n for k, v in window.items()} if n else {}
        if self.skips is not None:
            means['skipped_steps'] = skipped
        return means

    def means(self):
        self.flush()
        means = {k: v / self.count for k, v in self.sums.items()} if self.count else {}
        if self.skips is not None:
            means['skipped_steps'] = self.skipped
        return means


def init_state(network, tx, config, mesh):
    """The initial TrainState, created on the devices already replicated."""
    spec = METHOD_SPECS[network.method]
    init = jax.jit(lambda: create_train_state(network, tx, spec.has_target, config.train.seed,
                                              config.data.image_size),
                   out_shardings=parallel.replicated(mesh))
    return init()


def compile_train_step(step, mesh, conv_impl: str):
    """jit over the mesh: state replicated (and donated), batch split along `data`,
    compiled with the options the network's conv_impl needs (models.conv)."""
    replicated = parallel.replicated(mesh)
    return jax.jit(step, in_shardings=(replicated, parallel.batch_sharded(mesh)),
                   out_shardings=(replicated, replicated), donate_argnums=0,
                   compiler_options=compiler_options(conv_impl))


def _restore_other_run(path, abstract_state):
    """(step, state, data_state) from another run's directory (its latest checkpoint) or
    from one of its `checkpoints/<step>` folders: train.resume_from, for a new work
    directory that continues (or forks) an earlier run."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    if os.path.basename(parent) == 'checkpoints' and name.isdigit():
        workdir, step = os.path.dirname(parent), int(name)
    else:
        workdir, step = path, None
    try:
        step, state, data_state = run_dir.restore_checkpoint(workdir, abstract_state, step)
    except FileNotFoundError as e:
        raise FileNotFoundError(f'train.resume_from={path}: {e}') from None
    log.info('starting from the checkpoint at step %d of %s (train.resume_from)', step, workdir)
    return step, state, data_state


def _record_config(workdir, config):
    """Writes config.json, warning when it differs from the one the run started with."""
    path = os.path.join(workdir, run_dir.CONFIG_NAME)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() != run_dir.config_text(config):
                log.warning('config differs from the one this work directory was started '
                            'with (kept in config.json); continuing with the new one')
    run_dir.write_run_config(workdir, config)


def train(config, workdir: str, loader=None, mesh=None):
    """Trains per `config` in `workdir`; returns the final TrainState.

    `loader` defaults to the data pipeline for `config.data.path`; tests may inject one
    with the same interface (steps_per_epoch, mean, std, iterator()). `mesh` defaults to
    all devices.
    """
    mesh = parallel.make_mesh() if mesh is None else mesh
    validate(config, num_devices=mesh.devices.size, check_data_path=loader is None)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if loader is None:
        loader = data_lib.create_train_loader(config, workdir=workdir,
                                              process_index=jax.process_index(),
                                              process_count=jax.process_count())

    steps_per_epoch = loader.steps_per_epoch
    num_epochs = config.train.num_epochs
    total_steps = steps_per_epoch * num_epochs
    network = build_network(config.model)
    spec = METHOD_SPECS[config.model.name]
    tx, lr_schedule = make_optimizer(config, steps_per_epoch)
    ema_schedule = ema_momentum(config, total_steps)
    batch_sharding = parallel.batch_sharded(mesh)

    state = init_state(network, tx, config, mesh)
    checkpointer = Checkpointer(workdir, config.train.keep_checkpoints)
    try:
        latest, restored, data_state = checkpointer.restore_latest_readable(
            abstract_like(state))
        if latest is None and config.train.resume_from:
            latest, restored, data_state = _restore_other_run(config.train.resume_from,
                                                              abstract_like(state))
    except BaseException:
        checkpointer.close()
        raise
    if is_main:  # only now: a config the checkpoints refuse must not replace the run's
        _record_config(workdir, config)
    if latest is not None:
        state = restored
        if latest >= total_steps:
            log.info('run in %s is complete (step %d of %d); nothing to do',
                     workdir, latest, total_steps)
            checkpointer.close()
            return state
        log.info('resuming from the checkpoint at step %d of %d (epoch %d of %d, %d steps in)',
                 latest, total_steps, latest // steps_per_epoch + 1, num_epochs,
                 latest % steps_per_epoch)

    step_fn = compile_train_step(make_train_step(network, tx, config, loader.mean, loader.std,
                                                 lr_schedule, ema_schedule), mesh,
                                 network.conv_impl)

    iterator = loader.iterator()
    if data_state is not None:
        iterator.set_state(data_state)
    batches = data_lib.prefetch_to_device(iterator, batch_sharding, config.data.prefetch,
                                          with_state=True)
    writer = MetricWriter(workdir, enabled=is_main)
    step = int(jax.device_get(state.step))
    log_every = max(1, config.train.log_every_steps)
    pairs_per_step = config.train.batch_size
    data_state = None
    skips = (SkippedSteps(workdir, config.train.max_consecutive_skips, write=is_main)
             if config.train.on_nonfinite == 'skip' else None)
    with _StopRequest() as stop:
        try:
            for epoch in range(step // steps_per_epoch, num_epochs):
                stats = EpochStats(skips)
                first = step
                end = (epoch + 1) * steps_per_epoch
                bar = tqdm(total=steps_per_epoch, initial=step - epoch * steps_per_epoch,
                           desc=f'epoch {epoch + 1}/{num_epochs}', unit='step',
                           disable=not is_main, dynamic_ncols=True)
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
                    bar.update(1)
                    if step % log_every == 0 or step == end:
                        window = stats.flush()
                        elapsed = time.perf_counter() - start_time
                        rate = (step - first) * pairs_per_step / max(elapsed, 1e-9)
                        bar.set_postfix(loss=f"{window.get('loss', math.nan):.4f}",
                                        pairs_s=f'{rate:.1f}')
                        writer.scalars(step, window)
                    if stop.requested(step):
                        stats.flush()  # never checkpoint a non-finite state
                        checkpointer.save(step, state, data_state)
                        bar.close()
                        log.warning('SIGTERM: saved a checkpoint at step %d of %d and stopped; '
                                    'start the same command again to resume', step, total_steps)
                        return state
                bar.close()
                means = stats.means()
                elapsed = time.perf_counter() - start_time
                row = dict(means, epoch=epoch + 1, step=step, time_s=round(elapsed, 3),
                           pairs_per_s=round((step - first) * pairs_per_step / elapsed, 3))
                writer.epoch_row(row)
                writer.scalars(epoch + 1, {'pairs_per_s': row['pairs_per_s']}, prefix='epoch/')
                if is_main:
                    log.info('epoch %d/%d: %s', epoch + 1, num_epochs,
                             ', '.join(f'{k}={v:.4g}' for k, v in sorted(means.items())))
                    # Logits start near uniform: judge collapse only after a full epoch.
                    if spec.has_cluster_head and epoch > 0:
                        for warning in collapse_warnings(means, config.model.num_clusters):
                            log.warning('epoch %d: %s', epoch + 1, warning)
                every = config.train.checkpoint_every_epochs
                if (every > 0 and (epoch + 1) % every == 0) or step == total_steps:
                    checkpointer.save(step, state, data_state)
        finally:
            writer.close()
            checkpointer.close()
            if hasattr(iterator, 'close'):
                iterator.close()
    return state
