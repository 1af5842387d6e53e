r"""export.dtype=bfloat16 against float32 on real tissue: embedding speed and how far the
features move (issue 27, item 3).

  python -m bench.experiments.bf16_export [--patches 256] [--image-size 224] [--batch 32]
      [--backbone resnet18] [--model clusiam] [--repeats 3] [--conv-impl auto]
      [--workdir RUN]

Patches: the CC0 CMU-1 region shipped with the package (configs/demo.py's slide), tiled as
the demo tiles it (0.5 µm/px, tissue only) but with a grid step of --step px so a small
region gives --patches patches (overlapping; evenly spaced over the grid's list).

Weights: a run's checkpoint (--workdir, with its normalization) or, by default, the
network's initialization made to behave like a trained one on this tissue: the residual
blocks' last BatchNorm scales, zero at initialization (the blocks would add nothing), set
to 1 (torchvision's default init), and every BatchNorm's running statistics set to the batch
statistics of one float32 training-mode pass over the first --batch patches. Each layer's
input then has unit scale per channel as in a trained network, so the bf16 rounding meets
realistic activations; without it the rounding meets near-zero residual branches.

The embedding is the export's own (export/embed.py Embedder.embed_fn, jitted with
model.conv_impl's compiler options), in float32 and with the network cloned to bfloat16 as
export.dtype=bfloat16 does; the two are timed alternately in one process, --repeats
rounds (order reversed every round), each over all patches in batches of --batch (each dtype
compiled once before timing). Decoding is not timed: the patches are read once.

Prints JSON lines: one per timed pass, then a summary: images/s of each (median), the
bf16/f32 ratio, XLA's FLOP count per image and the fraction of the CPU's peak
(bench/train_step.cpu_peak), and the feature difference of bf16 from float32 per patch:
relative L2 (mean, p99, max), cosine similarity (mean, min), and the agreement of the
cluster head's argmax (methods with one), with float32's top-two logit margin (in units
of the logits' standard deviation) of the flipped patches against the median patch's.
"""
import argparse
import os
import tempfile
import time

import numpy as np

from bench.common import MEAN, STD, emit, machine_info


def parse_args():
    from clusiam_jax.config import METHOD_RECIPES
    from clusiam_jax.models.conv import CONV_IMPLS
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--patches', type=int, default=256)
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--step', type=int, default=64,
                        help='grid step of the tiling in px (patches overlap below 224)')
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--model', choices=sorted(METHOD_RECIPES), default='clusiam')
    parser.add_argument('--backbone', default='resnet18')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--conv-impl', choices=CONV_IMPLS, default='auto',
                        help='model.conv_impl of both passes')
    parser.add_argument('--workdir', default='', help="a run's checkpoint instead of the "
                        'calibrated initialization (its model and normalization)')
    return parser.parse_args()


def tissue_patches(n, size, step):
    """uint8 [n, size, size, 3] from the demo slide's tissue grid at `step` px."""
    from clusiam_jax.data import sources
    from clusiam_jax.slides import tiling
    from configs import demo
    tile = demo.get_config().tile
    tile.patch_size, tile.overlap = size, size - step
    with tempfile.TemporaryDirectory(prefix='bf16-export-') as out:
        tiling.tile_slides(tiling.list_slides(tile.slides), tiling.TileParams.from_config(tile),
                           out)
        source = sources.open_source(out)
        picked = np.unique(np.linspace(0, len(source) - 1, n).round().astype(int))
        return np.stack([source.load(int(i)) for i in picked]), len(source)


def calibrated_variables(network, images, mean, std):
    """The initialization with unit residual scales and BatchNorm statistics of `images`."""
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict, unflatten_dict

    from clusiam_jax.models.batch_norm import BN_MOMENTUM
    from clusiam_jax.models.preprocess import normalize_input
    x = normalize_input(images, mean, std)
    variables = network.init(jax.random.PRNGKey(0), x[:1], train=False)
    params = {k: (jnp.ones_like(v) if k[-1] == 'scale' and not np.any(np.asarray(v)) else v)
              for k, v in flatten_dict(variables['params']).items()}
    params = unflatten_dict(params)
    _, updated = network.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                               train=True, mutable=['batch_stats'])
    old, new = flatten_dict(variables['batch_stats']), flatten_dict(updated['batch_stats'])
    # new = m * old + (1 - m) * batch: the batch's own statistics.
    stats = {k: (new[k] - BN_MOMENTUM * old[k]) / (1 - BN_MOMENTUM) for k in new}
    return {'params': params, 'batch_stats': unflatten_dict(stats)}


