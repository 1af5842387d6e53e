"""What a rerun of `--mode tile` reuses: a slide whose coordinate file carries the same
`tiling_key` (config, slide file size and time) and, for a µm/px from `tile.mpp_default`,
the same default. The others are redone, saying what changed (from `tiling_inputs`).
"""
import collections
import dataclasses
import hashlib
import json
import os
from typing import List, Optional

from clusiam_jax import storage
from clusiam_jax.errors import DataError
from clusiam_jax.slides import coords as coords_lib
from clusiam_jax.slides import slides_csv
from clusiam_jax.slides.slides_csv import DEFAULT_ORIGIN


def _file_identity(path: Optional[str]):
    """[where, size, mtime] of a file; an object's ETag in place of its time. A lookup that
    fails (an outage) raises: guessed, it would redo every slide."""
    if not path:
        return None
    if storage.is_url(path):
        try:
            return [path, *storage.version(path)]
        except storage.Unreadable:   # missing, as a missing local file
            return [path, None, None]
    try:
        st = os.stat(path)
        return [os.path.abspath(path), st.st_size, int(st.st_mtime)]
    except OSError:
        return [os.path.abspath(path), None, None]


def key_inputs(entry, params) -> dict:
    """What tiling_key hashes; not tile.mpp_default, which changes only the slides whose
    µm/px came from it (previous)."""
    mask = None
    if params.masks:
        from clusiam_jax.slides import annotations
        mask = _file_identity(annotations.find_annotation_file(params.masks, entry.slide_id))
    settings = dataclasses.asdict(params)
    settings['mpp'] = settings.pop('mpp_override')   # tilings made before keep their key
    del settings['mpp_default']
    if not settings['align']:   # tilings made before the option keep their key
        del settings['align']
    return {'file': _file_identity(entry.path), 'mask': mask, 'mpp_column': entry.mpp,
            'settings': settings}


def tiling_key(entry, params) -> str:
    inputs = key_inputs(entry, params)
    payload = json.dumps([inputs['file'], inputs['mask'], inputs['mpp_column'],
                          inputs['settings']], sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()


# A slide tiled before with other settings: why it is redone, and what it was.
Redo = collections.namedtuple('Redo', 'why mpp origin n_patches')


def previous(entry, params, out_dir: str):
    """(the row of a slide tiled with these settings, or a Redo of one tiled otherwise)."""
    try:
        found = coords_lib.read_coords(coords_lib.trident_file(out_dir, entry.slide_id))
    except DataError:   # none, or unreadable: tiled anew
        return None, None
    attrs = found.attrs
    mpp, origin = float(attrs['level0_mpp']), str(attrs.get('mpp_origin', ''))
    try:
        key = tiling_key(entry, params)
    except DataError as e:   # its slide or mask could not be looked up: not tiled anew
        return slides_csv.row(entry, slides_csv.UNREADABLE, str(e)), None
    why = []
    if attrs.get('tiling_key') != key:
        why = _changes(attrs, entry, params)
    elif not found.has_tissue_mask:
        why = ['tiled before the tissue mask was stored (data.sampling=tissue_random draws '
               'from it)']
    if origin == DEFAULT_ORIGIN and mpp != params.mpp_default:
        why.append(f'its µm/px came from {DEFAULT_ORIGIN} {mpp:g}, now '
                   + (f'{params.mpp_default:g}' if params.mpp_default else 'unset'))
    if why:
        return None, Redo('; '.join(why), f'{mpp:.6g}', origin, len(found.coords))
    return slides_csv.row(entry, slides_csv.TILED, str(attrs.get('tiling_note', '')), mpp,
                          origin, len(found.coords), attrs.get('tissue_fraction')), None


def _flat_settings(settings: dict) -> dict:
    """tile.<key> -> value of key_inputs' settings."""
    flat = {'align': False}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat['mpp_override' if key == 'mpp' else key] = value
    return flat


def _shown(value) -> str:
    if isinstance(value, float):
        return f'{value:g}'
    return repr(value) if isinstance(value, str) else str(value)


def _changes(attrs: dict, entry, params) -> List[str]:
    """What differs between the tiling of a coordinate file and this one, in words."""
    new = json.loads(json.dumps(key_inputs(entry, params), default=str))
    try:
        old = json.loads(attrs['tiling_inputs'])
    except (KeyError, TypeError, ValueError):
        old = None
    out = []
    if old is None:
        for key in ('target_mpp', 'patch_size', 'overlap'):
            before, now = attrs.get(key), getattr(params, key)
            if before is not None and before != now:
                out.append(f'tile.{key} {_shown(before)} -> {_shown(now)}')
        if storage.resolve(os.getcwd(), entry.path) != attrs.get('slide_path'):
            out.append(f'the slide file is now {entry.path} (was {attrs.get("slide_path")})')
        return out or ['other settings or a changed slide file (the coordinate file does '
                       'not record which)']
    if old.get('file') != new['file']:
        before = (old.get('file') or [None])[0]
        out.append('the slide file changed (size or modification time)'
                   if before == new['file'][0] else
                   f'the slide file is now {entry.path} (was {before})')
    if old.get('mask') != new['mask']:
        out.append('its tile.masks file changed')
    if old.get('mpp_column') != new['mpp_column']:
        out.append(f'its "mpp" column {_shown(old.get("mpp_column"))} -> '
                   f'{_shown(new["mpp_column"])}')
    before, now = _flat_settings(old.get('settings', {})), _flat_settings(new['settings'])
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            out.append(f'tile.{key} {_shown(before.get(key))} -> {_shown(now.get(key))}')
    return out or ['the tiling key changed']
