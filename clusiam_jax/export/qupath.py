"""`<export>/qupath/<slide>.geojson` (export.qupath): each patch a QuPath tile classified
`cluster c` in its map color, in level-0 pixels (QuPath: File > Import objects)."""
import json
import os

import numpy as np

from clusiam_jax.errors import DataError
from clusiam_jax.export import format as fmt
from clusiam_jax.export.palette import palette_for
from clusiam_jax.fileio import atomic_write
from clusiam_jax.slides import coords as coords_lib


def write_export_geojson(out_dir):
    """The GeoJSON of every slide with coordinates and cluster ids; returns the paths."""
    written = []
    for row, arrays, known, k in fmt.clustered_slides(out_dir, 'qupath'):
        path = coords_lib.slide_path(os.path.join(out_dir, fmt.QUPATH_DIR), row['slide_id'],
                                     '.geojson')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_cluster_geojson(path, arrays['coords'][known], arrays.get('patch_size') or 224,
                              arrays['cluster_ids'][known], palette_for(k), row['slide_id'])
        written.append(path)
    return written


def write_cluster_geojson(path: str, coords: np.ndarray, patch_size_level0: float,
                          cluster_ids: np.ndarray, palette: np.ndarray, slide_id: str) -> None:
    """One 'tile' Feature per patch (a level-0 square, class 'cluster c'), written compactly."""
    coords, cluster_ids = np.asarray(coords), np.asarray(cluster_ids).reshape(-1)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(cluster_ids) != len(coords):
        raise ValueError(f'coords {coords.shape} must be [N, 2], N = {len(cluster_ids)} ids')
    if (coords < 0).any():   # an export of a patch folder
        unknown = int((coords < 0).any(axis=1).sum())
        raise DataError(f'{path}: {unknown} patches have no level-0 coordinates (-1); a '
                        f'cluster GeoJSON needs patches tiled from a slide')
    size = float(patch_size_level0)
    colors = [[int(v) for v in row] for row in np.asarray(palette)[:, :3]]

    def number(value):   # an int when whole (most tiles): keeps the files small
        return int(value) if float(value).is_integer() else round(float(value), 3)

    with atomic_write(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
        f.write('{"type":"FeatureCollection","features":[')
        for i, ((x, y), cluster) in enumerate(zip(coords.tolist(), map(int, cluster_ids.tolist()))):
            x0, y0, x1, y1 = (number(v) for v in (x, y, float(x) + size, float(y) + size))
            feature = {'type': 'Feature', 'geometry': {'type': 'Polygon', 'coordinates': [
                [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
                'properties': {'objectType': 'tile', 'classification': {
                    'name': f'cluster {cluster}', 'color': colors[cluster % len(colors)]},
                    'cluster': cluster, 'slide_id': slide_id}}
            f.write((',' if i else '') + json.dumps(feature, separators=(',', ':')))
        f.write(']}')
