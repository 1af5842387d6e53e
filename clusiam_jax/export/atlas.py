"""Cluster atlas: `<export>/atlas/cluster_<id>.png` (a grid of its most typical patches) and
an index.html. Typical = highest log-odds `logit_c - logsumexp(other logits)` (no float32
saturation), at most ceil(N / slides) per slide while other slides have candidates left."""
import collections
import dataclasses
import html
import logging
import math
import os
import re
from typing import List, Optional

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from clusiam_jax import storage
from clusiam_jax.data import image_io
from clusiam_jax.errors import ConfigError, DataError
from clusiam_jax.export import format as fmt
from clusiam_jax.export.maps import exported_slide, share_text
from clusiam_jax.export.palette import palette_for
from clusiam_jax.fileio import atomic_write, write_text
from clusiam_jax.slides.reader import read_patch

log = logging.getLogger('clusiam_jax')

ATLAS_DIR = 'atlas'
INDEX_NAME = 'index.html'
PER_CLUSTER = 16      # patches per cluster
TILE = 192            # px of a patch on the sheet
COLUMNS = 4
_SHEET = re.compile(r'^cluster_\d+\.png$')


@dataclasses.dataclass
class Pick:
    slide_id: str
    index: int          # row in the slide's arrays
    score: float        # log-odds of the cluster (higher: more typical)


@dataclasses.dataclass
class ClusterEntry:
    cluster_id: int
    n_patches: int
    n_slides: int
    top_slides: List[tuple]                 # [(slide_id, patches of this cluster)]
    picks: List[Pick]
    png: Optional[str] = None               # the sheet's path
    boxes: List[tuple] = dataclasses.field(default_factory=list)  # (x0, y0, x1, y1) per pick


@dataclasses.dataclass
class Atlas:
    index: str                              # path of index.html
    entries: List[ClusterEntry]             # in decreasing share
    n_patches: int
    n_slides: int
    num_clusters: int


def typicality(logits, ids):
    """float64 [N]: each patch's `l_c - logsumexp(l_other)` (0 without two logits)."""
    ids = np.asarray(ids, np.int64)
    if logits is None or np.asarray(logits).shape[1] < 2:
        return np.zeros(len(ids))
    others = np.array(logits, np.float64)   # a copy
    rows = np.arange(len(ids))
    own = others[rows, ids]
    others[rows, ids] = -np.inf
    top = others.max(axis=1)
    return own - (top + np.log(np.exp(others - top[:, None]).sum(axis=1)))


def _best_per_cluster(ids, scores, n):
    """{cluster: indices of its (at most) n highest-scoring patches}."""
    order = np.lexsort((np.arange(len(ids)), -scores, ids))
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    keep = order[rank < n]
    return {int(c): keep[ids[keep] == c] for c in np.unique(ids[keep])}


def choose(candidates, n):
    """At most n Picks, most typical first, spread over slides (module docstring)."""
    ranked = sorted(candidates, key=lambda p: (-p.score, p.slide_id, p.index))
    cap = max(1, math.ceil(n / max(1, len({p.slide_id for p in ranked}))))
    taken, per_slide = [], collections.Counter()
    for pick in ranked:
        if len(taken) < n and per_slide[pick.slide_id] < cap:
            taken.append(pick)
            per_slide[pick.slide_id] += 1
    chosen = {(p.slide_id, p.index) for p in taken}
    taken += [p for p in ranked if (p.slide_id, p.index) not in chosen][:n - len(taken)]
    return sorted(taken, key=lambda p: (-p.score, p.slide_id, p.index))


def _readable(arrays):
    """bool [N]: the patches whose pixels can be read back (from the slide or a file)."""
    if arrays.get('slide_path'):
        return np.all(np.asarray(arrays['coords']) >= 0, axis=1)
    if 'paths' in arrays:
        return np.array([bool(p) and '#' not in str(p) for p in arrays['paths']], bool)
    return np.zeros(len(arrays['cluster_ids']), bool)


