r"""End-to-end training throughput (input pipeline + train step) against the step alone.

  python -m bench.end_to_end --model clubyol --image-size 224 --batch-size 512 \
      --dtype bfloat16 --synthetic-patches 4096 [--workers N] [--steps 50] [--on-device-augment]
  python -m bench.end_to_end --model clusiam --data-dir /data/patches --workers 15

One process builds the loop's jitted, state-donating step (train/trainer.py's
build_trainer, with the loader's steps per epoch and normalization) and times it twice
with the same host loop as clusiam_jax/train/loop.py (metrics fetched only every
train.log_every_steps, through the loop's EpochStats):

  step_only  on one fixed batch already on the devices;
  e2e        on batches pulled from the real pipeline: patch discovery, the grain loader
             with --workers spawned processes, train/prefetch.py as the loop uses it.

Each phase runs --warmup untimed steps first (compilation, and the grain workers' start-up
and first batches), then --steps timed ones; the timed window ends when the devices are
done. It prints one JSON line: both pairs/s, e2e_over_step_only (the target is >= 0.9 on
a GPU: the pipeline should keep the devices busy), CPU ms per pair of this process and
its workers, and how long the host waited for each next batch.

data_wait_ms_mean alone does not mean a stall: a host that runs ahead of the devices also
waits for the pipeline while the devices are still busy. data_stalled is true when e2e is
under 90% of step_only and waiting for batches accounts for at least half of the extra
time per step; a slow e2e without it points at CPU contention or host overhead instead.

--workers defaults to the usable CPUs minus one (sched_getaffinity): one core stays free
for this process, which dispatches the steps and copies the batches to the devices.
--synthetic-patches N writes N image-like 256x256 JPEGs (smooth colour noise) to a
temporary folder first, for machines without data; they are read from the page cache, so
a data set on a slow disk can be slower than this. Normalization is fixed
(bench/common.py's MEAN and STD), not computed over the data.
"""
import argparse
import os
import sys
import tempfile
import time

# Only light imports up here: grain's spawned workers re-run this top level, and JAX
# would be imported (and its memory taken) once per worker for nothing.
from bench.common import emit, machine_busy_s, machine_info, process_tree_cpu_s

SYNTHETIC_SIZE = 256


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) - 1)


