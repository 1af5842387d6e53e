"""`<export>/qupath/<slide>.geojson` (export.qupath): each patch a QuPath tile classified
`cluster c` in its map color, to inspect the clusters over the full-resolution slide in
QuPath (File > Import objects). Coordinates are level-0 pixels, as QuPath's."""
import json
import os
from typing import List

import numpy as np

from clusiam_jax.errors import DataError
from clusiam_jax.export import format as fmt
from clusiam_jax.export.palette import palette_for
from clusiam_jax.fileio import atomic_write


def write_export_geojson(out_dir):
    """The GeoJSON of every slide with coordinates and cluster ids; returns the paths."""
    written = []
    for row, arrays, known, k in fmt.clustered_slides(out_dir, 'qupath'):
        path = os.path.join(out_dir, fmt.QUPATH_DIR,
                            fmt.slide_file_name(row['slide_id']) + '.geojson')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_cluster_geojson(path, arrays['coords'][known], arrays.get('patch_size') or 224,
                              arrays['cluster_ids'][known], palette_for(k), row['slide_id'])
        written.append(path)
    return written


def write_cluster_geojson(path: str, coords: np.ndarray, patch_size_level0: float,
                          cluster_ids: np.ndarray, palette: np.ndarray, slide_id: str) -> None:
    """One Feature per patch: a closed square in level-0 pixels with `objectType` 'tile',
    `classification` {name 'cluster c', color palette[c % K]}, `cluster` and `slide_id`;
    written compactly (slides have 100k tiles)."""
    coords = np.asarray(coords)
    cluster_ids = np.asarray(cluster_ids).reshape(-1)
    palette = np.asarray(palette)
    _check_tiles(path, coords, cluster_ids, palette, patch_size_level0)
    size = float(patch_size_level0)
    colors = [[int(v) for v in row] for row in palette[:, :3]]
    with atomic_write(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
        f.write('{"type":"FeatureCollection","features":[')
        for i, ((x, y), cluster) in enumerate(zip(coords.tolist(), cluster_ids.tolist())):
            if i:
                f.write(',')
            f.write(json.dumps(_tile_feature(float(x), float(y), size, int(cluster),
                                             colors[int(cluster) % len(colors)], slide_id),
                               separators=(',', ':')))
        f.write(']}')


def _check_tiles(path: str, coords: np.ndarray, cluster_ids: np.ndarray, palette: np.ndarray,
                 patch_size_level0: float) -> None:
    """Refuses arrays that would write a wrong map, patches without coordinates (-1, in
    an export of a patch folder) included."""
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f'coords must be [N, 2], got shape {coords.shape}')
    if len(cluster_ids) != len(coords):
        raise ValueError(f'{len(coords)} coords but {len(cluster_ids)} cluster ids')
    if palette.ndim != 2 or palette.shape[0] == 0 or palette.shape[1] < 3:
        raise ValueError(f'palette must be [K, 3] with K >= 1, got shape {palette.shape}')
    if not float(patch_size_level0) > 0:
        raise ValueError(f'patch_size_level0 must be positive, got {patch_size_level0}')
    if len(cluster_ids) and cluster_ids.min() < 0:
        raise ValueError(f'cluster ids must be >= 0, got {cluster_ids.min()}')
    if (coords < 0).any():
        unknown = int((coords < 0).any(axis=1).sum())
        raise DataError(f'{path}: {unknown} patches have no level-0 coordinates (-1); a '
                        f'cluster GeoJSON needs patches tiled from a slide')


def _tile_feature(x: float, y: float, size: float, cluster: int, color: List[int],
                  slide_id: str) -> dict:
    x0, y0, x1, y1 = (_number(v) for v in (x, y, x + size, y + size))
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return {'type': 'Feature', 'geometry': {'type': 'Polygon', 'coordinates': [ring]},
            'properties': {'objectType': 'tile',
                           'classification': {'name': f'cluster {cluster}', 'color': color},
                           'cluster': cluster, 'slide_id': slide_id}}


def _number(value: float):
    """An int when whole (most tiles), else 3 decimals: keeps 100k-tile files small."""
    return int(value) if float(value).is_integer() else round(float(value), 3)
