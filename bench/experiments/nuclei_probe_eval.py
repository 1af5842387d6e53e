"""kNN and linear-probe accuracy on CRCHistoPhenotypes nuclei: random init vs CluBYOL vs BYOL.

    python -m bench.experiments.nuclei_probe_eval [--data ../shared/data/crchp]
        [--workdir runs/nuclei_probe_eval] [--steps 30] [--batch 32] [--max-train 2000]
        [--max-val 500] [--max-test 2000] [--models random,clubyol,byol]

Data (../shared/data/README.md; research-use only, never committed): 100 H&E images of
500x500 px with 22,444 labeled nucleus centres and the data set's own image-level split.
  * pretraining: the train images cut into `--tile` px tiles (48: about the crop size),
    `--steps * --batch` of them drawn at random, one epoch (so exactly `--steps` steps),
    ResNet-18, views resized to `--image-size` (96: ResNet-18 is slow on CPU when its
    last maps are 2x2, see DESIGN.md);
  * evaluation: `--crop` px crops centred on the nuclei (reflect-padded at the image
    border), a random subset per split; embedded by the project's export (whole crop
    resized to the training image size, training normalization, inference-mode BN);
    kNN (cosine, references = train images, queries = test images) and a linear probe
    (weight decay chosen on the validation images) through clusiam_jax.eval.tasks;
  * models: (a) randomly initialized encoder, (b) CluBYOL, (c) BYOL, both trained here
    for the same number of steps by the training loop (clusiam_jax.train.loop); next to
    raw pixels (the central 32 px of each crop). The random encoder is the loop's own
    initial state (build_trainer), written as a step-0 run, so all three models go
    through the same export (clusiam_jax.export.run) and evaluation.

Prints one JSON line per model, then one with the command and the machine. Work files
(tiles, crops, runs, exports) live under --workdir; a rerun reuses finished runs.
When the data folder is absent it says so and exits 0.
"""
import argparse
import csv
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_DATA = os.path.join(REPO, '..', 'shared', 'data', 'crchp')


def read_nuclei(data_dir):
    with open(os.path.join(data_dir, 'nuclei.csv'), newline='') as f:
        return list(csv.DictReader(f))


def write_tiles(data_dir, images, out_dir, tile, count, seed):
    """`count` random non-overlapping tiles of the given images, as <img>/<x>_<y>.png."""
    import numpy as np
    from PIL import Image
    if os.path.isdir(out_dir):
        return out_dir
    cells = []
    for name in images:
        size = Image.open(os.path.join(data_dir, 'images', name + '.png')).size
        cells += [(name, x, y) for y in range(0, size[1] - tile + 1, tile)
                  for x in range(0, size[0] - tile + 1, tile)]
    rng = np.random.default_rng(seed)
    chosen = [cells[i] for i in sorted(rng.choice(len(cells), min(count, len(cells)),
                                                  replace=False))]
    tmp = out_dir + '.partial'
    cache = {}
    for name, x, y in chosen:
        if name not in cache:
            cache = {name: np.asarray(Image.open(
                os.path.join(data_dir, 'images', name + '.png')).convert('RGB'))}
        os.makedirs(os.path.join(tmp, name), exist_ok=True)
        Image.fromarray(cache[name][y:y + tile, x:x + tile]).save(
            os.path.join(tmp, name, f'{x}_{y}.png'))
    os.replace(tmp, out_dir)
    return out_dir


