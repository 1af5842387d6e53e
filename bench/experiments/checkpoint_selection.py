r"""Do the monitor's label-free scores pick good checkpoints? (issue 16, item 3)

    python -m bench.experiments.checkpoint_selection [--data ../shared/data/crchp]
        [--workdir runs/checkpoint_selection] [--backbone resnet18] [--image-size 64]
        [--epochs 10] [--steps 15] [--batch 32] [--collapse-alphas 0.99,0.001]
        [--collapse-epochs 6] [--max-train 1500] [--max-val 300] [--max-test 1500]
        [--out FILE.jsonl] [--markdown FILE.md]

Data (../shared/data/README.md; research-use only, never committed): the 100
CRCHistoPhenotypes images and their labeled nucleus centres, with the data set's own
image-level split. Everything but the loop below comes from nuclei_probe_eval (imported,
not copied): the training tiles, the nucleus crops, the splits file and `evaluate`.

  * pretraining: CluBYOL (method_config('clubyol'), K = --clusters) on `--steps *
    --batch` random `--tile` px tiles of the 70 training images, `--epochs` epochs, a
    checkpoint every epoch (all kept); ResNet-18 at 64 px by default, the size at which
    it fits a 2-core CPU budget (nuclei_probe_eval uses 96 px);
  * monitor (clusiam_jax/train/monitor.py, every epoch): `--monitor-patches` random
    tiles of the 10 validation images, unlabeled: RankMe, alignment, uniformity, cluster
    usage and the collapse flag land in the run's metrics.csv (`monitor_*`);
  * every checkpoint is exported (clusiam_jax.export.run.export at that step) over the
    nucleus crops and scored on the test images' nuclei (kNN k=1/5/20 against the train
    images' nuclei, linear probe with weight decay chosen on the validation images), plus
    `val_knn_*`: kNN of the validation nuclei against the train nuclei, the labeled
    selection rule label-free scores compete with (solo-learn / lightly style);
  * collapse runs: the same recipe with loss.alpha in --collapse-alphas (the original's
    two failure modes: a cluster weight far above the invariance weight, 0.99 ~ "1 x
    invariance + 100 x cluster"; a tiny one), each checkpoint scored the same way.

Analysis: per score, the Spearman rank correlation with the test accuracies (kNN k=1,
k=20, linear) over the main run's checkpoints, oriented so that + means "the score's
better direction goes with higher accuracy" (lower is better for alignment and
uniformity), next to the epoch itself ("later is better", the baseline to beat) and the
binomial standard error of one accuracy; the checkpoint each score selects (first epoch
reaching the best value, as train.best_metric keeps it) against the best (by test kNN
k=1) and the last one; the same over the checkpoints of all runs pooled, and whether the
selection lands on one the monitor flags as collapsed. `timings` are read back from the
runs' metrics.csv and the cached evaluations, so a rerun reports the original work.

Prints one JSON line per checkpoint, then one summary line (with the command and the
machine); --out writes the same lines to a file, --markdown the README tables. Work files
(tiles, crops, runs, exports) live under --workdir; a rerun reuses finished runs and
evaluations. When the data folder is absent it says so and exits 0.
"""
import argparse
import csv
import json
import math
import os
import sys
import time
import warnings

