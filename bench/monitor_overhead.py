r"""What the label-free monitor (train/monitor.py) adds to an epoch.

  python -m bench.monitor_overhead --model clusiam --image-size 224 --batch-size 32 \
      [--num-patches 1024] [--steps 5]

Times, side by side in one process on the same devices: the training loop's own jitted
step (pairs/s, synthetic uint8 batches already on the devices) and one monitor pass
(`Monitor.scores`: `--num-patches` patches and two views of each, embedded in inference
mode, then the NumPy scores), after one untimed call of each (compilation). Prints one
JSON line with both and the monitor's share of an epoch of the paper's size (2.5M pairs,
the CAMELYON16 patches) and of smaller ones, at one monitor pass per epoch.
"""
import argparse
import time

import jax
import numpy as np

from bench.common import (
    add_model_args,
    bench_trainer,
    emit,
    machine_info,
    recipe_config,
)
from clusiam_jax.train import monitor as monitor_lib
from clusiam_jax.train.trainer import random_batch

EPOCH_SIZES = (100_000, 1_000_000, 2_500_000)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument('--num-patches', type=int, default=1024)
    parser.add_argument('--steps', type=int, default=5, help='timed train steps')
    args = parser.parse_args()
    config = recipe_config(args)
    trainer = bench_trainer(config)
    state = trainer.init_state()
    batch = random_batch(trainer, seed=0)
    step = trainer.step
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / args.steps
    pairs_per_s = args.batch_size / step_s

    rng = np.random.default_rng(0)
    size = args.image_size
    images = rng.integers(0, 256, (args.num_patches, size, size, 3), dtype=np.uint8)
    mset = monitor_lib.MonitorSet(images, images[::-1].copy(), images.copy(), None,
                                  np.zeros(args.num_patches, dtype=object))
    mon = monitor_lib.Monitor(trainer.network, trainer.mean, trainer.std, mset, trainer.mesh,
                              config.model.num_clusters, 2.0, 0)
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    mon.scores(variables)   # compile (the images went to the devices with Monitor)
    start = time.perf_counter()
    mon.scores(variables)
    monitor_s = time.perf_counter() - start
    emit(dict(bench='monitor_overhead', model=args.model, backbone=args.backbone,
              image_size=size, batch_size=args.batch_size, num_patches=args.num_patches,
              step_s=round(step_s, 4), pairs_per_s=round(pairs_per_s, 2),
              monitor_s=round(monitor_s, 3),
              monitor_share_of_epoch={str(n): round(monitor_s / (monitor_s + n / pairs_per_s),
                                                    6) for n in EPOCH_SIZES},
              **machine_info()))


if __name__ == '__main__':
    main()
