r"""Train-step throughput of one method: compile time and pairs/s of the jitted step.

  python -m bench.train_step --model clusiam --image-size 224 --batch-size 32 --steps 10
  python -m bench.train_step --model clubyol --image-size 64 --batch-size 64 --dtype bfloat16
  python -m bench.train_step --batch-size 512 --xla-option xla_gpu_force_conv_nhwc=true

Prints one JSON line. A pair is one image's two views. On a CPU the line also carries the
step's FLOPs (XLA's cost analysis of the compiled step), the GFLOP/s achieved and their
fraction of the CPU's float32 FMA and AMX bf16 peaks (cpu_peak says how they are derived).
The step is the training loop's own (train/trainer.py: same jit, shardings, buffer donation
and compiler options), so what is timed here is what training runs. The batch is synthetic
uint8 data already on the devices, so this measures the step alone (normalization
included); see bench/data_pipeline.py for the input side. Compare against
../shared/bench/torch_original.py --bench train at the same settings, side by side.
"""
import argparse
import os
import time

import jax
import numpy as np

from bench.common import (
    add_model_args,
    bench_trainer,
    emit,
    machine_info,
    peak_device_bytes,
    recipe_config,
)
from clusiam_jax.train.trainer import random_batch

# Floating-point operations per cycle per core. AVX-512: 2 FMA units x 16 float32 lanes x 2
# (multiply and add). AMX on 4th Gen Xeon (Sapphire Rapids): 1,024 BF16 operations per cycle
# (Intel, "Accelerate AI Workloads with Intel AMX", p. 4, as cited by PyTorch's AMX recipe,
# pytorch.org/tutorials/recipes/amx.html, beside 64 FP32 operations per cycle for AVX-512).
F32_FMA_FLOPS_PER_CYCLE = 2 * 16 * 2
AMX_BF16_FLOPS_PER_CYCLE = 1024


def cpu_peak():
    """The CPU's peak GFLOP/s, float32 FMA and AMX bf16, from the cores this process may
    run on and the clock /proc/cpuinfo reports (the mean of its `cpu MHz` lines: the
    nominal clock on a VM, so turbo would make the true peak higher)."""
    with open('/proc/cpuinfo') as f:
        cpuinfo = f.read()
    mhz = [float(line.split(':')[1]) for line in cpuinfo.splitlines()
           if line.startswith('cpu MHz')]
    cores = len(os.sched_getaffinity(0))
    ghz = sum(mhz) / len(mhz) / 1000 if mhz else None
    if ghz is None:
        return {}
    peak = dict(cpu_cores=cores, cpu_ghz=round(ghz, 3),
                peak_gflops_f32_fma=round(cores * ghz * F32_FMA_FLOPS_PER_CYCLE, 1))
    if 'amx_bf16' in cpuinfo.split():
        peak['peak_gflops_amx_bf16'] = round(cores * ghz * AMX_BF16_FLOPS_PER_CYCLE, 1)
    return peak


def step_flops(compiled):
    """FLOPs of one step by XLA's cost analysis of the compiled step (None if absent)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get('flops')
    return float(flops) if flops else None


def xla_step_flops(args):
    """FLOPs of the same step with XLA's own convolutions: oneDNN's custom calls are
    opaque to XLA's cost analysis, and the arithmetic is the same network's."""
    config = recipe_config(argparse.Namespace(**{**vars(args), 'conv_impl': 'xla'}))
    trainer = bench_trainer(config)
    state, batch = trainer.init_state(), random_batch(trainer)
    return step_flops(trainer.step.lower(state, batch).compile())


def peak_fractions(flops, step_s, peak):
    """Achieved GFLOP/s and its fraction of each peak in `peak`."""
    if not flops or not peak:
        return {}
    gflops = flops / step_s / 1e9
    out = dict(achieved_gflops=round(gflops, 1))
    for key in ('peak_gflops_f32_fma', 'peak_gflops_amx_bf16'):
        if key in peak:
            name = key[len('peak_gflops_'):]
            out[f'fraction_of_{name}_peak'] = round(gflops / peak[key], 4)
    return out


def parse_xla_option(parser, text):
    """'key=value' -> (key, value), value as bool or int where it reads as one."""
    key, sep, value = text.partition('=')
    if not sep or not key:
        parser.error(f'--xla-option {text!r}: expected KEY=VALUE')
    if value.lower() in ('true', 'false'):
        return key, value.lower() == 'true'
    try:
        return key, int(value)
    except ValueError:
        return key, value


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_model_args(parser)
    parser.add_argument('--steps', type=int, default=10, help='timed steps')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps after compiling')
    parser.add_argument('--sync-every', type=int, default=1,
                        help='wait for the device every N steps (the loop waits only at log '
                             'steps: on a GPU, 10 or more measures what training sees; 1 '
                             'times each step, robust to a noisy CPU host)')
    parser.add_argument('--xla-option', action='append', default=[], metavar='KEY=VALUE',
                        help='an XLA compiler option for this step only, on top of the ones '
                             'the step always gets (repeatable); for trying a flag before '
                             'making it a default')
    args = parser.parse_args()
    xla_options = dict(parse_xla_option(parser, text) for text in args.xla_option)

    trainer = bench_trainer(recipe_config(args))
    state, batch = trainer.init_state(), random_batch(trainer)
    if xla_options:
        # Added to the options the step is jitted with (jax merges them at compile time).
        start = time.perf_counter()
        compiled = trainer.step.lower(state, batch).compile(compiler_options=xla_options)
        compile_s = time.perf_counter() - start
    else:
        compiled, compile_s = trainer.compile(state, batch)
    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []  # seconds per step, one entry per window of sync_every steps
    for window in range(-(-args.steps // args.sync_every)):
        n = min(args.sync_every, args.steps - window * args.sync_every)
        start = time.perf_counter()
        for _ in range(n):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - start) / n)
    median = float(np.median(times))
    record = dict(bench='train_step', model=args.model, backbone=args.backbone,
                  image_size=args.image_size, batch_size=args.batch_size, dtype=args.dtype,
                  conv_impl=args.conv_impl, xla_options=xla_options,
                  steps=args.steps, sync_every=args.sync_every, compile_s=round(compile_s, 2),
                  step_s_median=round(median, 4), steps_per_s=round(1 / median, 3),
                  pairs_per_s=round(args.batch_size / median, 2),
                  loss=float(metrics['loss']))
    from clusiam_jax.models.conv import resolve_conv_impl
    resolved = resolve_conv_impl(args.conv_impl, args.dtype)
    record['conv_impl_resolved'] = resolved
    flops = step_flops(compiled) if resolved != 'onednn' else xla_step_flops(args)
    if flops:
        record['flops_per_step'] = flops
        if jax.default_backend() == 'cpu':
            peak_cpu = cpu_peak()
            record.update(peak_cpu)
            record.update(peak_fractions(flops, median, peak_cpu))
    peak = peak_device_bytes()
    if peak is not None:
        record['peak_device_bytes'] = peak
    record.update(machine_info())
    emit(record)


if __name__ == '__main__':
    main()
