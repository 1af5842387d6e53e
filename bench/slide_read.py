"""Where the time of one patch read from a slide goes, against decoding a PNG of it.

    python -m bench.slide_read [--patches 300] [--patch-size 224] [--slides PATH ...]

For each slide (default: the shared CC0 region and TCGA slide) one JSON line with CPU ms
per 224-px level-0 patch: OpenSlide's read_region at patch positions of the regular grid
(its tile cache off: an epoch over many slides in random order rarely hits it, while
repeated reads of one small slide here would); the direct tile reads (slides/tiles.py)
at the same positions and at positions of the `tile.align` grid; one decode alone of
the tiles under the latter; cv2's decode of lossless PNGs of the regular patches; one
slide open (OpenSlide, then the direct reader's index and check read); and the tiles a
patch decodes on average. Positions are drawn (seeded) from the slide's own tilings at
0.5 µm/px (the regular one and the aligned one; 0.5 µm/px forced where the slide
records none), so they are tissue, as in training; every timing is process CPU time
over all patches.

bench/data_pipeline.py --slides measures the whole pipeline; this says why its numbers
are what they are (the codec, the tiles per patch, the cost of opening).
"""
import argparse
import json
import os
import time

import cv2
import numpy as np

from bench.common import command_line
from bench.data_pipeline import REPO, machine

SHARED = os.path.join(REPO, '..', 'shared', 'data', 'slides')
DEFAULT_SLIDES = [os.path.join(SHARED, n) for n in ('cmu-1-small-region.svs',
                                                     'tcga-cr-7395-01a-01-ts1.svs')]


def cpu_ms_per(fn, items) -> float:
    start = time.process_time()
    for item in items:
        fn(item)
    return 1000 * (time.process_time() - start) / len(items)


def tissue_positions(path, slide, size, align, rng, n):
    """n level-0 patch corners drawn from the slide's tiling at 0.5 µm/px."""
    import tempfile

    from clusiam_jax.config import default_config
    from clusiam_jax.slides import coords, reader, tiling
    tile = default_config().tile
    tile.patch_size, tile.align = size, align
    mpp = None if reader.level0_resolution(slide).mpp else 0.5
    entry = tiling.SlideEntry('s', path, mpp)
    with tempfile.TemporaryDirectory() as out:
        row = tiling.tile_slide(entry, tiling.TileParams.from_config(tile), out)
        if row['status'] != tiling.TILED:
            raise SystemExit(f'{path}: {row["status"]} {row["reason"]}')
        found = coords.read_coords(coords.trident_file(out, 's'))
    if int(found.attrs['patch_size_level0']) != size:
        raise SystemExit(f'{path}: not a 0.5 µm/px level 0; the timings assume one')
    picks = rng.integers(0, len(found.coords), n)
    return [(int(x), int(y)) for x, y in found.coords[picks]]


def measure(path: str, n: int, size: int, seed: int) -> dict:
    import imagecodecs
    import openslide

    from clusiam_jax.slides import reader
    slide = reader.open_slide(path)
    tiles = slide.tiles
    if tiles is None:
        raise SystemExit(f'{path}: level 0 is not read tile by tile (slides/tiles.py)')
    level = tiles.levels[0]
    rng = np.random.default_rng(seed)
    regular, aligned = (tissue_positions(path, slide, size, align, rng, n)
                        for align in (False, True))
    decoded = []
    original = tiles._tile
    tiles._tile = lambda lv, index: decoded.append(index) or original(lv, index)
    tiles_regular = cpu_ms_per(lambda p: tiles.read(0, p[0], p[1], size, size), regular)
    per_patch_regular = len(decoded) / n
    decoded.clear()
    tiles_aligned = cpu_ms_per(lambda p: tiles.read(0, p[0], p[1], size, size), aligned)
    per_patch_aligned = len(decoded) / n
    tiles._tile = original
    under = [(y // level.tile_h) * level.tiles_across + x // level.tile_w for x, y in aligned]
    one_tile = cpu_ms_per(lambda i: original(level, i), under)
    uncached = reader.open_slide(path, cache=openslide.OpenSlideCache(0), direct=False)
    openslide_regular = cpu_ms_per(lambda p: uncached.read(0, p[0], p[1], size, size), regular)
    uncached.close()
    pngs = [cv2.imencode('.png', cv2.cvtColor(tiles.read(0, x, y, size, size),
                                              cv2.COLOR_RGB2BGR))[1] for x, y in regular]
    png = cpu_ms_per(lambda b: cv2.imdecode(b, cv2.IMREAD_COLOR), pngs)
    slide.close()

    def open_once(_):
        reader.open_slide(path).close()
    opening = cpu_ms_per(open_once, range(20))
    return dict(
        bench='slide_read', slide=os.path.basename(path),
        compression=int(level.page.compression),
        tile=[level.tile_w, level.tile_h], patch=size, patches=n,
        cpu_ms_openslide_regular=round(openslide_regular, 3),
        cpu_ms_tiles_regular=round(tiles_regular, 3),
        tiles_per_patch_regular=round(per_patch_regular, 2),
        cpu_ms_tiles_aligned=round(tiles_aligned, 3),
        tiles_per_patch_aligned=round(per_patch_aligned, 2),
        cpu_ms_one_tile_decode=round(one_tile, 3),
        cpu_ms_png_decode=round(png, 3),
        png_kb=round(float(np.mean([len(b) for b in pngs])) / 1024, 1),
        cpu_ms_open_slide=round(opening, 2),
        machine=machine(), imagecodecs=imagecodecs.__version__, opencv=cv2.__version__,
        command=command_line())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--slides', nargs='+', default=DEFAULT_SLIDES)
    ap.add_argument('--patches', type=int, default=300)
    ap.add_argument('--patch-size', type=int, default=224)
    ap.add_argument('--seed', type=int, default=0)
    args = ap.parse_args()
    for path in args.slides:
        if not os.path.isfile(path):
            raise SystemExit(f'{path}: no such slide (the defaults are ../shared/data/slides)')
    for path in args.slides:
        print(json.dumps(measure(path, args.patches, args.patch_size, args.seed)),
              flush=True)


if __name__ == '__main__':
    main()
