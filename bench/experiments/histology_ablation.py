r"""Do the histology options help at a CPU budget? (issue 26, item 5)

    python -m bench.experiments.histology_ablation [--data ../shared/data/crchp]
        [--slides ../shared/data/slides/cmu-1-small-region.svs] [--seeds 0,1,2,3,4]
        [--variants grid,hed,mpps,tissue_random] [--backbone resnet_tiny] [--epochs 8]
        [--out FILE.jsonl]

Pretraining data: the shared CC0 slide region tiled at 0.5 µm/px into `--patch` px
patches (python launch.py --mode tile, as a user runs it). Each variant trains CluBYOL
(the recipe, K = --clusters) on that tiling for --epochs epochs with one option on:

  * grid: the recipe as it is (the fixed grid, one resolution, natural-image jitter);
  * hed: augment.hed=0.05 (Tellez et al.'s "HED-light");
  * mpps: data.mpps=(0.5, 1.0, 2.0), equal weights (both views at one drawn resolution);
  * tissue_random: data.sampling=tissue_random (fresh positions in the tissue every epoch).

Evaluation, as nuclei_probe_eval (imported, not copied): the last checkpoint is exported
over 48 px nucleus crops of the CRCHistoPhenotypes images (20x, ~0.5 µm/px: the tiling's
resolution) and scored by kNN (k = 1, 20) and the linear probe with the data set's own
image-level split. Every variant runs with every seed in --seeds; the summary gives per
variant the mean and standard deviation over seeds and, against `grid`, the mean paired
difference with its standard error: a difference inside the paired t test's 95% bound
(t95 x standard error) is not separable from seed noise at this budget, and the summary
says so.

`cost` rows: pairs per second of the training loader alone (no model, 0 workers) for each
variant, measured one after the other in this process on the same tiling, with the ratio
to `grid` (the extra CPU an option costs per pair).

One JSON line per run, one per cost measure, one summary line (command, machine);
--out writes them to a file too. Work files live under --workdir; a rerun reuses finished
runs and evaluations. Without the crchp folder it says so and exits 0.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

from bench.experiments.nuclei_probe_eval import evaluate, evaluation_crops, read_nuclei

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = os.path.join(REPO, '..', 'shared', 'data')
VARIANTS = {
    'grid': {},
    'hed': {'augment.hed': 0.05},
    'mpps': {'data.mpps': (0.5, 1.0, 2.0)},
    'tissue_random': {'data.sampling': 'tissue_random'},
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', default=os.path.join(SHARED, 'crchp'))
    p.add_argument('--slides', default=os.path.join(SHARED, 'slides', 'cmu-1-small-region.svs'))
    p.add_argument('--workdir', default=os.path.join(REPO, 'runs', 'histology_ablation'))
    p.add_argument('--variants', default=','.join(VARIANTS))
    p.add_argument('--seeds', default='0,1,2,3,4', help='training seeds, one run each')
    p.add_argument('--seed', type=int, default=0, help='draws the evaluation nuclei')
    p.add_argument('--backbone', default='resnet_tiny',
                   help='resnet18 is the measurement a GPU affords; resnet_tiny fits the CPU')
    p.add_argument('--patch', type=int, default=64, help='tile.patch_size at 0.5 µm/px')
    p.add_argument('--image-size', type=int, default=64)
    p.add_argument('--epochs', type=int, default=8)
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--base-lr', type=float, default=0.4)
    p.add_argument('--clusters', type=int, default=10)
    p.add_argument('--crop', type=int, default=48)
    p.add_argument('--max-train', type=int, default=1500)
    p.add_argument('--max-val', type=int, default=300)
    p.add_argument('--max-test', type=int, default=1500)
    p.add_argument('--cost-pairs', type=int, default=256, help='pairs per cost measure (0: none)')
    p.add_argument('--out', default='')
    return p.parse_args()


def tile(slides, out_dir, patch):
    """The tiling, made once by the CLI (a user's command), reused by every run."""
    if os.path.exists(os.path.join(out_dir, 'slides.csv')):
        return out_dir
    subprocess.run([sys.executable, os.path.join(REPO, 'launch.py'), '--mode', 'tile',
                    '--config', os.path.join(REPO, 'configs', 'clubyol.py'),
                    f'--config.tile.slides={slides}', f'--config.tile.out_dir={out_dir}',
                    f'--config.tile.patch_size={patch}'], check=True)
    return out_dir


def run_config(args, tiling, variant, seed):
    from ml_collections.config_flags import config_path

    from clusiam_jax.config import method_config
    c = method_config('clubyol')
    c.model.backbone = args.backbone
    c.model.num_clusters = args.clusters
    c.data.path = tiling
    c.data.image_size = args.image_size
    c.train.batch_size = args.batch
    c.train.num_epochs = args.epochs
    c.train.seed = seed
    c.train.log_every_steps = 10
    c.train.checkpoint_every_epochs = args.epochs
    c.optim.base_lr = args.base_lr
    c.export.batch_size = 256
    for key, value in VARIANTS[variant].items():
        config_path.set_value(key, c, value)
    return c


def score(run_dir, config, crops, splits_csv):
    """The last checkpoint exported over the crops and scored (cached)."""
    from clusiam_jax.export.run import export
    cached = os.path.join(run_dir, 'ablation_scores.json')
    if os.path.exists(cached):
        with open(cached) as f:
            return json.load(f)
    config.export.data_path = crops
    config.export.out_dir = os.path.join(run_dir, 'crops_export')
    export(run_dir, config.export)
    scores = evaluate(config.export.out_dir, splits_csv)
    with open(cached + '.tmp', 'w') as f:
        json.dump(scores, f)
    os.replace(cached + '.tmp', cached)
    return scores


def loader_cost(args, tiling, variant):
    """Pairs per second of the training loader alone for one variant (0 workers)."""
    from clusiam_jax.data.pipeline import create_train_loader
    config = run_config(args, tiling, variant, 0)
    config.data.mean, config.data.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    loader = create_train_loader(config)
    batches = iter(loader.iterator())
    next(batches)   # opening the slide and the first reads are not the per-pair cost
    wanted = max(1, args.cost_pairs // args.batch)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(wanted):
        next(batches)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    pairs = wanted * args.batch
    return {'pairs_per_s': round(pairs / wall, 1), 'cpu_ms_per_pair': round(1e3 * cpu / pairs, 2)}


def mean_sd(values):
    m = sum(values) / len(values)
    if len(values) < 2:
        return round(m, 4), 0.0
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return round(m, 4), round(sd, 4)


def summarize(rows, variants, metrics=('knn_k1_acc', 'knn_k20_acc', 'linear_acc')):
    from scipy.stats import t as student_t
    out = {}
    base = {r['seed']: r for r in rows if r['variant'] == 'grid'}
    for v in variants:
        mine = [r for r in rows if r['variant'] == v]
        entry = {m: dict(zip(('mean', 'sd'), mean_sd([r[m] for r in mine]))) for m in metrics}
        paired = [r for r in mine if r['seed'] in base]
        if v != 'grid' and len(paired) > 1:
            for m in metrics:
                d = [r[m] - base[r['seed']][m] for r in paired]
                md, sd = mean_sd(d)
                se = sd / math.sqrt(len(d))
                # Two-sided 95% with the paired t (few seeds: 2 standard errors would claim
                # too much at 2-4 degrees of freedom).
                t95 = float(student_t.ppf(0.975, len(d) - 1))
                entry[m].update(diff_vs_grid=md, diff_se=round(se, 4), t95=round(t95, 3),
                                separable=bool(se > 0 and abs(md) > t95 * se))
        out[v] = entry
    return out


def main():
    args = parse_args()
    data = os.path.abspath(args.data)
    if not os.path.exists(os.path.join(data, 'nuclei.csv')):
        print(f'crchp data not found at {data} (../shared/data/README.md); nothing to measure.')
        return 0
    from bench.common import machine_info
    from clusiam_jax.train.loop import train

    variants = [v for v in args.variants.split(',') if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f'error: unknown variant(s) {unknown}; known: {", ".join(VARIANTS)}')
    seeds = [int(s) for s in args.seeds.split(',') if s]
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    tiling = tile(os.path.abspath(args.slides), os.path.join(work, f'tiling{args.patch}'),
                  args.patch)
    nuclei = read_nuclei(data)
    _, crops, splits_csv = evaluation_crops(data, nuclei, args, work)
    out = open(args.out, 'a') if args.out else None

    def emit(record):
        print(json.dumps(record), flush=True)
        if out:
            out.write(json.dumps(record) + '\n')
            out.flush()

    wall = time.perf_counter()
    if args.cost_pairs:
        costs = {v: loader_cost(args, tiling, v) for v in variants}
        for v, c in costs.items():
            ratio = (costs['grid']['cpu_ms_per_pair'] and
                     round(c['cpu_ms_per_pair'] / costs['grid']['cpu_ms_per_pair'], 2)
                     ) if 'grid' in costs else None
            emit({'cost': v, **c, 'cpu_ratio_to_grid': ratio, 'patch': args.patch,
                  'image_size': args.image_size})
    rows = []
    for seed in seeds:
        for v in variants:
            config = run_config(args, tiling, v, seed)
            run_dir = os.path.join(work, 'runs', f'{v}_s{seed}_{args.backbone}_e{args.epochs}')
            start = time.perf_counter()
            train(config, run_dir)
            row = {'variant': v, 'seed': seed, 'train_s': round(time.perf_counter() - start, 1)}
            row.update(score(run_dir, config, crops, splits_csv))
            rows.append(row)
            emit(row)
    emit({'summary': 'histology_ablation', 'variants': summarize(rows, variants),
          'settings': {k: v for k, v in vars(args).items() if k not in ('out',)},
          'wall_s': round(time.perf_counter() - wall, 1),
          'command': ' '.join(['python -m bench.experiments.histology_ablation'] + sys.argv[1:]),
          'machine': machine_info()})
    return 0


if __name__ == '__main__':
    sys.exit(main())
