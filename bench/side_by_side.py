r"""Ours beside the authors' PyTorch code, same settings, interleaved, printing ratios.

  python bench/side_by_side.py --original-repo /path/to/CluSiam.git \
      [--torch-python PY] [--what train data] [--repeats 2]

For each setting it runs bench/train_step.py (or bench/data_pipeline.py) and
../shared/bench/torch_original.py alternately, `--repeats` times each, and prints every
JSON line it gets plus one `ratio` line per setting (ours / original, medians over the
repeats). Interleaving keeps the ratio meaningful on a shared machine, where absolute
times drift. The original's code is never copied here: its harness extracts it from the
repository given (e.g. one brought by `git clone https://github.com/wwyi1828/CluSiam`).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(REPO, '..', 'shared', 'bench', 'torch_original.py')
TRAIN_SETTINGS = [(m, size, batch) for m in ('clusiam', 'clubyol')
                  for size, batch in ((224, 32), (64, 64))]
DATA_WORKERS = (0, 1, 2)


def run_json(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [l for l in out.stdout.splitlines() if l.startswith('{')]
    if out.returncode or not lines:
        raise RuntimeError(f'{" ".join(cmd)} failed:\n{out.stderr[-2000:]}')
    record = json.loads(lines[-1])
    print(json.dumps(record), flush=True)
    return record


def compare(label, ours_cmd, theirs_cmd, ours_key, theirs_key, repeats):
    ours, theirs = [], []
    for i in range(repeats):
        # Alternate who goes first so a drifting machine load biases neither side.
        pair = [(ours_cmd, ours, ours_key), (theirs_cmd, theirs, theirs_key)]
        for cmd, results, key in (pair if i % 2 == 0 else pair[::-1]):
            results.append(run_json(cmd)[key])
    ratio = statistics.median(ours) / statistics.median(theirs)
    print(json.dumps(dict(bench='ratio', setting=label, metric='pairs_per_s',
                          ours=statistics.median(ours), original=statistics.median(theirs),
                          ratio=round(ratio, 3))), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--original-repo', required=True)
    parser.add_argument('--torch-python', default=sys.executable)
    parser.add_argument('--what', nargs='+', choices=['train', 'data'], default=['train', 'data'])
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--steps', type=int, default=5)
    args = parser.parse_args()
    theirs = [args.torch_python, HARNESS, '--seed-repo', args.original_repo]
    if 'train' in args.what:
        for model, size, batch in TRAIN_SETTINGS:
            common = ['--model', model, '--image-size', str(size), '--batch-size', str(batch),
                      '--steps', str(args.steps), '--warmup', '2']
            compare(f'train {model} {size}px batch {batch}',
                    [sys.executable, 'bench/train_step.py'] + common,
                    theirs + ['--bench', 'train', '--threads', '2'] + common,
                    'pairs_per_s', 'images_per_s', args.repeats)  # its image = our pair
    if 'data' in args.what:
        for workers in DATA_WORKERS:
            compare(f'data {workers} workers',
                    [sys.executable, 'bench/data_pipeline.py', '--workers', str(workers)],
                    theirs + ['--bench', 'data', '--workers', str(workers)],
                    'pairs_per_s', 'pairs_per_s', args.repeats)


if __name__ == '__main__':
    main()
