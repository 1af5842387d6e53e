"""Multi-scale export (export.mpps, docs/formats.md): which patches each listed µm/px reads and
how they nest. The finest resolution keeps the export grid's patch centres, so `features` and
`coords` stay a CLAM file's; each coarser one tiles the slide from its origin with squares of
patch_size px at its µm/px (DSMIL's layout: the 20x tiles nested in the 5x tile that holds
them), keeping the squares that hold a fine patch's centre, that fine patch's `parent`."""
import dataclasses
import logging
import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from clusiam_jax.data import image_io
from clusiam_jax.errors import ConfigError, DataError
from clusiam_jax.slides import reader

log = logging.getLogger('clusiam_jax')

# The finest listed µm/px within this of the grid's own reads the grid's own patches (the
# reader picks pyramid levels with the same tolerance), so `features` equal a plain export's.
NATIVE_TOLERANCE = 1e-2


@dataclasses.dataclass(frozen=True)
class Scale:
    mpp: float
    size_level0: float     # level-0 px a patch covers: patch_size * mpp / level-0 µm/px
    coords: np.ndarray     # int64 [M, 2] level-0 top-left of each patch (finest: the grid's)
    parent: Optional[np.ndarray] = None   # int64 [N fine]: index into `coords` (coarse only)
    step: int = 0          # coarse grid step in level-0 px (<= size_level0: squares overlap
    #                        by under a pixel, and a cell's square holds every point of it)


@dataclasses.dataclass(frozen=True)
class SlidePlan:
    """One slide's patches at each resolution of export.mpps, finest first."""
    slide_id: str
    slide_index: int       # in source.slides
    out_size: int          # px every patch is read at: the grid's patch_size
    level0_mpp: float
    native: bool           # the finest scale is the grid's own patch (source.load)
    scales: List[Scale]

    def square(self, scale: int, index: int):
        """(level-0 x, y, side) of patch `index` of scale `scale`."""
        s = self.scales[scale]
        x, y = s.coords[index]
        return int(x), int(y), s.size_level0


def coarse_cells(centres: np.ndarray, size_level0: float):
    """(top-left int64 [M, 2], parent int64 [N], step): the grid of integer step
    floor(size_level0) from the slide's origin, keeping the cells that hold a centre, in row
    order (y, then x); parent[i] is the cell holding centres[i]."""
    step = max(1, int(math.floor(size_level0 + 1e-9)))
    cells = np.floor(np.asarray(centres, np.float64) / step).astype(np.int64)
    if not len(cells):
        return np.zeros((0, 2), np.int64), np.zeros((0,), np.int64), step
    kept, parent = np.unique(cells[:, ::-1], axis=0, return_inverse=True)   # (y, x) order
    return kept[:, ::-1] * step, parent.reshape(-1).astype(np.int64), step


def _level0_mpp(coords, handle: Callable) -> Optional[float]:
    """The slide's level-0 µm/px: the tiling's record, else the slide's metadata."""
    recorded = coords.attrs.get('level0_mpp')
    if isinstance(recorded, (int, float)) and recorded > 0:
        return float(recorded)
    return reader.level0_resolution(handle()).mpp


