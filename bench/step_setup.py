"""The real jitted train step on a mesh, as the benchmarks build it.

bench/train_step.py and bench/end_to_end.py time the same step that
clusiam_jax/train/loop.py runs (same builders, same shardings, same buffer
donation); this module is the one place that assembles it outside the loop.
JAX is imported here, so benchmarks with grain workers import this module only
inside main(): spawned workers re-run the script's top level.
"""
import jax
import numpy as np

from clusiam_jax import parallel
from clusiam_jax.config import validate
from clusiam_jax.models import build_network
from clusiam_jax.models.conv import CONV_IMPLS
from clusiam_jax.train.loop import compile_train_step, init_state
from clusiam_jax.train.optimizer import ema_momentum, make_optimizer
from clusiam_jax.train.step import make_train_step
from configs import byol, clubyol, clusiam, simsiam

RECIPES = {'clusiam': clusiam, 'clubyol': clubyol, 'simsiam': simsiam, 'byol': byol}
# Fixed normalization (values of a typical H&E set): throughput does not depend on it,
# and computing it would read the whole data set before the benchmark starts.
MEAN, STD = (0.6684, 0.5115, 0.6791), (0.2521, 0.2875, 0.2100)


def add_model_args(parser):
    """The command-line options every train-step benchmark shares."""
    parser.add_argument('--model', choices=sorted(RECIPES), default='clusiam')
    parser.add_argument('--backbone', default='resnet18')
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32')
    parser.add_argument('--conv-impl', choices=CONV_IMPLS, default='auto',
                        help='model.conv_impl (auto: im2col gradients on CPU, XLA elsewhere)')


def recipe_config(args):
    """The method's recipe config with the benchmark's model, size, batch and dtype."""
    config = RECIPES[args.model].get_config()
    config.model.backbone, config.model.dtype = args.backbone, args.dtype
    config.model.conv_impl = args.conv_impl
    config.data.image_size, config.train.batch_size = args.image_size, args.batch_size
    return config


def build_step(config, mesh, steps_per_epoch, mean=MEAN, std=STD):
    """(step, state): the loop's jitted, state-donating step and a fresh replicated state.

    steps_per_epoch only shapes the lr / EMA schedules, whose values do not change
    the cost of a step.
    """
    validate(config, num_devices=mesh.devices.size, check_data_path=False)
    network = build_network(config.model)
    tx, lr = make_optimizer(config, steps_per_epoch)
    ema = ema_momentum(config, steps_per_epoch * config.train.num_epochs)
    step = compile_train_step(make_train_step(network, tx, config, mean, std, lr, ema), mesh,
                              network.conv_impl)
    return step, init_state(network, tx, config, mesh)


def random_device_batch(mesh, batch_size, image_size, seed=0):
    """Two views of random uint8 pixels, already sharded over the mesh like a real batch."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, image_size, image_size, 3)
    return {k: jax.device_put(rng.integers(0, 256, shape, dtype=np.uint8),
                              parallel.batch_sharded(mesh)) for k in ('view1', 'view2')}


def peak_device_bytes():
    """Peak device memory in use, when the backend reports it (CPU may not)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats raise
        return None
    return int(stats['peak_bytes_in_use']) if 'peak_bytes_in_use' in stats else None