def _read_picks(entries, kept, tile):
    """({(slide_id, index): uint8 [tile, tile, 3]}, [unreadable patch files])."""
    by_slide = collections.defaultdict(list)
    for pick in (pick for entry in entries for pick in entry.picks):
        by_slide[pick.slide_id].append(pick)
    images, unreadable = {}, []
    for slide_id, picks in by_slide.items():
        info = kept[slide_id]
        if info.get('slide_path'):
            fix = (f"move the slide back to {info['slide_path']}, or draw the atlas where the "
                   f'slides are')
            with exported_slide('atlas', slide_id, info['slide_path'],
                                info.get('level0_dimensions'), fix) as slide:
                images.update({(slide_id, p.index): read_patch(
                    slide, *(int(v) for v in info['coords'][p.index]),
                    float(info['patch_size']), tile) for p in picks})
            continue
        for pick in picks:
            try:
                rgb = image_io.load_rgb(str(info['paths'][pick.index]))
            except image_io.BadImageError as e:
                unreadable.append(str(e))
                continue
            if rgb.shape[:2] != (tile, tile):
                interp = cv2.INTER_AREA if max(rgb.shape[:2]) > tile else cv2.INTER_LINEAR
                rgb = cv2.resize(rgb, (tile, tile), interpolation=interp)
            images[(slide_id, pick.index)] = rgb
    return images, unreadable


def _where(pick, info):
    """A patch's label on the sheet: its slide and level-0 (x, y), or its file name."""
    if info.get('slide_path'):
        x, y = (int(v) for v in info['coords'][pick.index])
        return f'{pick.slide_id} · {x}, {y}'
    return f"{pick.slide_id} · {os.path.basename(str(info['paths'][pick.index]))}"


def _hex(color):
    return '#' + ''.join(f'{int(v):02x}' for v in color)