from bench.experiments.nuclei_probe_eval import (
    evaluate,
    evaluation_crops,
    pretrain_config,
    read_nuclei,
    write_tiles,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_DATA = os.path.join(REPO, '..', 'shared', 'data', 'crchp')

# (score, better): the monitor's label-free scores (config.MONITOR_METRICS without the
# labeled ones: the monitor tiles carry no labels), the labeled validation kNN, and the
# epoch itself: "later is better", the baseline a score must beat to be worth keeping.
SCORES = (('rankme', 'max'), ('alignment', 'min'), ('uniformity', 'min'),
          ('cluster_entropy', 'max'), ('active_clusters', 'max'),
          ('active_clusters_gumbel', 'max'), ('gumbel_agreement', 'max'),
          ('val_knn_k1_acc', 'max'), ('val_knn_k20_acc', 'max'), ('epoch', 'max'))
TARGETS = ('knn_k1_acc', 'knn_k20_acc', 'linear_acc')
TARGET = 'knn_k1_acc'


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data', default=DEFAULT_DATA)
    parser.add_argument('--workdir', default=os.path.join(REPO, 'runs',
                                                          'checkpoint_selection'))
    parser.add_argument('--backbone', default='resnet18',
                        help='resnet_tiny makes a quick smoke run (not a measurement)')
    parser.add_argument('--image-size', type=int, default=64,
                        help='views and crops resized to this (64: ResNet-18 fits a 2-core '
                             'CPU budget at about 1.4 s per step of 32 pairs)')
    parser.add_argument('--epochs', type=int, default=10)
    parser.add_argument('--steps', type=int, default=15, help='steps per epoch')
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--base-lr', type=float, default=0.4,
                        help='lr = base_lr * batch / 256 (as nuclei_probe_eval)')
    parser.add_argument('--clusters', type=int, default=10)
    parser.add_argument('--alpha', type=float, default=None,
                        help="the main run's loss.alpha (default: the CluBYOL recipe's)")
    parser.add_argument('--collapse-alphas', default='0.99,0.001',
                        help="comma-separated loss.alpha of the collapse runs ('' none)")
    parser.add_argument('--collapse-epochs', type=int, default=6,
                        help='epochs of the collapse runs (0: --epochs)')
    parser.add_argument('--monitor-patches', type=int, default=512)
    parser.add_argument('--tile', type=int, default=48)
    parser.add_argument('--crop', type=int, default=48)
    parser.add_argument('--max-train', type=int, default=1500)
    parser.add_argument('--max-val', type=int, default=300)
    parser.add_argument('--max-test', type=int, default=1500)
    parser.add_argument('--export-batch', type=int, default=256)
    parser.add_argument('--no-linear', action='store_true', help='skip the linear probe')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default='', help='also write the JSON lines here')
    parser.add_argument('--markdown', default='', help='write the README tables here')
    return parser.parse_args()


# ----------------------------------------------------------------- per checkpoint

def read_metrics(run_dir):
    """{epoch: row} of the run's metrics.csv, numbers as floats ('' -> None); a resumed
    epoch's last row wins."""
    rows = {}
    with open(os.path.join(run_dir, 'metrics.csv'), newline='') as f:
        for row in csv.DictReader(f):
            parsed = {}
            for key, value in row.items():
                try:
                    parsed[key] = float(value) if value not in ('', None) else None
                except ValueError:
                    parsed[key] = value
            rows[int(parsed['epoch'])] = parsed
    return rows


def val_knn(export_dir, splits_csv):
    """kNN of the validation nuclei against the train nuclei: the labeled selection rule."""
    from clusiam_jax.eval.knn import knn_evaluate
    from clusiam_jax.eval.tasks import patch_sets
    sets = patch_sets(export_dir, splits_csv)
    knn = knn_evaluate(*sets['train'][:2], *sets['val'][:2], ks=(1, 20))
    return {'val_knn_k1_acc': knn['k=1']['accuracy'],
            'val_knn_k20_acc': knn['k=20']['accuracy']}


def score_checkpoint(run_dir, config, step, crops, splits_csv, out_dir, linear):
    """Export checkpoint `step` over the crops and score it (cached in out_dir)."""
    from clusiam_jax.export.run import export
    cached = os.path.join(out_dir, 'scores.json')
    if os.path.exists(cached):
        with open(cached) as f:
            return json.load(f)
    start = time.perf_counter()
    config.export.data_path = crops
    config.export.out_dir = out_dir
    config.export.checkpoint = str(step)
    export(run_dir, config.export)
    export_s = time.perf_counter() - start
    if linear:
        scores = evaluate(out_dir, splits_csv)
    else:
        from clusiam_jax.eval import tasks
        knn = tasks.run_knn(out_dir, splits_csv, ks=(1, 5, 20))
        scores = {f'knn_k{k}_acc': knn[f'k={k}']['accuracy'] for k in (1, 5, 20)}
        scores.update(knn_k1_macro_f1=knn['k=1']['macro_f1'], n_reference=knn['n_reference'],
                      n_query=knn['n_query'])
    scores.update(val_knn(out_dir, splits_csv))
    scores.update(export_s=round(export_s, 1),
                  eval_s=round(time.perf_counter() - start - export_s, 1))
    with open(cached + '.tmp', 'w') as f:
        json.dump(scores, f)
    os.replace(cached + '.tmp', cached)
    return scores