def load_embedder(args, images):
    """(Embedder in float32, its network's method) from --workdir or the calibration."""
    from clusiam_jax import parallel, run_dir
    from clusiam_jax.config import method_config
    from clusiam_jax.export.embed import Embedder
    from clusiam_jax.models import build_network
    mesh = parallel.make_mesh()
    if args.workdir:
        run = run_dir.load_run(args.workdir)
        network = run.network.clone(conv_impl=args.conv_impl, dtype=np.dtype('float32'))
        norm = run.normalization
        mean, std = (norm.mean, norm.std) if norm is not None else (MEAN, STD)
        return Embedder(network, run.weights.online_variables, mean, std, run.step, mesh)
    config = method_config(args.model)
    config.model.backbone, config.model.conv_impl = args.backbone, args.conv_impl
    network = build_network(config.model)
    variables = calibrated_variables(network, images[:args.batch], MEAN, STD)
    return Embedder(network, variables, MEAN, STD, 0, mesh)


def timed_pass(fn, variables, images, batch):
    """(seconds for every batch, outputs concatenated); the last batch padded."""
    import jax
    outs = []
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        if len(chunk) < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - len(chunk),) + chunk.shape[1:],
                                                    chunk.dtype)])
        outs.append(jax.device_get(fn(variables, chunk)))
    seconds = time.perf_counter() - start
    return seconds, {k: np.concatenate([o[k] for o in outs])[:len(images)] for k in outs[0]}


def feature_difference(f32, bf16):
    """Per-patch relative L2 and cosine of bf16 against float32 features, argmax agreement."""
    a, b = f32['features'].astype(np.float64), bf16['features'].astype(np.float64)
    rel = np.linalg.norm(b - a, axis=1) / np.linalg.norm(a, axis=1)
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    out = dict(rel_l2_mean=float(rel.mean()), rel_l2_p99=float(np.percentile(rel, 99)),
               rel_l2_max=float(rel.max()), cosine_mean=float(cos.mean()),
               cosine_min=float(cos.min()), features_bitwise_equal=int(np.sum(np.all(a == b,
                                                                                 axis=1))))
    if 'cluster_logits' in f32:
        ids32, ids16 = (np.argmax(o['cluster_logits'], axis=1) for o in (f32, bf16))
        top2 = np.sort(f32['cluster_logits'], axis=1)[:, -2:]
        margin = (top2[:, 1] - top2[:, 0]) / np.std(f32['cluster_logits'])
        flipped = ids32 != ids16
        # A flip is rounding, not a defect, where float32's own top two were this close.
        out.update(cluster_agreement=float(1 - flipped.mean()),
                   clusters_used=int(len(np.unique(ids32))),
                   flipped_max_top2_margin=float(margin[flipped].max()) if flipped.any()
                   else None, median_top2_margin=float(np.median(margin)))
    return out


def main():
    args = parse_args()
    import dataclasses

    import jax.numpy as jnp

    from bench.train_step import cpu_peak
    images, grid = tissue_patches(args.patches, args.image_size, args.step)
    base = load_embedder(args, images)
    fns, flops = {}, {}
    for name in ('float32', 'bfloat16'):
        embedder = dataclasses.replace(base, network=base.network.clone(dtype=jnp.dtype(name)))
        start = time.perf_counter()
        fn = embedder.embed_fn(with_projection=False)
        compiled = fn.lower(base.variables, images[:args.batch]).compile()
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        flops[name] = float((analysis or {}).get('flops', 0)) / args.batch or None
        fns[name] = compiled
        emit(dict(bench='bf16_export_compile', dtype=name,
                  compile_s=round(time.perf_counter() - start, 2)))
    seconds, outputs = {n: [] for n in fns}, {}
    for r in range(args.repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            s, outputs[name] = timed_pass(fns[name], base.variables, images, args.batch)
            seconds[name].append(s)
            emit(dict(bench='bf16_export_pass', round=r, dtype=name, seconds=round(s, 3),
                      images_per_s=round(len(images) / s, 2),
                      loadavg_1min=os.getloadavg()[0]))
    peak = cpu_peak()
    rate = {n: len(images) / float(np.median(s)) for n, s in seconds.items()}
    summary = dict(bench='bf16_export', model=base.network.method,
                   backbone=base.network.backbone, conv_impl=args.conv_impl,
                   weights=args.workdir or 'calibrated initialization',
                   image_size=args.image_size, batch=args.batch, patches=len(images),
                   tissue_grid=grid, repeats=args.repeats,
                   images_per_s_float32=round(rate['float32'], 2),
                   images_per_s_bfloat16=round(rate['bfloat16'], 2),
                   speedup_bf16=round(rate['bfloat16'] / rate['float32'], 3),
                   **{f'gflop_per_image_{n}': round(f / 1e9, 3) for n, f in flops.items() if f},
                   **feature_difference(outputs['float32'], outputs['bfloat16']), **peak,
                   loadavg_1min=os.getloadavg()[0])
    if flops['float32'] and peak:
        summary['fraction_of_f32_fma_peak_float32'] = round(
            rate['float32'] * flops['float32'] / 1e9 / peak['peak_gflops_f32_fma'], 4)
        if 'peak_gflops_amx_bf16' in peak and flops['bfloat16']:
            summary['fraction_of_amx_peak_bfloat16'] = round(
                rate['bfloat16'] * flops['bfloat16'] / 1e9 / peak['peak_gflops_amx_bf16'], 4)
    emit(dict(summary, **machine_info()))


if __name__ == '__main__':
    main()
