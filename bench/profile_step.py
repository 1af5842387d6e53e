r"""Where a train step's time goes: a jax.profiler trace of the real step, by HLO op.

  python -m bench.profile_step --model clusiam --image-size 64 --batch-size 64
  python -m bench.profile_step --image-size 224 --batch-size 32 --top 30

Prints JSON lines: one `profile_kind` per kind of compiled op (fusion kinds such as
`transpose_copy_fusion`, `ynn_fusion`, `convolution`; the name without its number),
then the `--top` costliest single ops with the framework op they come from, all in ms
per step averaged over `--steps` traced steps. The step is the training loop's own
(train/trainer.py), so the ops are the ones training runs.

Caveat on XLA:CPU: the trace under-reports forward convolution thunks, by several times
against what bench/conv_kernels.py measures for the same layers; read fusions and dots
here, and time convolutions with bench/conv_kernels.py.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax

from bench.common import add_model_args, bench_trainer, emit, machine_info, recipe_config
from clusiam_jax.train.trainer import random_batch


def op_times_ms(trace_dir, steps):
    """{thunk name: ms per step} from the trace jax.profiler wrote under trace_dir."""
    (path,) = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)['traceEvents']
    totals = collections.Counter()
    for event in events:
        if event.get('ph') == 'X':
            totals[event['name']] += event['dur'] / 1000 / steps
    return totals


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_model_args(parser)
    parser.add_argument('--steps', type=int, default=2, help='traced steps')
    parser.add_argument('--top', type=int, default=20, help='single ops to print')
    args = parser.parse_args()

    trainer = bench_trainer(recipe_config(args))
    state, batch = trainer.init_state(), random_batch(trainer)
    compiled, _ = trainer.compile(state, batch)
    # Op name -> its HLO line, to tell which thunks are compiled ops and where they come from.
    hlo = {m.group(1): line for line in compiled.as_text().splitlines()
           if (m := re.match(r'\s*(?:ROOT )?%([\w.\-]+) = ', line))}
    for _ in range(2):   # warm up outside the trace
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for _ in range(args.steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        times = op_times_ms(trace_dir, args.steps)

    ops = {name: ms for name, ms in times.items() if name in hlo}
    kinds = collections.Counter()
    for name, ms in ops.items():
        kinds[re.sub(r'[.\d]+$', '', name)] += ms
    info = machine_info()
    setting = dict(model=args.model, image_size=args.image_size, batch_size=args.batch_size,
                   dtype=args.dtype, conv_impl=args.conv_impl)
    emit(dict(bench='profile_total', op_ms=round(sum(ops.values()), 1), **setting, **info))
    for kind, ms in kinds.most_common():
        emit(dict(bench='profile_kind', kind=kind, ms=round(ms, 2), **setting))
    for name, ms in sorted(ops.items(), key=lambda item: -item[1])[:args.top]:
        source = re.search(r'op_name="([^"]+)"', hlo[name])
        emit(dict(bench='profile_op', op=name, ms=round(ms, 2),
                  shape=hlo[name].split(' = ', 1)[1].split(' ', 1)[0],
                  source=source.group(1) if source else None, **setting))


if __name__ == '__main__':
    main()