def _fit(text, font, width):
    """`text`, shortened with an ellipsis in the middle to fit `width` px."""
    fitted, keep = text, len(text)
    while keep > 2 and font.getlength(fitted) > width:
        keep -= 1
        fitted = text[:keep // 2] + '…' + text[len(text) - keep // 2:]
    return fitted


def caption_lines(entry, n_patches, n_slides):
    return (f'Cluster {entry.cluster_id}',
            f"{share_text(entry.n_patches, n_patches)} of patches ({entry.n_patches:,} of "
            f"{n_patches:,}) · in {entry.n_slides} of {n_slides} "
            f"slide{'s' if n_slides != 1 else ''}")


def draw_sheet(images, labels, title, details, color, tile=TILE):
    """(RGB PIL image, [(x0, y0, x1, y1)] per image): the caption over the labelled grid."""
    columns = max(1, min(COLUMNS, len(images))) if images else COLUMNS
    margin, gap, swatch, label_height = 16, 8, 44, 20
    title_font, text_font, label_font = (ImageFont.load_default(size=s) for s in (26, 17, 14))
    grid_width = columns * tile + (columns - 1) * gap
    text_width = max(title_font.getlength(title), text_font.getlength(details))
    width = max(grid_width, swatch + 14 + int(math.ceil(text_width))) + 2 * margin
    header = swatch + 2 * margin
    rows = math.ceil(len(images) / columns) if images else 1
    sheet = Image.new('RGB', (width, header + rows * (tile + label_height + gap) + margin),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.rectangle([margin, margin, margin + swatch - 1, margin + swatch - 1],
                   fill=tuple(int(v) for v in color), outline=(0, 0, 0), width=2)
    left = margin + swatch + 14
    draw.text((left, margin - 2), title, fill=(0, 0, 0), font=title_font)
    draw.text((left, margin + swatch - 2), details, fill=(60, 60, 60), font=text_font, anchor='lb')
    draw.line([(margin, header - margin // 2), (width - margin, header - margin // 2)],
              fill=(200, 200, 200))
    boxes = []
    for i, (image, label) in enumerate(zip(images, labels)):
        x = margin + (i % columns) * (tile + gap)
        y = header + (i // columns) * (tile + label_height + gap)
        sheet.paste(Image.fromarray(np.ascontiguousarray(image)), (x, y))
        boxes.append((x, y, x + tile, y + tile))
        draw.text((x + tile // 2, y + tile + 3), _fit(label, label_font, tile),
                  fill=(70, 70, 70), font=label_font, anchor='mt')
    if not images:
        draw.text((margin, header + tile // 2), 'no readable patch (see the log)',
                  fill=(120, 120, 120), font=text_font, anchor='lm')
    return sheet, boxes


def write_atlas(out_dir, per_cluster=PER_CLUSTER, tile=TILE):
    """Writes `<out_dir>/atlas/`; the Atlas, None without a cluster head or readable patch."""
    if int(per_cluster) < 1:
        raise ConfigError(f'the atlas needs at least 1 patch per cluster; got {per_cluster}')
    if int(tile) < 16:
        raise ConfigError(f"the atlas's patches must be at least 16 px; got {tile}")
    counts, kept = {}, {}           # kept: slide_id -> what reading its picks needs
    candidates = collections.defaultdict(list)
    k, readable_any = 0, False
    for row, arrays in fmt.iter_slides(out_dir, fmt.read_export_manifest(out_dir)):
        slide_id = row['slide_id']
        if 'cluster_ids' not in arrays:
            log.info('atlas: the model has no cluster head; no atlas')
            return None
        ids = np.asarray(arrays['cluster_ids'], np.int64)
        logits = arrays.get('cluster_logits')
        if ids.size and ids.min() < 0:
            raise DataError(f'atlas: slide {slide_id} has negative cluster ids')
        k = max(k, logits.shape[1] if logits is not None else 0, int(ids.max(initial=-1)) + 1)
        counts[slide_id] = np.bincount(ids, minlength=1)
        rows_ok = np.flatnonzero(_readable(arrays))
        readable_any |= bool(rows_ok.size)
        scores = typicality(logits[rows_ok] if logits is not None else None, ids[rows_ok])
        # Arrays, not Picks: a cohort holds slides x K x per_cluster candidates.
        for c, best in _best_per_cluster(ids[rows_ok], scores, int(per_cluster)).items():
            candidates[c].append((slide_id, rows_ok[best].astype(np.int64), scores[best]))
        kept[slide_id] = {key: arrays[key] for key in (
            'coords', 'paths', 'slide_path', 'patch_size', 'level0_dimensions') if key in arrays}
    if not readable_any:
        log.warning('atlas: the export records neither its slides nor its patch files '
                    '(coordinates and slide_path, or paths); no atlas')
        return None
    k, slide_ids = max(k, 1), list(counts)
    per_slide = np.array([np.pad(counts[s], (0, k - len(counts[s]))) for s in slide_ids])
    totals = per_slide.sum(axis=0)
    n_patches = int(totals.sum())
    entries = []
    for c in np.lexsort((np.arange(k), -totals)):
        if totals[c] == 0:
            continue
        holders = np.flatnonzero(per_slide[:, c])
        top = sorted(((slide_ids[s], int(per_slide[s, c])) for s in holders),
                     key=lambda t: (-t[1], t[0]))
        picks = [Pick(slide_id, int(row), float(score))
                 for slide_id, rows_of, scores_of in candidates.get(int(c), [])
                 for row, score in zip(rows_of, scores_of)]
        entries.append(ClusterEntry(int(c), int(totals[c]), len(holders), top,
                                    choose(picks, int(per_cluster))))

    images, unreadable = _read_picks(entries, kept, int(tile))
    if unreadable:
        log.warning('atlas: %d patch files are unreadable and left out of the grids; the '
                    'first: %s', len(unreadable), unreadable[0])
    folder = storage.join(out_dir, ATLAS_DIR)
    fmt.make_parent(storage.join(folder, INDEX_NAME))
    palette = palette_for(k)
    written = set()
    for entry in entries:
        entry.picks = [p for p in entry.picks if (p.slide_id, p.index) in images]
        title, details = caption_lines(entry, n_patches, len(slide_ids))
        sheet, entry.boxes = draw_sheet([images[(p.slide_id, p.index)] for p in entry.picks],
                                        [_where(p, kept[p.slide_id]) for p in entry.picks],
                                        title, details, palette[entry.cluster_id], int(tile))
        name = f'cluster_{entry.cluster_id:0{len(str(k - 1))}d}.png'
        entry.png = storage.join(folder, name)
        info = PngInfo()
        info.add_text('Title', title)
        info.add_text('Description', details)
        with atomic_write(entry.png) as tmp:
            sheet.save(tmp, format='PNG', pnginfo=info, compress_level=1)
        written.add(name)
    present = storage.listdir(folder) if storage.isdir(folder) else []   # a bucket: maybe none
    for name in present:   # sheets of clusters that have no patch now
        if _SHEET.match(name) and name not in written:
            storage.remove(storage.join(folder, name))
    atlas = Atlas(storage.join(folder, INDEX_NAME), entries, n_patches, len(slide_ids), k)
    write_text(atlas.index, render_index(atlas, palette, fmt.read_export_info(out_dir),
                                         int(per_cluster)))
    log.info('cluster atlas: %s (%d clusters)', atlas.index, len(entries))
    return atlas


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial,
       sans-serif; margin: 24px; color: #222; background: #fff; max-width: 1100px; }
h1 { margin-bottom: 4px; }
.meta, .how { color: #555; }
.swatch { display: inline-block; width: 1.1em; height: 1.1em; border: 1px solid #000;
          vertical-align: -0.15em; margin-right: 0.4em; }
table.toc { border-collapse: collapse; margin: 12px 0 24px; }
table.toc td, table.toc th { padding: 3px 12px; text-align: right; }
table.toc td:first-child, table.toc th:first-child { text-align: left; }
table.toc tr:nth-child(even) { background: #f4f4f4; }
section { margin: 28px 0; padding-top: 8px; border-top: 1px solid #ddd; }
section h2 { margin: 6px 0; }
section img { max-width: 100%; height: auto; display: block; margin-top: 8px; }
#missing { background: #fee; border: 1px solid #c00; padding: 8px; }
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) { loaded++; }
  }
  document.body.setAttribute('data-images-loaded', loaded + '/' + images.length);
  if (loaded < images.length) { document.getElementById('missing').hidden = false; }
});
"""


def render_index(atlas, palette, info, per_cluster):
    esc = html.escape
    step, workdir = info.get('checkpoint_step'), info.get('workdir')
    title = ' · '.join(p for p in (
        'Cluster atlas', workdir and f'run {os.path.basename(os.path.normpath(str(workdir)))}',
        step is not None and f'step {step}', f'K={atlas.num_clusters}') if p)
    n_slides = atlas.n_slides
    parts = ['<!DOCTYPE html>', '<html lang="en">', '<head>', '<meta charset="utf-8">',
             f'<title>{esc(title)}</title>', f'<style>{_STYLE}</style>', '</head>',
             '<body>', f'<h1>{esc(title)}</h1>',
             f'<p class="meta">{atlas.n_patches:,} patches of {n_slides} slide'
             f'{"s" if n_slides != 1 else ""}; {len(atlas.entries)} of {atlas.num_clusters} '
             f'clusters hold patches, listed by their share of the patches.</p>',
             f'<p class="how">Each cluster shows its {per_cluster} most typical patches (the '
             f"highest probability of that cluster), from several slides, most typical first; "
             f"under each patch, its slide and level-0 x, y (or its file); the cluster's color "
             f"is the one on the cluster maps.</p>",
             '<p id="missing" hidden>Some images did not load: keep this page in its '
             'atlas folder, next to its cluster_*.png files.</p>',
             '<table class="toc"><tr><th>cluster</th><th>patches</th><th>share</th>'
             '<th>slides</th></tr>']
    for entry in atlas.entries:
        parts.append(
            f'<tr><td><span class="swatch" style="background:{_hex(palette[entry.cluster_id])}">'
            f'</span><a href="#cluster-{entry.cluster_id}">cluster {entry.cluster_id}</a></td>'
            f'<td>{entry.n_patches:,}</td><td>{share_text(entry.n_patches, atlas.n_patches)}</td>'
            f'<td>{entry.n_slides} of {n_slides}</td></tr>')
    parts.append('</table>')
    for entry in atlas.entries:
        _, details = caption_lines(entry, atlas.n_patches, n_slides)
        most = ', '.join(f'{esc(slide)} ({share_text(n, entry.n_patches)})'
                         for slide, n in entry.top_slides[:5])
        if len(entry.top_slides) > 5:
            most += f' and {len(entry.top_slides) - 5} more'
        parts += [f'<section id="cluster-{entry.cluster_id}">',
                  f'<h2><span class="swatch" style="background:'
                  f'{_hex(palette[entry.cluster_id])}"></span>Cluster {entry.cluster_id}</h2>',
                  f'<p>{esc(details)}. Its patches by slide: {most}.</p>',
                  f'<img src="{esc(os.path.basename(entry.png))}" alt="the most typical '
                  f'patches of cluster {entry.cluster_id}">', '</section>']
    parts += [f'<script>{_SCRIPT}</script>', '</body>', '</html>', '']
    return '\n'.join(parts)