def collapse_reasons(row, num_clusters, monitor_size, min_rankme):
    """Why the monitor flagged this epoch, rebuilt from its metrics.csv row (the monitor
    logs its warnings; the CSV keeps only the flag)."""
    from clusiam_jax.train.metrics import collapse_warnings
    usage = {k: row[f'monitor_{k}'] for k in ('active_clusters_gumbel', 'gumbel_agreement')
             if row.get(f'monitor_{k}') is not None}
    reasons = ['mode 1 (one cluster)' if w.startswith('collapse mode 1') else
               'mode 2 (uniform logits)'
               for w in collapse_warnings(usage, num_clusters, monitor_size)]
    if row.get('monitor_rankme') is not None and row['monitor_rankme'] < min_rankme:
        reasons.append(f'RankMe < {min_rankme:g}')
    return reasons


# ----------------------------------------------------------------- analysis

def finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def spearman(xs, ys):
    """Spearman's rho and its p value over the pairs where both are finite (None when
    fewer than 3 or one side is constant)."""
    from scipy.stats import spearmanr
    pairs = [(x, y) for x, y in zip(xs, ys) if finite(x) and finite(y)]
    if len(pairs) < 3 or len({p[0] for p in pairs}) < 2 or len({p[1] for p in pairs}) < 2:
        return None, None
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        rho, p = spearmanr([p[0] for p in pairs], [p[1] for p in pairs])
    return round(float(rho), 3), round(float(p), 4)


def select(rows, score, better):
    """The row train.best_metric would keep: the first reaching the best finite value."""
    chosen = None
    for row in rows:
        value = row.get(score)
        if not finite(value):
            continue
        if chosen is None or (value > chosen[score] if better == 'max' else
                              value < chosen[score]):
            chosen = row
    return chosen


def rounded(x, digits):
    return round(x, digits) if finite(x) else None


def brief(row):
    keys = ('run', 'epoch', 'collapse') + TARGETS
    return {k: row.get(k) for k in keys} if row else None


def oriented_rho(rows, score, better):
    """Spearman of the score (negated when lower is better) with each target."""
    sign = 1 if better == 'max' else -1
    oriented = [sign * r[score] if finite(r.get(score)) else None for r in rows]
    out = {}
    for target in TARGETS:
        out[f'rho_{target}'], out[f'p_{target}'] = spearman(
            oriented, [r.get(target) for r in rows])
    return out


def analyse(rows, main_run):
    main = [r for r in rows if r['run'] == main_run]
    correlations, pooled_correlations, selection = {}, {}, {}
    for score, better in SCORES:
        correlations[score] = dict(better=better, **oriented_rho(main, score, better))
        pooled_correlations[score] = oriented_rho(rows, score, better)
        selection[score] = brief(select(main, score, better))
    selection['best_test_knn_k1 (oracle)'] = brief(select(main, TARGET, 'max'))
    selection['last'] = brief(main[-1])
    pooled = {score: brief(select(rows, score, better)) for score, better in SCORES}
    pooled['best_test_knn_k1 (oracle)'] = brief(select(rows, TARGET, 'max'))
    collapse = {}
    for name in dict.fromkeys(r['run'] for r in rows):
        run_rows = [r for r in rows if r['run'] == name]
        collapse[name] = {
            'alpha': run_rows[0]['alpha'],
            'flagged_epochs': [r['epoch'] for r in run_rows if r['collapse']],
            'reasons': sorted({x for r in run_rows for x in r['collapse_reasons']}),
            **{key: [rounded(r.get(key), 3) for r in run_rows] for key in
               ('rankme', 'active_clusters_gumbel', 'gumbel_agreement', 'knn_k1_acc')},
            'selected_epochs': {score: (select(run_rows, score, better) or {}).get('epoch')
                                for score, better in SCORES}}
    # Binomial standard error of one checkpoint's test accuracy (at the main run's mean):
    # differences between checkpoints smaller than ~2 of these are sampling noise.
    standard_error = {}
    for target in TARGETS:
        values = [r[target] for r in main if finite(r.get(target))]
        n = main[0].get('n_query') or main[0].get('n_test')
        if values and n:
            p = sum(values) / len(values)
            standard_error[target] = round(math.sqrt(p * (1 - p) / n), 4)
    return {'accuracy_se': standard_error, 'correlations': correlations,
            'selection': selection,
            'pooled_correlations': pooled_correlations, 'pooled_selection': pooled,
            'collapse': collapse}


def fmt(x, digits=3):
    return '-' if x is None else (f'{x:.{digits}f}' if isinstance(x, float) else str(x))


