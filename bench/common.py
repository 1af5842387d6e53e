"""What the benchmarks share: the line every result carries (machine, versions, command),
CPU-time accounting, and the model options of the train-step benchmarks.

Run the scripts from the repository root as modules (`python -m bench.train_step ...`),
so `clusiam_jax`, `configs` and `bench` import without path edits.

Nothing here imports JAX at module level: grain's spawned workers re-run the top level
of the main module (bench/end_to_end.py, bench/data_pipeline.py), and each would pay
for a JAX import it never uses. The helpers that need the library import it inside.
"""
import json
import os
import platform
import shlex
import sys

_TICKS = os.sysconf('SC_CLK_TCK')

# Fixed normalization (values of a typical H&E set): throughput does not depend on it,
# and computing it would read the whole data set before the benchmark starts.
MEAN, STD = (0.6684, 0.5115, 0.6791), (0.2521, 0.2875, 0.2100)


def command_line() -> str:
    """The command that reproduces this process, as typed from the repository root:
    `python -m bench.train_step ...` for a module run, else the script path as given."""
    spec = getattr(sys.modules.get('__main__'), '__spec__', None)
    head = ['-m', spec.name] if spec is not None and spec.name else sys.argv[:1]
    return ' '.join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + head
                    + sys.argv[1:])


def machine_info():
    import jax
    info = {
        'machine': platform.machine(), 'cpu_count': os.cpu_count(),
        'python': platform.python_version(), 'jax': jax.__version__,
        'backend': jax.default_backend(), 'devices': jax.device_count(),
        'device_kind': jax.devices()[0].device_kind,
        'command': command_line(),
    }
    try:
        import flax
        info['flax'] = flax.__version__
    except ImportError:
        pass
    return info


def emit(record: dict):
    """One JSON line on stdout (flushed: benchmarks are read while they run)."""
    print(json.dumps(record), flush=True)


def process_tree_cpu_s(root_pid: int) -> float:
    """User+system CPU seconds of root_pid, its live descendants and reaped children."""
    parent, ticks = {}, {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(')') + 2:].split()
        pid = int(entry)
        parent[pid] = int(fields[1])
        # utime, stime (+ cutime, cstime of the root: workers that already exited)
        used = int(fields[11]) + int(fields[12])
        if pid == root_pid:
            used += int(fields[13]) + int(fields[14])
        ticks[pid] = used
    tree, todo = {root_pid}, [root_pid]
    while todo:
        current = todo.pop()
        for pid, pp in parent.items():
            if pp == current and pid not in tree:
                tree.add(pid)
                todo.append(pid)
    return sum(ticks.get(p, 0) for p in tree) / _TICKS


def process_tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of root_pid and its live descendants (grain workers), summed."""
    children = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    stat = f.read()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(')') + 2:].split()[1]), []).append(
                int(entry))
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f'/proc/{pid}/status') as f:
                for line in f:
                    if line.startswith('VmRSS:'):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (user, nice, system, irq, softirq)."""
    with open('/proc/stat') as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / _TICKS


# ------------------------------------------------------- the train-step benchmarks

def add_model_args(parser):
    """The command-line options every train-step benchmark shares."""
    from clusiam_jax.config import METHOD_RECIPES
    from clusiam_jax.models.conv import CONV_IMPLS
    parser.add_argument('--model', choices=sorted(METHOD_RECIPES), default='clusiam')
    parser.add_argument('--backbone', default='resnet18')
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32')
    parser.add_argument('--conv-impl', choices=CONV_IMPLS, default='auto',
                        help='model.conv_impl (auto: im2col gradients on CPU, XLA elsewhere)')


def recipe_config(args):
    """The method's paper recipe with the benchmark's model, size, batch and dtype."""
    from clusiam_jax.config import method_config
    config = method_config(args.model)
    config.model.backbone, config.model.dtype = args.backbone, args.dtype
    config.model.conv_impl = args.conv_impl
    config.data.image_size, config.train.batch_size = args.image_size, args.batch_size
    return config


def bench_trainer(config, mesh=None, steps_per_epoch: int = 1000, mean=MEAN, std=STD):
    """The training loop's own Trainer (train/trainer.py) for a benchmark's config.

    The config is validated first, as build_trainer expects; benchmarks bring their own
    batches, so data.path is not checked. steps_per_epoch only shapes the lr and EMA
    schedules, whose values do not change what a step costs.
    """
    from clusiam_jax import parallel
    from clusiam_jax.config import validate
    from clusiam_jax.train.trainer import build_trainer
    mesh = parallel.make_mesh() if mesh is None else mesh
    validate(config, num_devices=mesh.devices.size, check_data_path=False)
    return build_trainer(config, mesh, steps_per_epoch, mean, std)


def peak_device_bytes():
    """Peak device memory in use, when the backend reports it (CPU may not)."""
    import jax
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # backends without memory stats raise
        return None
    return int(stats['peak_bytes_in_use']) if 'peak_bytes_in_use' in stats else None
