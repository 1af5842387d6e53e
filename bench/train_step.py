r"""Train-step throughput of one method: compile time and pairs/s of the jitted step.

  python bench/train_step.py --model clusiam --image-size 224 --batch-size 32 --steps 10
  python bench/train_step.py --model clubyol --image-size 64 --batch-size 64 --dtype bfloat16

Prints one JSON line. A pair is one image's two views. The batch is synthetic uint8 data
already on the devices, so this measures the step alone (normalization included); see
bench/data_pipeline.py for the input side. Compare against ../shared/bench/torch_original.py
--bench train at the same settings, run side by side on the same machine.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import emit, machine_info  # noqa: E402
from clusiam_jax import parallel  # noqa: E402
from clusiam_jax.config import validate  # noqa: E402
from clusiam_jax.models import build_network  # noqa: E402
from clusiam_jax.train.loop import compile_train_step, init_state  # noqa: E402
from clusiam_jax.train.optimizer import ema_momentum, make_optimizer  # noqa: E402
from clusiam_jax.train.step import make_train_step  # noqa: E402
from configs import byol, clubyol, clusiam, simsiam  # noqa: E402

RECIPES = {'clusiam': clusiam, 'clubyol': clubyol, 'simsiam': simsiam, 'byol': byol}
MEAN, STD = (0.6684, 0.5115, 0.6791), (0.2521, 0.2875, 0.2100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', choices=sorted(RECIPES), default='clusiam')
    parser.add_argument('--backbone', default='resnet18')
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32')
    parser.add_argument('--steps', type=int, default=10, help='timed steps')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps after compiling')
    args = parser.parse_args()

    config = RECIPES[args.model].get_config()
    config.model.backbone, config.model.dtype = args.backbone, args.dtype
    config.data.image_size, config.train.batch_size = args.image_size, args.batch_size
    mesh = parallel.make_mesh()
    validate(config, num_devices=mesh.devices.size, check_data_path=False)
    network = build_network(config.model)
    steps_per_epoch = 1000
    tx, lr = make_optimizer(config, steps_per_epoch)
    step = compile_train_step(
        make_train_step(network, tx, config, MEAN, STD, lr,
                        ema_momentum(config, steps_per_epoch * config.train.num_epochs)), mesh)
    state = init_state(network, tx, config, mesh)
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    batch = {k: jax.device_put(rng.integers(0, 256, shape, dtype=np.uint8),
                               parallel.batch_sharded(mesh)) for k in ('view1', 'view2')}

    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)  # timed per step: median is robust to a noisy host
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    record = dict(bench='train_step', model=args.model, backbone=args.backbone,
                  image_size=args.image_size, batch_size=args.batch_size, dtype=args.dtype,
                  steps=args.steps, compile_s=round(compile_s, 2),
                  step_s_median=round(median, 4), steps_per_s=round(1 / median, 3),
                  pairs_per_s=round(args.batch_size / median, 2),
                  loss=float(metrics['loss']))
    try:
        stats = jax.devices()[0].memory_stats() or {}
        if 'peak_bytes_in_use' in stats:
            record['peak_device_bytes'] = int(stats['peak_bytes_in_use'])
    except Exception:  # noqa: BLE001 - CPU backends may not report memory
        pass
    record.update(machine_info())
    emit(record)


if __name__ == '__main__':
    main()