def markdown(summary, main_run):
    """The README tables: correlation and selection (main run), collapse runs, pooled."""
    a = summary['analysis']
    se = ', '.join(f'{k} {v:.3f}' for k, v in a['accuracy_se'].items())
    lines = [f'Main run ({main_run}), {summary["settings"]["epochs"]} checkpoints. '
             f"rho: Spearman with the test accuracy, + = the score's better direction "
             f'goes with higher accuracy. Standard error of one accuracy: {se}.', '',
             '| score (better) | rho kNN k=1 | rho kNN k=20 | rho linear | picks epoch '
             '| test kNN k=1 | kNN k=20 | linear |', '|---|---|---|---|---|---|---|---|']
    for score, better in SCORES:
        c, s = a['correlations'][score], a['selection'][score] or {}
        lines.append(f'| {score} ({better}) | {fmt(c["rho_knn_k1_acc"], 2)} | '
                     f'{fmt(c["rho_knn_k20_acc"], 2)} | {fmt(c["rho_linear_acc"], 2)} | '
                     f'{fmt(s.get("epoch"))} | {fmt(s.get("knn_k1_acc"))} | '
                     f'{fmt(s.get("knn_k20_acc"))} | {fmt(s.get("linear_acc"))} |')
    for name in ('best_test_knn_k1 (oracle)', 'last'):
        s = a['selection'][name]
        lines.append(f'| *{name}* | | | | {s["epoch"]} | {fmt(s["knn_k1_acc"])} | '
                     f'{fmt(s["knn_k20_acc"])} | {fmt(s["linear_acc"])} |')
    lines += ['', '| run | loss.alpha | flagged epochs | why | RankMe per epoch '
              '| active clusters (Gumbel) | Gumbel agreement | test kNN k=1 per epoch |',
              '|---|---|---|---|---|---|---|---|']
    for name, c in a['collapse'].items():
        lines.append(f'| {name} | {c["alpha"]:g} | {c["flagged_epochs"] or "none"} | '
                     f'{", ".join(c["reasons"]) or "-"} | '
                     f'{" ".join(fmt(x, 1) for x in c["rankme"])} | '
                     f'{" ".join(fmt(x, 0) for x in c["active_clusters_gumbel"])} | '
                     f'{" ".join(fmt(x, 2) for x in c["gumbel_agreement"])} | '
                     f'{" ".join(fmt(x, 2) for x in c["knn_k1_acc"])} |')
    lines += ['', 'Over the checkpoints of all runs pooled:', '',
              '| score | rho kNN k=1 | picks run, epoch | flagged collapsed | test kNN k=1 |',
              '|---|---|---|---|---|']
    for name, s in a['pooled_selection'].items():
        rho = a['pooled_correlations'].get(name, {}).get('rho_knn_k1_acc')
        if s:
            lines.append(f'| {name} | {fmt(rho, 2)} | {s["run"]}, {s["epoch"]} | '
                         f'{"yes" if s["collapse"] else "no"} | {fmt(s["knn_k1_acc"])} |')
    return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------- main

def run_config(args, tiles, monitor_tiles, alpha, epochs):
    c = pretrain_config('clubyol', args, tiles)
    if alpha is not None:
        c.loss.alpha = alpha
    c.train.num_epochs = epochs
    c.train.checkpoint_every_epochs = 1
    c.train.keep_checkpoints = epochs + 1
    c.monitor.every_epochs = 1
    c.monitor.data_path = monitor_tiles
    c.monitor.num_patches = args.monitor_patches
    return c


