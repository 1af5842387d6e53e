r"""Where a train step's time goes: a jax.profiler trace of the real step, by HLO op.

  python bench/profile_step.py --model clusiam --image-size 64 --batch-size 64
  python bench/profile_step.py --image-size 224 --batch-size 32 --top 30

Prints JSON lines: one `profile_kind` per kind of compiled op (fusion kinds such as
`transpose_copy_fusion`, `ynn_fusion`, `convolution`; the name without its number),
then the `--top` costliest single ops with the framework op they come from, all in ms
per step averaged over `--steps` traced steps. Caveat measured on XLA:CPU: forward
convolution thunks can show far less than their real time (the trace summed ~11 ms for
all forward convolutions at 64 px, where bench/conv_kernels.py puts them near 60 ms per
view); read fusions and dots here, time convolutions with bench/conv_kernels.py.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from bench.common import emit, machine_info  # noqa: E402
from bench.step_setup import add_model_args, build_step, random_device_batch, recipe_config  # noqa: E402
from clusiam_jax import parallel  # noqa: E402


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

    config = recipe_config(args)
    mesh = parallel.make_mesh()
    step, state = build_step(config, mesh, steps_per_epoch=1000)
    batch = random_device_batch(mesh, args.batch_size, args.image_size)
    compiled = step.lower(state, batch).compile()
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