def write_crops(data_dir, nuclei, out_dir, crop):
    """Nucleus-centred crops + a manifest CSV (path, slide_id=image, label, x, y)."""
    import numpy as np
    from PIL import Image
    manifest = os.path.join(out_dir, 'crops.csv')
    if os.path.exists(manifest):
        return manifest
    half = crop // 2
    rows, padded = [], {}
    for i, n in enumerate(nuclei):
        name = n['image']
        if name not in padded:
            img = np.asarray(Image.open(os.path.join(data_dir, 'images', name + '.png'))
                             .convert('RGB'))
            padded = {name: np.pad(img, ((half, half), (half, half), (0, 0)), mode='reflect')}
        cx, cy = int(round(float(n['x']))), int(round(float(n['y'])))
        # In padded coordinates the crop centred on (cx, cy) starts at (cx, cy).
        patch = padded[name][cy:cy + crop, cx:cx + crop]
        rel = os.path.join(name, f'n{i}_{max(cx - half, 0)}_{max(cy - half, 0)}.png')
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
        Image.fromarray(patch).save(os.path.join(out_dir, rel))
        rows.append((rel, name, n['label'], max(cx - half, 0), max(cy - half, 0)))
    with open(manifest + '.tmp', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['path', 'slide_id', 'label', 'x', 'y'])
        writer.writerows(rows)
    os.replace(manifest + '.tmp', manifest)
    return manifest