def plan_slides(source, mpps: Sequence[float], groups: Dict[str, np.ndarray],
                data_path: str) -> Dict[str, SlidePlan]:
    """{slide: SlidePlan} for export.mpps; one line (ConfigError/DataError) for a source that
    is no slides, a slide without µm/px, or a resolution finer than a slide's level 0.
    Slides that cannot be opened are left to the export, which lists them unreadable."""
    if not mpps:
        return {}
    if not getattr(source, 'from_slides', False):
        raise ConfigError(f'export.mpps reads patches at several µm/px from whole slides; '
                          f'{data_path} is a patch folder: export a tiling (or CLAM/TRIDENT '
                          f'patches with export.slide_dir), or drop export.mpps')
    mpps = sorted(float(m) for m in mpps)
    ids = source.slide_ids.tolist()
    plans = {}
    for slide, indices in groups.items():
        s = ids.index(slide)
        coords = source.slides[s].coords

        def opened(s=s):   # the source's own handle: its tile cache, slides in buckets
            return source._handle(s)

        try:
            mpp0 = _level0_mpp(coords, opened)
            if mpp0 is None:
                raise DataError(f'export.mpps: slide {slide} has no known level-0 µm/px (its '
                                f'tiling records none and its metadata has none): tile it with '
                                f"tile.mpp_default or the slide list's mpp column, or drop "
                                f'export.mpps')
            # What load() reads: (slide, x, y, level-0 side, px); CLAM's opens the slide.
            regions = np.array([source.grid_region(int(i)) for i in indices], np.float64)
        except image_io.BadImageError as e:
            log.warning('export.mpps: slide %s cannot be opened (%s); it is listed unreadable',
                        slide, str(e).split(': ', 1)[-1])
            continue
        if mpps[0] < mpp0 * (1 - NATIVE_TOLERANCE):
            raise ConfigError(f"export.mpps {mpps[0]:g} µm/px is finer than slide {slide}'s "
                              f'level 0 ({mpp0:g} µm/px): list resolutions of {mpp0:g} µm/px '
                              f'or coarser')
        xy, size0, out = regions[:, 1:3].astype(np.int64), regions[0, 3], int(regions[0, 4])
        centres = xy + float(size0) / 2
        grid_mpp = mpp0 * float(size0) / int(out)
        native = abs(mpps[0] / grid_mpp - 1) <= NATIVE_TOLERANCE
        fine0 = float(size0) if native else int(out) * mpps[0] / mpp0
        fine = Scale(mpps[0], fine0, xy if native else
                     np.round(centres - fine0 / 2).astype(np.int64))
        scales = [fine]
        for mpp in mpps[1:]:
            size = int(out) * mpp / mpp0
            coords, parent, step = coarse_cells(centres, size)
            scales.append(Scale(mpp, size, coords, parent, step))
        plans[slide] = SlidePlan(slide, s, int(out), float(mpp0), native, scales)
    return plans


def readable(plan: SlidePlan, positions: np.ndarray, coarse: List[Dict[int, dict]]):
    """bool [n]: the fine patches (positions into the plan) whose every ancestor was read;
    `coarse[s - 1]` = {cell index: outputs} of scale s's readable patches."""
    positions = np.asarray(positions, np.int64)
    keep = np.ones(len(positions), bool)
    for s, scale in enumerate(plan.scales[1:]):
        keep &= np.isin(scale.parent[positions], np.fromiter(coarse[s], np.int64))
    return keep


def assemble(plan: SlidePlan, positions: np.ndarray, coarse: List[Dict[int, dict]],
             features: np.ndarray, augmented: Optional[np.ndarray]):
    """({name: array}, {name: attrs}): the multi-scale datasets of the written fine patches
    (`positions` into the plan, each ancestor readable), with their features [n, D] and
    augmented copies [n, K, D] (None without export.augment_copies)."""
    positions = np.asarray(positions, np.int64)
    fine = plan.scales[0]
    arrays = {}
    attrs = {'features': {'mpp': fine.mpp, 'patch_size_level0': fine.size_level0}}
    parts, aug_parts = [features], None if augmented is None else [augmented]
    if augmented is not None:
        attrs['features_augmented'] = dict(attrs['features'])
    for s, scale in enumerate(plan.scales[1:], start=1):
        used = np.unique(scale.parent[positions])     # cells holding a written fine patch
        reindex = np.full(len(scale.coords), -1, np.int64)
        reindex[used] = np.arange(len(used))
        parent = reindex[scale.parent[positions]]
        rows = [coarse[s - 1][int(j)] for j in used]
        feats = np.stack([r['features'] for r in rows]) if rows else \
            np.zeros((0, features.shape[1]), features.dtype)
        name = f'features_scale{s}'
        arrays[name], arrays[f'coords_scale{s}'] = feats, scale.coords[used]
        arrays[f'parent_scale{s}'] = parent
        attrs[name] = {'mpp': scale.mpp, 'patch_size_level0': scale.size_level0}
        attrs[f'coords_scale{s}'] = {'mpp': scale.mpp, 'patch_size': plan.out_size,
                                     'patch_size_level0': scale.size_level0,
                                     'step_level0': scale.step}
        parts.append(feats[parent])
        if aug_parts is not None:
            copies = np.stack([r['features_augmented'] for r in rows]) if rows else \
                np.zeros((0,) + augmented.shape[1:], augmented.dtype)
            arrays[name + '_augmented'], attrs[name + '_augmented'] = copies, attrs[name]
            aug_parts.append(copies[parent])
    if len(plan.scales) > 1:
        mpps = np.array([sc.mpp for sc in plan.scales], np.float64)
        arrays['cat'], attrs['cat'] = np.concatenate(parts, axis=1), {'mpps': mpps}
        if aug_parts is not None:
            arrays['cat_augmented'] = np.concatenate(aug_parts, axis=2)
            attrs['cat_augmented'] = {'mpps': mpps}
    return arrays, attrs
