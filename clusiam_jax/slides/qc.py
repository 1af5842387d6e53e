"""The QC picture of a tiled slide, `masks/<slide_id>.png`."""
import dataclasses
import os
from typing import List, Optional

import cv2
import numpy as np

from clusiam_jax import storage
from clusiam_jax.fileio import atomic_write
from clusiam_jax.slides import coords as coords_lib
from clusiam_jax.slides import reader, slides_csv, tissue

MASKS_DIR = 'masks'
QC_MAX_SIDE = 1024

# The QC picture is at least this wide, so its words stay readable over a narrow slide.
QC_MIN_WIDTH = 720
QC_GREEN, QC_BLUE = (0, 170, 0), (30, 60, 220)
# Without µm/px: the holes filled and the specks dropped, as shares of the picture.
QC_HOLE_SHARE, QC_SPECK_SHARE = 1e-3, 2e-4


def picture(thumb, mask_small, coords, size0, downsample, lines,
            thumb_mpp: Optional[float]) -> np.ndarray:
    """Thumbnail, tissue contour (green) and kept patches (blue squares) under `lines` of
    words, with a scale bar when `thumb_mpp` (µm per thumbnail px) is known."""
    from PIL import Image, ImageDraw
    image = thumb.copy()
    h, w = image.shape[:2]
    contour_mask = cv2.resize(mask_small.astype(np.uint8), (w, h),
                              interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(contour_mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    thick = max(1, round(max(h, w) / 600))
    cv2.drawContours(image, contours, -1, QC_GREEN, thick, cv2.LINE_AA)
    for x, y in coords:
        p0 = (int(x / downsample), int(y / downsample))
        p1 = (int((x + size0) / downsample) - 1, int((y + size0) / downsample) - 1)
        cv2.rectangle(image, p0, p1, QC_BLUE, 1)
    font, micro = _qc_font(15)
    if not micro:
        lines = [line.replace('µ', 'u') for line in lines]
    width = max(w, QC_MIN_WIDTH)
    text = [part for line in lines for part in _wrapped(line, font, width - 12)]
    line_h = 20
    band = len(text) * line_h + 10
    canvas = Image.new('RGB', (width, band + h), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, band))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(text):
        draw.text((6, 5 + i * line_h), line, fill=(0, 0, 0), font=font)
    if thumb_mpp:
        _scale_bar(draw, font, thumb_mpp, w, band + h, 'µm' if micro else 'um')
    return np.asarray(canvas)


def _qc_font(size: int):
    """(DejaVu Sans, else Pillow's own font; whether it draws µ, else the picture says um)."""
    from PIL import ImageFont
    try:
        font = ImageFont.truetype('DejaVuSans.ttf', size)
    except OSError:
        try:
            font = ImageFont.load_default(size)
        except (TypeError, OSError):   # without FreeType: a bitmap font, ASCII
            return ImageFont.load_default(), False
    missing = font.getmask('\uffff')
    micro = font.getmask('µ')
    return font, (micro.size != missing.size or bytes(micro) != bytes(missing))


def _wrapped(line: str, font, width: int) -> List[str]:
    out, current = [], ''
    for word in line.split(' '):
        trial = f'{current} {word}' if current else word
        if current and font.getlength(trial) > width:
            out.append(current)
            current = word
        else:
            current = trial
    return out + [current]


def _scale_bar(draw, font, mpp: float, w: int, bottom: int, um: str):
    """A bar of a round length in µm (about a fifth of the width) at the bottom left."""
    target = w * mpp / 5
    length = max((m * 10 ** e for e in range(-1, 6) for m in (1, 2, 5)
                  if m * 10 ** e <= target), default=0.1)
    px = max(1, round(length / mpp))
    label = f'{length / 1000:g} mm' if length >= 1000 else f'{length:g} {um}'
    label_w = font.getlength(label)
    x0, y1 = 8, bottom - 8
    draw.rectangle((x0 - 4, y1 - 30, x0 + max(px, label_w) + 4, y1 + 4), fill=(255, 255, 255))
    draw.rectangle((x0, y1 - 6, x0 + px, y1), fill=(0, 0, 0))
    draw.text((x0, y1 - 28), label, fill=(0, 0, 0), font=font)


def write(out_dir: str, entry, image: np.ndarray, lines: List[str]) -> str:
    """masks/<id>.png, its words also in the PNG's text ("Title", UTF-8)."""
    from PIL import Image, PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_itxt('Title', '\n'.join(lines))
    path = coords_lib.slide_path(storage.join(out_dir, MASKS_DIR), entry.slide_id, '.png')
    with slides_csv.writing(path):
        if not storage.is_url(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_write(path) as tmp:
            Image.fromarray(image).save(tmp, format='PNG', pnginfo=info)
    return path


def no_grid_picture(slide, entry, detection: tissue.TissueParams, title: str):
    """(picture, its words) of a slide without µm/px: its thumbnail and tissue, no grid,
    `title` saying what to set; None when the thumbnail would take minutes."""
    try:
        thumb, ds = reader.thumbnail_for_side(slide, QC_MAX_SIDE)
    except reader.SlideTooLarge:
        return None
    # Holes and specks by their share of the picture (the keys in µm² need µm/px).
    area = thumb.shape[0] * thumb.shape[1]
    by_share = dataclasses.replace(detection, max_hole_um2=area * QC_HOLE_SHARE,
                                   min_area_um2=area * QC_SPECK_SHARE)
    mask = tissue.tissue_mask(thumb, 1.0, by_share)
    lines = [f'{entry.slide_id}: no patch grid', title,
             f'green: tissue, holes under {QC_HOLE_SHARE:.1%} and specks under '
             f'{QC_SPECK_SHARE:.2%} of the picture left out (tile.max_hole_um2 and '
             f'tile.min_area_um2 need µm/px)']
    return picture(thumb, mask, np.zeros((0, 2), np.int64), 1, ds, lines, None), lines
