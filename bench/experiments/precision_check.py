r"""model.dtype=bfloat16 against float32 on a short real-data run, beside seed noise.

  python -m bench.experiments.precision_check [--data ../shared/data/crchp]
      [--methods clusiam,clubyol] [--backbone resnet18] [--image-size 64] [--batch 32]
      [--steps 60] [--last 20] [--conv-impl IMPL] [--plot curves.png]

For each method, three runs of --steps steps on the *same* batches (augmented views of
real H&E tiles, drawn once by the project's data pipeline):

  float32  seed A   the reference;
  bfloat16 seed A   same init, same Gumbel noise, same data: only the arithmetic differs;
  float32  seed B   another init and Gumbel stream: the run-to-run noise yardstick.

Training is chaotic (a flipped Gumbel argmax changes the next gradient), so after a few
steps bf16 and f32 follow different trajectories, as two seeds do. bf16 is "within noise"
when its gap to the f32 reference is of the size of the seed-B gap: compare
`gap_bf16` with `gap_seed` in the summary line (the final loss level, mean of the last
--last steps; the whole curve's mean and max |difference|; step 0, where only rounding
differs). One pair of seeds is a noisy yardstick: run with other --seed-b values before
reading much into a ratio near 1.

The summary's `verdict` says whether bf16 diverged: a non-finite bf16 loss, or a bf16
gap more than --diverge-factor times the seed gap, on the final level or on the whole
curve's mean |difference|. The final-level yardstick is the larger of the seed pair's
final gap and its curve mean |difference|, because one pair's final levels can agree
by chance and a near-zero yardstick would call ordinary noise a divergence.

--plot writes one PNG with, per method, the three loss curves overlaid
(bench/plot_curves.py, Pillow). --conv-impl sets model.conv_impl for every run (default:
the config's), so the same check reruns on another convolution kernel.

Data: the 100 500x500 crchp images (../shared/data/README.md; research use, never
committed) cut into --tile px tiles in a temporary folder (or --workdir, reused), then
the recipe's augmentation crops them to --image-size. One JSON line per run, one summary
per method, and a last line with the machine and the command.
"""
import argparse
import math
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_DATA = os.path.join(REPO, '..', 'shared', 'data', 'crchp')


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data', default=DEFAULT_DATA, help='folder with images/*.png')
    parser.add_argument('--workdir', default=None,
                        help='where tiles and stats go (default: a temporary folder)')
    parser.add_argument('--methods', default='clusiam,clubyol')
    parser.add_argument('--backbone', default='resnet18')
    parser.add_argument('--image-size', type=int, default=64)
    parser.add_argument('--tile', type=int, default=96)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--steps', type=int, default=60)
    parser.add_argument('--last', type=int, default=20, help='steps in the final-loss mean')
    parser.add_argument('--base-lr', type=float, default=0.4,
                        help='lr = base_lr * batch / 256 (recipes: 0.05; a short run moves '
                             'more with a larger one)')
    parser.add_argument('--clusters', type=int, default=None, help="default: the recipe's")
    parser.add_argument('--seed-a', type=int, default=0)
    parser.add_argument('--seed-b', type=int, default=1)
    parser.add_argument('--conv-impl', default=None, choices=conv_impls(),
                        help="model.conv_impl for every run (default: the config's)")
    parser.add_argument('--diverge-factor', type=float, default=3.0,
                        help='bf16 "diverged" when its gap exceeds this times the seed gap')
    parser.add_argument('--plot', default=None, metavar='PATH.png',
                        help='write the loss curves, per method, overlaid in one PNG')
    return parser.parse_args()


def conv_impls():
    """The convolution implementations the config accepts (the models' list, so a new
    kernel is selectable here as soon as the config takes it)."""
    from clusiam_jax.models.conv import CONV_IMPLS
    return CONV_IMPLS


def make_tiles(data_dir, work, tile):
    """Every non-overlapping --tile px tile of every image, as <image>/<x>_<y>.png."""
    from bench.experiments.nuclei_probe_eval import write_tiles
    names = sorted(f[:-4] for f in os.listdir(os.path.join(data_dir, 'images'))
                   if f.endswith('.png'))
    return write_tiles(data_dir, names, os.path.join(work, f'tiles{tile}'), tile,
                       count=10**9, seed=0)


def run_config(method, args, tiles, dtype, seed):
    from clusiam_jax.config import method_config
    c = method_config(method)
    c.model.backbone, c.model.dtype = args.backbone, dtype
    if args.conv_impl:
        c.model.conv_impl = args.conv_impl
    if args.clusters:
        c.model.num_clusters = args.clusters
    c.data.path, c.data.image_size = tiles, args.image_size
    c.train.batch_size, c.train.seed = args.batch, seed
    c.optim.base_lr = args.base_lr
    return c


def fixed_batches(config, work, steps):
    """The first `steps` batches of the pipeline (seed A's augmentation draws), in memory,
    so every run sees the same views; and the data set's mean/std."""
    from clusiam_jax.data.pipeline import create_train_loader
    probe = create_train_loader(config, workdir=work)
    config.train.num_epochs = -(-steps // probe.steps_per_epoch)  # enough epochs
    loader = create_train_loader(config, workdir=work)
    iterator = loader.iterator()
    return [next(iterator) for _ in range(steps)], loader.mean, loader.std


def train_curve(compiled, state, batches):
    """Per-step metrics of `len(batches)` steps and the median step seconds."""
    import jax
    import numpy as np
    metrics, times = [], []
    for batch in batches:
        start = time.perf_counter()
        state, m = compiled(state, batch)
        metrics.append(jax.device_get(m))  # waits for the step: per-step timing
        times.append(time.perf_counter() - start)
    curves = {k: np.array([float(m[k]) for m in metrics])
              for k in ('loss', 'invariance', 'cluster') if k in metrics[0]}
    return curves, float(np.median(times))


def method_runs(method, args, tiles, batches, mean, std):
    """{label: curves} for f32 seed A, bf16 seed A and f32 seed B; emits one line each.
    The seed lives in the train state only, so both float32 runs share one compilation."""
    from bench.common import bench_trainer, emit
    runs, compiled = {}, {}
    for label, dtype, seed in (('f32', 'float32', args.seed_a), ('bf16', 'bfloat16', args.seed_a),
                               ('f32_seed_b', 'float32', args.seed_b)):
        config = run_config(method, args, tiles, dtype, seed)
        trainer = bench_trainer(config, steps_per_epoch=args.steps, mean=mean, std=std)
        state = trainer.init_state()
        compile_s = 0.0
        if dtype not in compiled:
            compiled[dtype], compile_s = trainer.compile(state, batches[0])
        curves, step_s = train_curve(compiled[dtype], state, batches)
        runs[label] = curves
        emit({'bench': 'precision_check', 'method': method, 'run': label, 'dtype': dtype,
              'seed': seed, 'conv_impl': config.model.conv_impl,
              'finite': bool(all(math.isfinite(x) for x in curves['loss'])),
              'compile_s': round(compile_s, 1), 'step_s_median': round(step_s, 3),
              'loss_step0': round(float(curves['loss'][0]), 5),
              **{f'{k}_last{args.last}_mean': round(float(v[-args.last:].mean()), 5)
                 for k, v in curves.items()},
              'loss_curve': [round(float(x), 4) for x in curves['loss']]})
    return runs


def gaps(reference, other, last):
    """How far `other`'s loss curve is from `reference`'s."""
    import numpy as np
    a, b = reference['loss'], other['loss']
    return {'final': round(float(b[-last:].mean() - a[-last:].mean()), 5),
            'curve_mean_abs': round(float(np.abs(b - a).mean()), 5),
            'curve_max_abs': round(float(np.abs(b - a).max()), 5),
            'step0_abs': round(float(abs(b[0] - a[0])), 5)}


def verdict(gap_bf16, gap_seed, runs, factor):
    """Whether bf16 diverged from the float32 reference, and why (module docstring).
    None when the float32 runs themselves are not finite: then nothing is measured."""
    def finite(label):
        return all(math.isfinite(x) for x in runs[label]['loss'])
    if not (finite('f32') and finite('f32_seed_b')):
        return {'diverged': None, 'reasons': ['a float32 run has a non-finite loss']}
    tol_final = factor * max(abs(gap_seed['final']), gap_seed['curve_mean_abs'])
    tol_curve = factor * gap_seed['curve_mean_abs']
    reasons = []
    if not finite('bf16'):
        reasons.append('non-finite bf16 loss')
    else:
        if abs(gap_bf16['final']) > tol_final:
            reasons.append(f"|final gap| {abs(gap_bf16['final']):.5f} > {tol_final:.5f}")
        if gap_bf16['curve_mean_abs'] > tol_curve:
            reasons.append(f"curve mean |gap| {gap_bf16['curve_mean_abs']:.5f} > "
                           f'{tol_curve:.5f}')
    return {'diverged': bool(reasons), 'reasons': reasons, 'factor': factor,
            'tolerance_final': round(tol_final, 5), 'tolerance_curve': round(tol_curve, 5)}


def plot(path, args, conv_impl, results):
    """One PNG: per method, the three loss curves overlaid, the gaps in the subtitle."""
    from bench.plot_curves import save_curve_panels
    names = {'f32': f'float32, seed {args.seed_a}', 'bf16': f'bfloat16, seed {args.seed_a}',
             'f32_seed_b': f'float32, seed {args.seed_b}'}
    panels = []
    for method, runs, summary in results:
        diverged = {True: 'yes', False: 'no', None: 'unknown'}[summary['verdict']['diverged']]
        panels.append((f'{method}: gap to float32 seed {args.seed_a} in the mean of the last '
                       f"{args.last} steps: bfloat16 {summary['gap_bf16']['final']:+.5f}, "
                       f"float32 seed {args.seed_b} {summary['gap_seed']['final']:+.5f}; "
                       f'diverged: {diverged}',
                       [(names[k], list(map(float, runs[k]['loss']))) for k in names]))
    title = (f'bfloat16 vs float32 training loss, {args.methods.replace(",", " / ")}\n'
             f'{args.backbone}, {args.image_size} px, batch {args.batch}, {args.steps} steps, '
             f'lr {args.base_lr} x batch/256, conv_impl {conv_impl}; same real-tissue '
             f'batches (crchp tiles) for all runs')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_curve_panels(path, title, panels)


def main():
    args = parse_args()
    data = os.path.abspath(args.data)
    if not os.path.isdir(os.path.join(data, 'images')):
        print(f'no images/ under {data} (../shared/data/README.md); nothing to check.')
        return 0
    from bench.common import emit, machine_info
    with tempfile.TemporaryDirectory(prefix='precision_check_') as tmp:
        work = os.path.abspath(args.workdir) if args.workdir else tmp
        os.makedirs(work, exist_ok=True)
        tiles = make_tiles(data, work, args.tile)
        batches, mean, std = fixed_batches(
            run_config('clusiam', args, tiles, 'float32', args.seed_a), work, args.steps)
        conv_impl = run_config('clusiam', args, tiles, 'float32', 0).model.conv_impl
        results = []
        for method in args.methods.split(','):
            runs = method_runs(method, args, tiles, batches, mean, std)
            summary = {'gap_bf16': gaps(runs['f32'], runs['bf16'], args.last),
                       'gap_seed': gaps(runs['f32'], runs['f32_seed_b'], args.last)}
            summary['verdict'] = verdict(summary['gap_bf16'], summary['gap_seed'], runs,
                                         args.diverge_factor)
            emit({'bench': 'precision_check', 'method': method, 'summary': True,
                  'last': args.last, 'steps': args.steps, 'conv_impl': conv_impl, **summary})
            results.append((method, runs, summary))
    if args.plot:
        plot(args.plot, args, conv_impl, results)
    emit({**machine_info(), 'bench': 'precision_check', 'backbone': args.backbone,
          'image_size': args.image_size, 'batch': args.batch, 'steps': args.steps,
          'base_lr': args.base_lr, 'tile': args.tile, 'conv_impl': conv_impl,
          'plot': args.plot, 'data': data})
    return 0


if __name__ == '__main__':
    sys.exit(main())