def main():
    args = parse_args()
    data = os.path.abspath(args.data)
    if not os.path.exists(os.path.join(data, 'nuclei.csv')):
        print(f'crchp data not found at {data} (nuclei.csv + images/, see '
              f'../shared/data/README.md); nothing to measure.')
        return 0

    from bench.common import machine_info
    from clusiam_jax.train.loop import train

    wall = time.perf_counter()
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    nuclei = read_nuclei(data)
    image_split = {n['image']: n['split'] for n in nuclei}
    images = {s: sorted(i for i, t in image_split.items() if t == s)
              for s in ('train', 'validation')}
    count = args.steps * args.batch
    tiles = write_tiles(data, images['train'], os.path.join(
        work, f'tiles{args.tile}_{count}_s{args.seed}'), args.tile, count, args.seed)
    monitor_tiles = write_tiles(data, images['validation'], os.path.join(
        work, f'monitor_tiles{args.tile}_{args.monitor_patches}_s{args.seed}'), args.tile,
        args.monitor_patches, args.seed)
    monitor_size = sum(len(files) for _, _, files in os.walk(monitor_tiles))
    chosen, crops, splits_csv = evaluation_crops(data, nuclei, args, work)

    runs = [('main', args.alpha, args.epochs)]
    for a in filter(None, args.collapse_alphas.split(',')):
        runs.append((f'alpha_{a}', float(a), args.collapse_epochs or args.epochs))
    tag = f'{args.backbone}_{args.image_size}px_b{args.batch}_s{args.steps}_k{args.clusters}'

    rows, timings = [], {}
    out = open(args.out, 'w') if args.out else None

    def emit(record):
        line = json.dumps(record)
        print(line, flush=True)
        if out:
            out.write(line + '\n')
            out.flush()

    for name, alpha, epochs in runs:
        config = run_config(args, tiles, monitor_tiles, alpha, epochs)
        run_dir = os.path.join(work, 'runs', f'{tag}_a{config.loss.alpha:g}_e{epochs}')
        start = time.perf_counter()
        train(config, run_dir)
        train_s = time.perf_counter() - start
        metrics = read_metrics(run_dir)
        start = time.perf_counter()
        for epoch in sorted(metrics):
            m = metrics[epoch]
            step = int(m['step'])
            scores = score_checkpoint(run_dir, config, step, crops, splits_csv,
                                      os.path.join(run_dir, 'exports', f'step_{step}'),
                                      not args.no_linear)
            row = {'run': name, 'backbone': args.backbone, 'image_size': args.image_size,
                   'alpha': float(config.loss.alpha), 'epoch': epoch,
                   'step': step, 'collapse': bool(m.get('monitor_collapse')),
                   'collapse_reasons': collapse_reasons(m, args.clusters, monitor_size,
                                                        float(config.monitor.min_rankme))}
            row.update({k[len('monitor_'):]: v for k, v in m.items()
                        if k.startswith('monitor_') and k not in ('monitor_collapse',
                                                                  'monitor_seconds')})
            row['monitor_s'] = m.get('monitor_seconds')
            row.update({f'train_{k}': m.get(k) for k in
                        ('loss', 'invariance', 'cluster', 'active_clusters_gumbel',
                         'gumbel_agreement', 'time_s')})
            row.update(scores)
            rows.append(row)
            emit(row)
        # From what the run and the evaluations recorded, so a rerun over cached work
        # reports the times of the work, not of reading it back.
        timings[name] = {
            'epochs_s': round(sum(m['time_s'] for m in metrics.values()), 1),
            'monitor_s': round(sum(m.get('monitor_seconds') or 0 for m in metrics.values()), 1),
            'export_s': round(sum(r['export_s'] for r in rows if r['run'] == name), 1),
            'eval_s': round(sum(r['eval_s'] for r in rows if r['run'] == name), 1),
            'this_process_s': round(train_s + time.perf_counter() - start, 1)}

    settings = {'method': 'clubyol', 'backbone': args.backbone,
                'image_size': args.image_size, 'tile': args.tile, 'crop': args.crop,
                'batch': args.batch, 'steps_per_epoch': args.steps, 'epochs': args.epochs,
                'collapse_epochs': args.collapse_epochs or args.epochs,
                'clusters': args.clusters, 'base_lr': args.base_lr,
                'main_alpha': rows[0]['alpha'] if rows else None,
                'monitor_set': f'{monitor_size} unlabeled {args.tile} px tiles of the '
                               f'{len(images["validation"])} validation images',
                'eval': f'{args.crop} px nucleus crops: <= {args.max_train} train-image '
                        f'nuclei as references, <= {args.max_test} test-image nuclei as '
                        f'queries, <= {args.max_val} validation-image nuclei for the '
                        f"linear probe's weight decay and val_knn"}
    summary = {'summary': 'checkpoint_selection', 'settings': settings,
               'analysis': analyse(rows, 'main'), 'timings': timings,
               'this_process_wall_s': round(time.perf_counter() - wall, 1),
               **machine_info()}
    emit(summary)
    if out:
        out.close()
    if args.markdown:
        with open(args.markdown, 'w') as f:
            f.write(markdown(summary, 'main'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
