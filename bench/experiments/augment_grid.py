r"""The picture of docs/method.md §1: one H&E patch under each augmentation (issue 26).

    python -m bench.experiments.augment_grid
        [--slide ../shared/data/slides/cmu-1-small-region.svs] [--x X --y Y]
        [--draws 4] [--tile 120] [--seed 0] [--out docs/augmentations.png]

The patch is a 224 px square read at level 0 of the shared CC0 slide region (0.5 µm/px,
20x, the paper's magnification); without --x/--y the most tissue-rich square of a
112 px-stride scan. Every row runs the project's own code (data/augment.py,
data/stain.py), the single-operation rows through sample_view_params with every other
operation switched off, so the picture shows what training sees. The two full-pipeline
rows use the same seeds: HED is drawn last, so each pair of tiles differs by the HED
jitter alone. Tiles are shown at --tile px; the PNG is quantised to 256 colours to stay
small.
"""
import argparse
import dataclasses
import os

import numpy as np
import openslide
from PIL import Image, ImageDraw, ImageFont

from clusiam_jax.data import augment

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLIDE = os.path.join(REPO, '..', 'shared', 'data', 'slides', 'cmu-1-small-region.svs')
SIZE = 224
LABEL_WIDTH = 200
GAP = 4

# Everything off: the rows switch on one operation each.
NOTHING = augment.AugmentConfig(image_size=SIZE, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                                jitter_p=0.0, gray_p=0.0, blur_p=0.0, hflip_p=0.0)
PAPER = augment.AugmentConfig(image_size=SIZE)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--slide', default=SLIDE)
    p.add_argument('--x', type=int, default=None, help='level-0 left of the patch')
    p.add_argument('--y', type=int, default=None, help='level-0 top of the patch')
    p.add_argument('--draws', type=int, default=4, help='tiles per random row')
    p.add_argument('--tile', type=int, default=120, help='px per tile in the picture')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default=os.path.join(REPO, 'docs', 'augmentations.png'))
    return p.parse_args()


def tissue_square(slide, x, y):
    """The 224 px square at (x, y), or the most tissue-rich one (pixels darker than 200
    in their channel mean, as a quick tissue test) on a 112 px-stride scan."""
    read = lambda x, y: np.asarray(slide.read_region((x, y), 0, (SIZE, SIZE)).convert('RGB'))
    if x is not None and y is not None:
        return (x, y), read(x, y)
    width, height = slide.dimensions
    best = None
    for top in range(0, height - SIZE + 1, SIZE // 2):
        for left in range(0, width - SIZE + 1, SIZE // 2):
            img = read(left, top)
            score = (img.mean(axis=-1) < 200).mean()
            if best is None or score > best[0]:
                best = (score, (left, top), img)
    return best[1], best[2]


def rows(img, draws, seed):
    """(label, [uint8 tiles]) for each row of the picture."""
    def views(cfg, salt, n=draws):
        # A generator per tile: with and without HED, tile k then has the same other draws.
        rngs = [np.random.default_rng([seed, salt, k]) for k in range(n)]
        return [augment.apply_view(img, augment.sample_view_params(r, SIZE, SIZE, cfg), SIZE)
                for r in rngs]

    on = lambda **kw: dataclasses.replace(NOTHING, **kw)
    return [
        ('original', [img]),
        ('random resized crop\narea U(0.2, 1)', views(on(scale=PAPER.scale, ratio=PAPER.ratio),
                                                      1)),
        ('colour jitter\nb, c, s 0.4, hue 0.1', views(on(jitter_p=1.0), 2)),
        ('grayscale', views(on(gray_p=1.0), 3, 1)),
        ('Gaussian blur\nsigma U(0.1, 2)', views(on(blur_p=1.0), 4)),
        ('horizontal flip', views(on(hflip_p=1.0), 5, 1)),
        ('HED jitter 0.05\n(Tellez: light)', views(on(hed=0.05), 6)),
        ('HED jitter 0.2\n(Tellez: strong)', views(on(hed=0.2), 7)),
        ('paper pipeline', views(PAPER, 8)),
        ('paper pipeline\n+ HED 0.05', views(dataclasses.replace(PAPER, hed=0.05), 8)),
    ]


def draw(table, draws, tile):
    font = ImageFont.load_default(size=15)
    width = LABEL_WIDTH + draws * (tile + GAP)
    height = len(table) * (tile + GAP) + GAP
    canvas = Image.new('RGB', (width, height), 'white')
    pen = ImageDraw.Draw(canvas)
    for r, (label, tiles) in enumerate(table):
        top = GAP + r * (tile + GAP)
        pen.multiline_text((8, top + tile // 2), label, fill='black', font=font, anchor='lm')
        for c, t in enumerate(tiles):
            small = Image.fromarray(t).resize((tile, tile), Image.LANCZOS)
            canvas.paste(small, (LABEL_WIDTH + c * (tile + GAP), top))
    return canvas.quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                           dither=Image.Dither.NONE)


def main():
    args = parse_args()
    slide = openslide.OpenSlide(args.slide)
    (x, y), img = tissue_square(slide, args.x, args.y)
    picture = draw(rows(img, args.draws, args.seed), args.draws, args.tile)
    picture.save(args.out, optimize=True)
    print(f'{args.out}: patch at level-0 ({x}, {y}) of {os.path.basename(args.slide)}, '
          f'{os.path.getsize(args.out) / 1024:.0f} KB')


if __name__ == '__main__':
    main()
