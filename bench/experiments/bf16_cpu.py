r"""What model.dtype=bfloat16 compiles to on XLA:CPU, and which bf16 forms reach the
matrix units (issue 27).

  python -m bench.experiments.bf16_cpu --parts hlo --model clubyol --image-size 64 --batch-size 16
  python -m bench.experiments.bf16_cpu --parts kernels

hlo: the compiled train step (the training loop's own, bench/common.py), with counts of
its dots and convolutions by operand dtype and by where they run (a YNNPACK fusion or
XLA's own kernel), of converts by target dtype, of transposes and copies, and XLA's FLOP
count. A dot or convolution whose operands are float32 in a bf16 step was upcast by XLA.
kernels: one dot (512x2048 @ 2048x4096) and one convolution (ResNet layer1 at 224 px,
batch 32) in float32, bf16 -> bf16 and bf16 x bf16 -> float32, each under the XLA:CPU
options that could route it to a library (YNNPACK convolutions, oneDNN), timed
alternately in one process: GFLOP/s against the CPU's peaks (bench/train_step.py).
Prints JSON lines.
"""
import argparse
import collections
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bench.common import add_model_args, bench_trainer, emit, machine_info, recipe_config
from bench.train_step import cpu_peak, step_flops

OPTIONS = {
    'default': {},
    'ynn_convolution': {'xla_cpu_experimental_ynn_fusion_type':
                        'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,'
                        'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_REDUCE'},
    'onednn': {'xla_cpu_use_onednn': True, 'xla_cpu_experimental_onednn_custom_call': True},
}


def hlo_counts(text):
    """Counts of a compiled module's products by (op, operand dtypes, where), converts by
    target dtype, transposes and copies."""
    dtype_of = dict(re.findall(r'%([\w.\-]+) = \(?(\w+)\[', text))
    caller = {m.group(2): ('ynn' if '__ynn_fusion' in m.group(0) else m.group(1))
              for m in re.finditer(r'kind=(\w+), calls=%([\w.\-]+)[^\n]*', text)}
    counts = collections.Counter()
    computation = None
    for line in text.splitlines():
        if line and not line.startswith(' '):
            head = re.match(r'(?:ENTRY )?%([\w.\-]+) ', line)
            computation = head.group(1) if head else computation
        m = re.match(r'\s*(?:ROOT )?%[\w.\-]+ = (\w+)\[\S* ([\w-]+)\(([^)]*)\)', line)
        if not m:
            continue
        out, op, args = m.groups()
        if op in ('dot', 'convolution'):
            operands = [dtype_of.get(a.strip().lstrip('%')) for a in args.split(',')]
            where = caller.get(computation, 'xla')
            counts[f'{op} {"x".join(map(str, operands))}->{out} in {where}'] += 1
        elif op == 'convert':
            counts[f'convert ->{out}'] += 1
        elif op in ('transpose', 'copy'):
            counts[op] += 1
    return counts


def hlo_part(args):
    trainer = bench_trainer(recipe_config(args))
    from clusiam_jax.train.trainer import random_batch
    state, batch = trainer.init_state(), random_batch(trainer)
    compiled, _ = trainer.compile(state, batch)
    emit(dict(bench='bf16_cpu_hlo', model=args.model, image_size=args.image_size,
              batch_size=args.batch_size, dtype=args.dtype, flops_per_step=step_flops(compiled),
              counts=dict(sorted(hlo_counts(compiled.as_text()).items())), **machine_info()))


def _conv(x, w, out=None):
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                    preferred_element_type=out)


def kernels_part(args):
    f32, bf16 = jnp.float32, jnp.bfloat16
    shapes = {'dot': ((512, 2048), (2048, 4096)), 'conv': ((32, 56, 56, 64), (3, 3, 64, 64))}
    forms = {'float32': (f32, None), 'bf16->bf16': (bf16, None), 'bf16->float32': (bf16, f32)}
    key = jax.random.PRNGKey(0)
    compiled = {}
    for kind, (xs, ws) in shapes.items():
        for form, (dtype, out) in forms.items():
            x = jax.random.normal(key, xs).astype(dtype)
            w = (0.05 * jax.random.normal(key, ws)).astype(dtype)
            if kind == 'dot':
                fn = lambda a, b, out=out: jnp.matmul(a, b, preferred_element_type=out)
            else:
                fn = lambda a, b, out=out: _conv(a, b, out)
            for name, options in OPTIONS.items():
                c = jax.jit(fn).lower(x, w).compile(compiler_options=options)
                compiled[kind, form, name] = (c, (x, w), step_flops(c), hlo_counts(c.as_text()))
    times = collections.defaultdict(list)
    for _ in range(args.repeats):   # alternated: the ratios hold on a loaded machine
        for k, (c, operands, _, _) in compiled.items():
            c(*operands).block_until_ready()
            start = time.perf_counter()
            c(*operands).block_until_ready()
            times[k].append(time.perf_counter() - start)
    peak = cpu_peak()
    for (kind, form, name), (_, _, flops, counts) in compiled.items():
        seconds = float(np.median(times[kind, form, name]))
        gflops = flops / seconds / 1e9
        record = dict(bench='bf16_cpu_kernel', kind=kind, form=form, options=name,
                      ms=round(seconds * 1e3, 2), gflops=round(gflops, 1),
                      products={k: v for k, v in counts.items() if k.startswith(('dot', 'conv'))},
                      converts=sum(v for k, v in counts.items() if k.startswith('convert')))
        for p in ('peak_gflops_f32_fma', 'peak_gflops_amx_bf16'):
            if p in peak:
                record['fraction_of_' + p[len('peak_gflops_'):] + '_peak'] = round(
                    gflops / peak[p], 4)
        emit(record)
    emit(dict(bench='bf16_cpu_peak', **peak, **machine_info()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_model_args(parser)
    parser.set_defaults(dtype='bfloat16')
    parser.add_argument('--parts', nargs='+', choices=['hlo', 'kernels'],
                        default=['hlo', 'kernels'])
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args()
    if 'hlo' in args.parts:
        hlo_part(args)
    if 'kernels' in args.parts:
        kernels_part(args)


if __name__ == '__main__':
    main()
