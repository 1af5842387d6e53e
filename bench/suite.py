r"""The performance suite: ours beside the authors' PyTorch code, same settings, ratios.

  python -m bench.suite --preset cpu [--original-repo PATH] [--parts train data]
  python -m bench.suite --preset gpu --original-repo .gpu_carry/CluSiam \
      --harness .gpu_carry/torch_original.py --out $OUT/suite.jsonl   # bench/gpu_check.sh

Each part runs our benchmark scripts as separate processes (`python -m bench.<script>`
from the repository root; a fresh process per setting: its compile time and peak device
memory are its own) and, when the original's harness
(../shared/bench/torch_original.py by default) and the authors' repository are given,
the original at the same setting, alternately, `--repeats` times. It prints every JSON
line it gets and one `ratio` line per setting (ours / original, medians over repeats).
Interleaving keeps the ratio meaningful on a shared machine, where absolute times drift.

Presets (the settings the performance targets are measured at):
  cpu  train: both methods at 224 px batch 32 and 64 px batch 64, ours in float32 and
       bfloat16 (--dtypes to choose) alternated with the original in float32 and with bf16
       autocast + channels_last; every ratio line carries the step's FLOPs (XLA's count)
       and the fraction of the CPU's float32 FMA and AMX bf16 peaks each side reaches
       (bench/train_step.py cpu_peak: cores x clock x 64 or 1024 flops/cycle);
       data: 0/1/2 workers, CPU augmentation and data.augment_on_device;
       e2e: pipeline + step at 64 px batch 64.
  gpu  train: both methods at 224 px batch 512 then 256, float32 against the original in
       float32, bfloat16 against the original with bf16 autocast and channels_last;
       e2e: 224 px batch 512 bfloat16 with on-device augmentation;
       variants: float32 at batch 512 also with XLA's convolutions forced to NHWC.
  Both: monitor, the label-free monitor's time against the train step's at the first
       train setting (bench/monitor_overhead.py).
The most important settings run first, so a run cut short still answers the targets.
The original's code is never copied here: its harness extracts it from the repository
given (e.g. one brought by `git clone https://github.com/wwyi1828/CluSiam`).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_HARNESS = os.path.join(REPO, '..', 'shared', 'bench', 'torch_original.py')
METHODS = ('clusiam', 'clubyol')
PRESETS = {
    # Each train setting alternates ours in float32 and bfloat16 with the original in
    # float32 and with bf16 autocast + channels_last: a ratio line for every pair.
    'cpu': dict(train=[(size, batch) for size, batch in ((224, 32), (64, 64))],
                dtypes=['float32', 'bfloat16'], original_both=True,
                steps=5, warmup=2, sync_every=1, threads=2,
                torch_device='cpu', variants=[],
                data_workers=[0, 1, 2], e2e=dict(size=64, batch=64, workers=1, steps=10,
                                                 dtype='float32', patches=512,
                                                 on_device=[False])),
    'gpu': dict(train=[(224, 512), (224, 256)], dtypes=['float32', 'bfloat16'], steps=20,
                # the loop syncs only at log steps; the original syncs every step (.item())
                warmup=3, sync_every=10, threads=4, torch_device='cuda', data_workers=[],
                # XLA picks NCHW for float32 convolutions on NVIDIA GPUs, NHWC for bf16;
                # the original's float32 runs NCHW with TF32 (float32 target: 2x)
                variants=['xla_gpu_force_conv_nhwc=true'],
                e2e=dict(size=224, batch=512, workers=14, steps=30, dtype='bfloat16',
                         # with CPU augmentation the workers cannot keep an H200 busy
                         # (bench/results): the check times the on-device path
                         patches=2048, on_device=[True])),
}


class Suite:
    def __init__(self, out_path):
        self.out = open(out_path, 'a') if out_path else None

    def emit(self, record):
        line = json.dumps(record)
        print(line, flush=True)
        if self.out:
            self.out.write(line + '\n')
            self.out.flush()

    def run_json(self, cmd):
        """Run one benchmark process; its last JSON line, or an error record."""
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        lines = [line for line in proc.stdout.splitlines() if line.startswith('{')]
        if proc.returncode or not lines:
            self.emit(dict(bench='error', command=' '.join(cmd), returncode=proc.returncode,
                           stderr_tail=proc.stderr[-3000:]))
            return None
        record = json.loads(lines[-1])
        self.emit(record)
        return record

    def compare(self, label, ours_cmd, theirs_cmd, ours_key, theirs_key, repeats,
                variants=()):
        """Alternate ours and theirs (who goes first alternates too); emit the ratio.

        variants: (name, cmd) pairs, other builds of ours run in the same alternation,
        each with its own ratio line against the same original runs.
        """
        runs = [(ours_cmd, ours_key, label)] + [(cmd, ours_key, f'{label} [{name}]')
                                                 for name, cmd in variants]
        results = {run_label: [] for _, _, run_label in runs}
        theirs = []
        for i in range(repeats):
            order = [(cmd, results[run_label], key) for cmd, key, run_label in runs]
            order.append((theirs_cmd, theirs, theirs_key))
            for cmd, got, key in (order if i % 2 == 0 else order[::-1]):
                if cmd is None:
                    continue
                record = self.run_json(cmd)
                if record is not None:
                    got.append(record[key])
        for run_label, ours in results.items():
            if ours and theirs:
                ratio = statistics.median(ours) / statistics.median(theirs)
                self.emit(dict(bench='ratio', setting=run_label, metric='pairs_per_s',
                               ours=statistics.median(ours), original=statistics.median(theirs),
                               ratio=round(ratio, 3)))


ORIGINAL_SETTINGS = {'float32': [], 'amp+channels_last': ['--amp', '--channels-last']}
PEAK_KEYS = ('peak_gflops_f32_fma', 'peak_gflops_amx_bf16')


def fractions_of_peak(flops, pairs_per_s, batch, peaks):
    """{fraction_of_<peak>_peak: ...} for a step of `flops` run at pairs_per_s."""
    if not flops or not pairs_per_s:
        return {}
    gflops = flops * pairs_per_s / batch / 1e9
    return {f"fraction_of_{key[len('peak_gflops_'):]}_peak": round(gflops / peaks[key], 4)
            for key in PEAK_KEYS if peaks.get(key)}


def _ours_name(dtype, conv_impl):
    """How a ratio line names our run: the dtype, and the kernels when not the default."""
    return dtype if conv_impl == 'auto' else f'{dtype} conv_impl={conv_impl}'


def train_grid(suite, preset, theirs, args, size, batch, model):
    """Ours in each dtype and the original in float32 and amp+channels_last, alternated
    (the order reverses every repeat); a ratio line for each (ours, original) pair, with
    the fraction of the CPU's peaks both reach (FLOPs: XLA's count of our step)."""
    py = sys.executable
    common = ['--model', model, '--image-size', str(size), '--batch-size', str(batch),
              '--steps', str(preset['steps']), '--warmup', str(preset['warmup'])]
    runs = [(('ours', _ours_name(dtype, impl)),
             [py, '-m', 'bench.train_step', '--dtype', dtype, '--conv-impl', impl,
              '--sync-every', str(preset['sync_every'])] + common)
            for dtype in args.dtypes or preset['dtypes'] for impl in args.conv_impls]
    if theirs:
        runs += [(('original', name), theirs + ['--bench', 'train', '--threads',
                                                str(preset['threads']), '--device',
                                                preset['torch_device']] + flags + common)
                 for name, flags in ORIGINAL_SETTINGS.items()
                 if name in (args.original_settings or ORIGINAL_SETTINGS)]
    got = {key: [] for key, _ in runs}
    info = {}
    for i in range(args.repeats):
        for key, cmd in (runs if i % 2 == 0 else runs[::-1]):
            record = suite.run_json(cmd)
            if record is not None:
                got[key].append(record['pairs_per_s' if key[0] == 'ours' else 'images_per_s'])
                if key[0] == 'ours':
                    info[key] = record
    label = f'train {model} {size}px batch {batch}'
    for (who, dtype), ours in got.items():
        if who != 'ours' or not ours:
            continue
        mine = info[(who, dtype)]
        peaks = {k: mine[k] for k in PEAK_KEYS if k in mine}
        flops = mine.get('flops_per_step')
        for (other, name), original in got.items():
            if other != 'original' or not original:
                continue
            ours_m, theirs_m = statistics.median(ours), statistics.median(original)
            suite.emit(dict(
                bench='ratio', setting=f'{label} ours {dtype} vs original {name}',
                metric='pairs_per_s', ours=ours_m, original=theirs_m,
                ratio=round(ours_m / theirs_m, 3), flops_per_step=flops, **peaks,
                ours_conv_impl=mine.get('conv_impl_resolved'),
                ours_peak=fractions_of_peak(flops, ours_m, batch, peaks),
                original_peak=fractions_of_peak(flops, theirs_m, batch, peaks)))


def train_part(suite, preset, theirs, args, settings, variants=()):
    """variants: XLA options ('key=value') to also try on ours in float32 (train_step.py
    --xla-option), one extra run each, beside the default build."""
    py = sys.executable
    for size, batch in settings:
        if preset.get('original_both'):
            for model in METHODS:
                train_grid(suite, preset, theirs, args, size, batch, model)
            continue
        for dtype in args.dtypes or preset['dtypes']:
            for model in METHODS:
                common = ['--model', model, '--image-size', str(size),
                          '--batch-size', str(batch), '--steps', str(preset['steps']),
                          '--warmup', str(preset['warmup'])]
                ours = [py, '-m', 'bench.train_step', '--dtype', dtype,
                        '--sync-every', str(preset['sync_every'])] + common
                original = None
                if theirs:
                    # bfloat16 is compared with what a PyTorch user would do for speed.
                    fast = ['--amp', '--channels-last'] if dtype == 'bfloat16' else []
                    original = theirs + ['--bench', 'train', '--threads', str(preset['threads']),
                                         '--device', preset['torch_device']] + fast + common
                tries = [(option, ours + ['--xla-option', option])
                         for option in (variants if dtype == 'float32' else ())]
                suite.compare(f'train {model} {size}px batch {batch} {dtype}'
                              + (' vs original amp+channels_last' if dtype == 'bfloat16' else ''),
                              ours, original, 'pairs_per_s', 'images_per_s',  # its image = our pair
                              args.repeats, tries)


def data_part(suite, preset, theirs, args):
    py = sys.executable
    for workers in preset['data_workers']:
        w = ['--workers', str(workers)]
        original = theirs + ['--bench', 'data'] + w if theirs else None
        suite.compare(f'data {workers} workers', [py, '-m', 'bench.data_pipeline'] + w,
                      original, 'pairs_per_s', 'pairs_per_s', args.repeats)
        suite.compare(f'data {workers} workers, on-device augmentation',
                      [py, '-m', 'bench.data_pipeline', '--on-device-augment'] + w,
                      original, 'pairs_per_s', 'pairs_per_s', args.repeats)
    # CPU ms per pair, ours (both paths) against the original's PIL pipeline in one process.
    suite.run_json([py, '-m', 'bench.data_pipeline', '--workers', '0', '--batches', '4',
                    '--pil-reference', '256', '--on-device-augment'])


def e2e_part(suite, preset, args):
    e = preset['e2e']
    for on_device in e['on_device']:
        cmd = [sys.executable, '-m', 'bench.end_to_end', '--model', 'clusiam',
               '--image-size', str(e['size']), '--batch-size', str(e['batch']),
               '--dtype', e['dtype'], '--workers', str(e['workers']),
               '--steps', str(e['steps']), '--synthetic-patches', str(e['patches'])]
        suite.run_json(cmd + (['--on-device-augment'] if on_device else []))


def monitor_part(suite, preset):
    """What the label-free monitor adds to an epoch (ours only: the original has none)."""
    size, batch = preset['train'][0]
    suite.run_json([sys.executable, '-m', 'bench.monitor_overhead', '--model', 'clusiam',
                    '--image-size', str(size), '--batch-size', str(batch),
                    '--steps', str(preset['steps'])])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--preset', choices=sorted(PRESETS), default='cpu')
    parser.add_argument('--parts', nargs='+', choices=['train', 'data', 'e2e', 'monitor'],
                        default=['train', 'data', 'e2e', 'monitor'])
    parser.add_argument('--original-repo', default=os.environ.get('CLUSIAM_ORIGINAL_REPO'),
                        help="the authors' repository (git dir or extracted tree); "
                             'without it only ours runs')
    parser.add_argument('--harness', default=DEFAULT_HARNESS)
    parser.add_argument('--torch-python', default=sys.executable)
    parser.add_argument('--dtypes', nargs='+', choices=['float32', 'bfloat16'])
    parser.add_argument('--original-settings', nargs='+', choices=sorted(ORIGINAL_SETTINGS),
                        help="the original's settings the cpu preset alternates with (all)")
    parser.add_argument('--train-settings', nargs='+', metavar='SIZExBATCH',
                        help="override the preset's train settings, e.g. 64x8 224x32")
    parser.add_argument('--steps', type=int, help="override the preset's timed steps")
    parser.add_argument('--repeats', type=int, default=None,
                        help='interleaved repeats per setting (default: 2 cpu, 1 gpu)')
    parser.add_argument('--xla-variant', action='append', metavar='KEY=VALUE',
                        help="an XLA option to also try on ours at the first train setting in "
                             "float32 (repeatable; default: the preset's variants)")
    parser.add_argument('--conv-impls', nargs='+', default=['auto'],
                        choices=['auto', 'xla', 'im2col', 'onednn'],
                        help='ours with each model.conv_impl (cpu preset; default: auto)')
    parser.add_argument('--out', help='also append every JSON line to this file')
    args = parser.parse_args()
    preset = dict(PRESETS[args.preset])
    if args.train_settings:
        preset['train'] = [tuple(int(v) for v in s.split('x')) for s in args.train_settings]
    if args.steps:
        preset['steps'] = args.steps
    if args.conv_impls != ['auto'] and not preset.get('original_both'):
        parser.error(f'--conv-impls: the {args.preset} preset runs ours with auto only')
    if args.repeats is None:
        args.repeats = 1 if args.preset == 'gpu' else 2
    theirs = None
    if args.original_repo:
        if not os.path.isfile(args.harness):
            parser.error(f'--harness {args.harness}: no such file')
        theirs = [args.torch_python, args.harness, '--seed-repo', args.original_repo]
    suite = Suite(args.out)
    if theirs is None:
        suite.emit(dict(bench='note', text='no --original-repo: the original is not run, '
                                           'no ratios'))
    first, rest = preset['train'][:1], preset['train'][1:]
    if 'train' in args.parts:
        variants = preset['variants'] if args.xla_variant is None else args.xla_variant
        train_part(suite, preset, theirs, args, first, variants)
    if 'e2e' in args.parts:
        e2e_part(suite, preset, args)
    if 'train' in args.parts:
        train_part(suite, preset, theirs, args, rest)
    if 'data' in args.parts and preset['data_workers']:
        data_part(suite, preset, theirs, args)
    if 'monitor' in args.parts:
        monitor_part(suite, preset)


if __name__ == '__main__':
    main()