def parse_args():
    from bench.common import add_model_args
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_model_args(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--data-dir', help='patch folder, manifest CSV or built dataset')
    source.add_argument('--synthetic-patches', type=int, metavar='N',
                        help='write N synthetic JPEG patches to a temporary folder and use it')
    parser.add_argument('--workers', type=int, default=default_workers(),
                        help='grain worker processes (default: usable CPUs - 1)')
    parser.add_argument('--prefetch', type=int, default=2, help='data.prefetch')
    parser.add_argument('--steps', type=int, default=50, help='timed steps per phase')
    parser.add_argument('--warmup', type=int, default=None,
                        help='untimed steps per phase (default: workers + prefetch + 2, so '
                             'every worker has delivered before timing starts)')
    parser.add_argument('--on-device-augment', action='store_true',
                        help='data.augment_on_device: workers only crop; colour, blur and '
                             'flip run in the train step')
    parser.add_argument('--log-every', type=int, default=None,
                        help="metrics fetch interval (default: the recipe's "
                             "train.log_every_steps); a large value shows what the fetches cost")
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = args.workers + args.prefetch + 2
    return args


def write_synthetic_patches(root: str, count: int, seed: int) -> None:
    """count JPEGs with tissue-like structure: colour blobs, finer texture, pixel noise.

    Smooth noise compresses (and decodes) like real patches do; uniform noise would not.
    """
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    size = SYNTHETIC_SIZE
    for i in range(count):
        folder = os.path.join(root, f'slide_{i % 8}')
        os.makedirs(folder, exist_ok=True)
        img = np.zeros((size, size, 3), np.float32)
        for cells, amplitude in ((4, 1.0), (16, 0.35)):  # coarse blobs, finer texture
            low = rng.uniform(0, 255, (cells, cells, 3)).astype(np.float32)
            for c in range(3):
                channel = Image.fromarray(low[..., c], mode='F')
                img[..., c] += amplitude * np.asarray(channel.resize((size, size),
                                                                     Image.BICUBIC))
        img = img / 1.35 + rng.normal(0, 6, img.shape)
        x, y = (i // 64) * size, (i % 64) * size
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            os.path.join(folder, f'{x}_{y}.jpg'), quality=90)


def pipeline_config(args, data_path: str):
    """The recipe config pointed at data_path, with enough epochs for both step counts."""
    from bench.common import MEAN, STD, recipe_config
    config = recipe_config(args)
    config.data.path = data_path
    config.data.num_workers = args.workers
    config.data.prefetch = args.prefetch
    config.data.augment_on_device = args.on_device_augment
    config.data.mean, config.data.std = MEAN, STD
    config.train.seed = args.seed
    if args.log_every is not None:
        config.train.log_every_steps = args.log_every
    # Every epoch has at least one step: this many epochs never runs the stream dry.
    config.train.num_epochs = args.warmup + args.steps + args.prefetch + 1
    return config


def run_steps(step_fn, state, next_batch, steps: int, log_every: int):
    """The loop's host side for `steps` steps; returns (state, wall_s, waits_s).

    Like train(): dispatch without blocking, keep the metrics on the devices and fetch
    them only every log_every steps. The last fetch waits for the final step, so wall_s
    covers the devices' work. waits_s: time spent in next_batch() per step.
    """
    import jax

    from clusiam_jax.train.metrics import EpochStats
    stats, waits = EpochStats(), []
    start = time.perf_counter()
    for i in range(steps):
        t = time.perf_counter()
        batch = next_batch()
        waits.append(time.perf_counter() - t)
        state, metrics = step_fn(state, batch)
        stats.add(i, metrics)
        if (i + 1) % log_every == 0:
            stats.flush()
    stats.flush()
    jax.block_until_ready(state)
    return state, time.perf_counter() - start, waits


def timed_phase(step_fn, state, next_batch, args, log_every):
    """Warm-up, then the timed window with process-tree CPU and foreign load around it."""
    state, _, warmup_waits = run_steps(step_fn, state, next_batch, args.warmup, log_every)
    cpu0, busy0 = process_tree_cpu_s(os.getpid()), machine_busy_s()
    state, wall, waits = run_steps(step_fn, state, next_batch, args.steps, log_every)
    own = process_tree_cpu_s(os.getpid()) - cpu0
    foreign = max(0.0, machine_busy_s() - busy0 - own)
    return state, dict(wall=wall, waits=waits, cpu=own, foreign_cpus=foreign / wall,
                       first_wait=warmup_waits[0] if warmup_waits else None)


def stall_summary(step_only, e2e, steps: int) -> dict:
    """Ratio and whether waiting for data explains the lost time (module docstring)."""
    step_s, e2e_s = step_only['wall'] / steps, e2e['wall'] / steps
    waits = sorted(e2e['waits'])
    wait_mean = sum(waits) / steps
    ratio = step_s / e2e_s
    return dict(e2e_over_step_only=round(ratio, 4), within_90pct=ratio >= 0.9,
                data_wait_ms_mean=round(1000 * wait_mean, 3),
                data_wait_ms_max=round(1000 * waits[-1], 3),
                data_wait_frac=round(sum(waits) / e2e['wall'], 4),
                data_stalled=ratio < 0.9 and wait_mean >= 0.5 * (e2e_s - step_s))


def measure(args, data_path: str) -> dict:
    """Both phases in one process; the fields of the JSON line."""
    from bench.common import bench_trainer, peak_device_bytes
    from clusiam_jax import data as data_lib
    from clusiam_jax import parallel
    from clusiam_jax.train.prefetch import prefetch_to_device
    from clusiam_jax.train.trainer import random_batch

    config = pipeline_config(args, data_path)
    loader = data_lib.create_train_loader(config)
    trainer = bench_trainer(config, steps_per_epoch=loader.steps_per_epoch,
                            mean=loader.mean, std=loader.std)
    mesh = trainer.mesh
    state, fixed = trainer.init_state(), random_batch(trainer, args.seed)
    # One executable for both phases: a pipeline batch that did not match the fixed
    # batch's shape, dtype or sharding would fail here instead of silently recompiling.
    compiled, compile_s = trainer.compile(state, fixed)
    log_every = max(1, config.train.log_every_steps)

    # Step alone first, before any worker exists to compete for the CPU.
    state, step_only = timed_phase(compiled, state, lambda: fixed, args, log_every)

    iterator = loader.iterator()
    batches = prefetch_to_device(iterator, parallel.batch_sharded(mesh),
                                 config.data.prefetch, with_state=True)
    try:
        state, e2e = timed_phase(compiled, state, lambda: next(batches)[0], args, log_every)
    finally:
        batches.close()  # drops the queued batches (shared memory) before the workers stop
        iterator.close()

    pairs = args.steps * args.batch_size
    record = dict(
        bench='end_to_end', model=args.model, backbone=args.backbone,
        image_size=args.image_size, batch_size=args.batch_size, dtype=args.dtype,
        workers=args.workers, prefetch=args.prefetch, on_device_augment=args.on_device_augment,
        steps=args.steps, warmup=args.warmup, log_every_steps=log_every,
        num_records=loader.num_records, compile_s=round(compile_s, 2),
        # the pipeline's start-up: worker spawn and imports, then prefetch + 1 batches
        first_batch_s=round(e2e['first_wait'], 2) if args.warmup else None,
        step_only_pairs_per_s=round(pairs / step_only['wall'], 2),
        e2e_pairs_per_s=round(pairs / e2e['wall'], 2),
        **stall_summary(step_only, e2e, args.steps),
        cpu_ms_per_pair_e2e=round(1000 * e2e['cpu'] / pairs, 3),
        cpu_ms_per_pair_step_only=round(1000 * step_only['cpu'] / pairs, 3),
        own_cpus_e2e=round(e2e['cpu'] / e2e['wall'], 2),
        foreign_cpus=round(max(step_only['foreign_cpus'], e2e['foreign_cpus']), 3))
    peak = peak_device_bytes()
    if peak is not None:
        record['peak_device_bytes'] = peak
    return record


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix='e2e_patches_') as tmp:
        data_path = args.data_dir
        if data_path is None:
            start = time.perf_counter()
            write_synthetic_patches(tmp, args.synthetic_patches, args.seed)
            print(f'wrote {args.synthetic_patches} synthetic patches in '
                  f'{time.perf_counter() - start:.1f} s', file=sys.stderr)
            data_path = tmp
        record = measure(args, data_path)
    record['data'] = args.data_dir or f'synthetic:{args.synthetic_patches}'
    record.update(machine_info())
    emit(record)


if __name__ == '__main__':
    main()
