"""Cut the demo tile set from the CC0 OpenSlide CMU-1 small region.

    python clusiam_jax/demo_data/cut_tiles.py \
        --slide PATH/cmu-1-small-region.svs \
        --out clusiam_jax/demo_data

Writes <out>/<slide_id>/<x>_<y>.jpg (224x224 tiles on a stride-224 level-0 grid,
x_y = level-0 top-left corner, so the folder is the slide id and coordinates parse
from the file name, the layout CLAM-style tools and our exporter use) and
<out>/<slide_id>_thumb.jpg (the whole region downsampled by --thumb-downsample).
Needs: openslide-python + openslide-bin (the wheel ships the C library), numpy, pillow.
"""
import argparse
from pathlib import Path

import numpy as np
import openslide
from PIL import Image


def otsu_threshold(values):
    """Otsu's threshold on uint8 values (numpy only: no scikit-image dependency)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    omega = np.cumsum(p)                  # class-0 probability for threshold t
    mu = np.cumsum(p * np.arange(256))    # class-0 first moment
    mu_t = mu[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu_t * omega - mu) ** 2 / (omega * (1 - omega))
    return int(np.nanargmax(between))


def saturation(rgb):
    """HSV saturation as uint8. H&E stain is saturated (pink/purple); glass background
    is near-white or grey, so saturation separates tissue from background better than
    brightness does (pen marks aside, which this region has none of)."""
    rgb = rgb.astype(np.int32)
    mx, mn = rgb.max(-1), rgb.min(-1)
    return np.where(mx > 0, (mx - mn) * 255 // np.maximum(mx, 1), 0).astype(np.uint8)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", required=True, help="the CMU-1 small-region slide (.svs)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--tile", type=int, default=224)
    ap.add_argument("--min-tissue", type=float, default=0.5,
                    help="minimum fraction of tissue pixels per tile")
    ap.add_argument("--thumb-downsample", type=int, default=8)
    ap.add_argument("--quality", type=int, default=90)
    args = ap.parse_args()

    slide = openslide.OpenSlide(args.slide)
    slide_id = Path(args.slide).stem
    width, height = slide.dimensions
    # The region is small (2220x2967), so read level 0 once; convert RGBA -> RGB
    # (OpenSlide returns premultiplied RGBA; this region has no transparent pixels).
    region = np.asarray(slide.read_region((0, 0), 0, (width, height)).convert("RGB"))

    # Thumbnail for cluster maps: plain box downsample by an integer factor, so a tile
    # at level-0 (x, y) sits at (x, y) / factor on the thumbnail.
    f = args.thumb_downsample
    thumb = Image.fromarray(region).resize((width // f, height // f), Image.BOX)
    out = Path(args.out)
    thumb.save(out / f"{slide_id}_thumb.jpg", quality=args.quality)

    # One Otsu threshold for the whole slide (computed on the thumbnail: the histogram
    # shape is the same, and it is the usual whole-slide practice), applied per pixel
    # at level 0; a tile is kept when >= min_tissue of its pixels are tissue.
    thresh = otsu_threshold(saturation(np.asarray(thumb)))
    tissue = saturation(region) > thresh

    tile_dir = out / slide_id
    tile_dir.mkdir(parents=True, exist_ok=True)
    for old in tile_dir.glob("*.jpg"):  # regenerate from scratch
        old.unlink()
    t, kept, total = args.tile, 0, 0
    for y in range(0, height - t + 1, t):      # full tiles only: the ragged edge is dropped
        for x in range(0, width - t + 1, t):
            total += 1
            if tissue[y:y + t, x:x + t].mean() >= args.min_tissue:
                Image.fromarray(region[y:y + t, x:x + t]).save(tile_dir / f"{x}_{y}.jpg",
                                                               quality=args.quality)
                kept += 1
    print(f"{slide_id}: {width}x{height}, saturation Otsu threshold {thresh}, "
          f"kept {kept} of {total} grid tiles ({t}px, >= {args.min_tissue:.0%} tissue), "
          f"thumbnail 1/{f} = {thumb.size[0]}x{thumb.size[1]}")


if __name__ == "__main__":
    main()