def subsample(nuclei, limits, seed):
    """At most limits[split] nuclei per split, drawn at random (the list order kept)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    keep = []
    for split, limit in limits.items():
        members = [i for i, n in enumerate(nuclei) if n['split'] == split]
        if limit and len(members) > limit:
            members = rng.choice(members, limit, replace=False).tolist()
        keep += members
    return [nuclei[i] for i in sorted(keep)]


def pretrain_config(method, args, tiles):
    from clusiam_jax.config import method_config
    c = method_config(method)
    c.model.backbone = args.backbone
    c.model.num_clusters = args.clusters
    c.data.path = tiles
    c.data.image_size = args.image_size
    c.train.batch_size = args.batch
    c.train.num_epochs = 1
    c.train.seed = args.seed
    c.train.log_every_steps = 5
    c.train.checkpoint_every_epochs = 1
    c.optim.base_lr = args.base_lr
    c.export.batch_size = args.export_batch
    return c


def random_init_run(config, run_dir, tiles):
    """A step-0 run directory holding the training loop's initial state, with the
    normalization training on `tiles` would use: the export reads it like a trained run."""
    from bench.common import bench_trainer
    from clusiam_jax import run_dir as run_dir_lib
    from clusiam_jax.data import sources, stats
    if run_dir_lib.is_run_dir(run_dir):
        return
    source = sources.open_source(tiles)
    mean, std, origin = stats.cached_stats(tiles, source, workdir=run_dir)
    trainer = bench_trainer(config, steps_per_epoch=1, mean=mean, std=std)
    run_dir_lib.write_run(run_dir, config, trainer.init_state(),
                          run_dir_lib.Normalization(tuple(trainer.mean), tuple(trainer.std),
                                                    origin))


def evaluate(export_dir, splits_csv):
    from clusiam_jax.eval import tasks
    knn = tasks.run_knn(export_dir, splits_csv, ks=(1, 5, 20))
    linear = tasks.run_linear(export_dir, splits_csv)
    return {'knn_k1_acc': knn['k=1']['accuracy'], 'knn_k5_acc': knn['k=5']['accuracy'],
            'knn_k20_acc': knn['k=20']['accuracy'], 'knn_k1_macro_f1': knn['k=1']['macro_f1'],
            'linear_acc': linear['test']['accuracy'],
            'linear_macro_f1': linear['test']['macro_f1'],
            'linear_weight_decay': linear['weight_decay'],
            'n_reference': knn['n_reference'], 'n_query': knn['n_query']}


def raw_pixel_rows(manifest, nuclei_split, size=32):
    """Raw pixels (central `size` px of each crop) kNN and linear probe, same subsets."""
    import numpy as np

    from clusiam_jax.data import load_rgb
    from clusiam_jax.eval.knn import knn_evaluate
    from clusiam_jax.eval.linear import linear_probe
    base = os.path.dirname(manifest)
    sets = {s: ([], []) for s in ('train', 'validation', 'test')}
    with open(manifest, newline='') as f:
        for row in csv.DictReader(f):
            img = load_rgb(os.path.join(base, row['path']))
            o = (img.shape[0] - size) // 2
            x = img[o:o + size, o:o + size].reshape(-1).astype(np.float32) / 255.0
            split = nuclei_split[row['slide_id']]
            sets[split][0].append(x)
            sets[split][1].append(row['label'])
    arr = {s: (np.stack(x), np.array(y)) for s, (x, y) in sets.items()}
    knn = knn_evaluate(*arr['train'], *arr['test'], ks=(1, 5, 20))
    linear = linear_probe(*arr['train'], *arr['test'], val_x=arr['validation'][0],
                          val_y=arr['validation'][1])
    return {'knn_k1_acc': knn['k=1']['accuracy'], 'knn_k5_acc': knn['k=5']['accuracy'],
            'knn_k20_acc': knn['k=20']['accuracy'], 'knn_k1_macro_f1': knn['k=1']['macro_f1'],
            'linear_acc': linear['test']['accuracy'],
            'linear_macro_f1': linear['test']['macro_f1'],
            'n_reference': len(arr['train'][1]), 'n_query': len(arr['test'][1])}


def raw_pixel_all_nuclei(data_dir, nuclei, size=32):
    """Raw-pixel kNN over every nucleus (the data README's reference: all train nuclei
    as references, all test nuclei as queries), central `size` px, cosine."""
    import numpy as np
    from PIL import Image

    from clusiam_jax.eval.knn import knn_evaluate
    half = size // 2
    sets = {'train': ([], []), 'test': ([], [])}
    images = {}
    for n in nuclei:
        if n['split'] not in sets:
            continue
        if n['image'] not in images:
            img = np.asarray(Image.open(os.path.join(data_dir, 'images', n['image'] + '.png'))
                             .convert('RGB'))
            images = {n['image']: np.pad(img, ((half, half), (half, half), (0, 0)),
                                         mode='reflect')}
        cx, cy = int(round(float(n['x']))), int(round(float(n['y'])))
        patch = images[n['image']][cy:cy + size, cx:cx + size]
        sets[n['split']][0].append(patch.reshape(-1).astype(np.float32) / 255.0)
        sets[n['split']][1].append(n['label'])
    (rx, ry), (qx, qy) = [(np.stack(x), np.array(y)) for x, y in sets.values()]
    knn = knn_evaluate(rx, ry, qx, qy, ks=(1, 5, 20))
    # Cosine on raw [0, 1] pixels is dominated by overall brightness; subtracting the
    # mean training crop first is the usual raw-pixel baseline (the data README's).
    center = rx.mean(axis=0)
    centered = knn_evaluate(rx - center, ry, qx - center, qy, ks=(1, 5, 20))
    return {'knn_k1_acc': knn['k=1']['accuracy'], 'knn_k5_acc': knn['k=5']['accuracy'],
            'knn_k20_acc': knn['k=20']['accuracy'], 'knn_k1_macro_f1': knn['k=1']['macro_f1'],
            'centered_knn_k1_acc': centered['k=1']['accuracy'],
            'centered_knn_k5_acc': centered['k=5']['accuracy'],
            'centered_knn_k20_acc': centered['k=20']['accuracy'],
            'n_reference': len(ry), 'n_query': len(qy)}


def evaluation_crops(data, nuclei, args, work):
    """(chosen nuclei, crop folder, splits CSV): the labeled nucleus crops of the
    evaluation (--max-train/--max-val/--max-test per split, --crop px) and the image-level
    splits file listing the images that have crops."""
    image_split = {n['image']: n['split'] for n in nuclei}
    chosen = subsample(nuclei, {'train': args.max_train, 'validation': args.max_val,
                                'test': args.max_test}, args.seed)
    crops = write_crops(data, chosen, os.path.join(
        work, f'crops{args.crop}_{args.max_train}_{args.max_val}_{args.max_test}'), args.crop)
    splits_csv = os.path.join(work, 'splits.csv')
    with open(splits_csv, 'w', newline='') as f:
        # Only the images that have crops: the evaluation refuses listed slides it lacks.
        present = sorted({n['image'] for n in chosen})
        f.write('slide_id,split\n' + ''.join(f'{i},{image_split[i]}\n' for i in present))
    return chosen, crops, splits_csv


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', default=DEFAULT_DATA)
    parser.add_argument('--workdir', default=os.path.join(REPO, 'runs', 'nuclei_probe_eval'))
    parser.add_argument('--steps', type=int, default=30, help='pretraining steps per model')
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--base-lr', type=float, default=0.4,
                        help='lr = base_lr * batch / 256 (recipes: 0.05; short runs move more '
                             'with a larger one; the same for both methods)')
    parser.add_argument('--clusters', type=int, default=10)
    parser.add_argument('--tile', type=int, default=48)
    parser.add_argument('--crop', type=int, default=48)
    parser.add_argument('--image-size', type=int, default=96)
    parser.add_argument('--max-train', type=int, default=2000)
    parser.add_argument('--max-val', type=int, default=500)
    parser.add_argument('--max-test', type=int, default=2000)
    parser.add_argument('--export-batch', type=int, default=128)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--models', default='random,clubyol,byol')
    parser.add_argument('--backbone', default='resnet18',
                        help='resnet_tiny makes a quick smoke run (not a measurement)')
    args = parser.parse_args()

    data = os.path.abspath(args.data)
    if not os.path.exists(os.path.join(data, 'nuclei.csv')):
        print(f'crchp data not found at {data} (nuclei.csv + images/, see '
              f'../shared/data/README.md); nothing to benchmark.')
        return 0

    import jax

    from bench.common import command_line
    from clusiam_jax.export.run import prepare_export
    from clusiam_jax.train.loop import train

    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    nuclei = read_nuclei(data)
    image_split = {n['image']: n['split'] for n in nuclei}
    train_images = sorted(i for i, s in image_split.items() if s == 'train')
    tiles = write_tiles(data, train_images, os.path.join(work, f'tiles{args.tile}'),
                        args.tile, args.steps * args.batch, args.seed)
    chosen, crops, splits_csv = evaluation_crops(data, nuclei, args, work)

    common = {'steps': args.steps, 'batch': args.batch, 'image_size': args.image_size,
              'tile': args.tile, 'crop': args.crop, 'backbone': args.backbone}
    print(json.dumps({'model': 'raw_pixels_32px_all_nuclei',
                      **raw_pixel_all_nuclei(data, nuclei)}), flush=True)
    print(json.dumps({'model': 'raw_pixels_32px', **raw_pixel_rows(crops, image_split)}),
          flush=True)
    for model in args.models.split(','):
        out_dir = os.path.join(work, 'exports', model)
        run_dir = os.path.join(work, 'runs', model)
        start = time.perf_counter()
        if model == 'random':
            config = pretrain_config('clubyol', args, tiles)
            random_init_run(config, run_dir, tiles)
            train_s = 0.0
        else:
            config = pretrain_config(model, args, tiles)
            train(config, run_dir)
            train_s = time.perf_counter() - start
        config.export.data_path = crops
        config.export.out_dir = out_dir
        prepare_export(run_dir, config.export).run_export()
        total_s = time.perf_counter() - start
        row = {'model': model, **evaluate(out_dir, splits_csv), **common,
               'train_s': round(train_s, 1), 'train_and_export_s': round(total_s, 1)}
        if model == 'random':
            row['steps'] = 0
        print(json.dumps(row), flush=True)
    print(json.dumps({'command': command_line(),
                      'machine': platform.machine(), 'cpus': os.cpu_count(),
                      'jax': jax.__version__, 'devices': str(jax.devices()[0].platform),
                      'reference': 'raw-pixel kNN on 32 px crops ~0.56, majority ~0.38 '
                                   '(../shared/data/README.md)'}), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
