"""Cluster atlas: per cluster, its most typical patches read back from the slides (or
patch files) at the tiling's coordinates, from several slides, clusters by share; a
self-contained HTML page that a real browser renders with every image loaded."""
import logging
import os
import re
import shutil
import subprocess

import cv2
import h5py
import numpy as np
import openslide
import pytest
from PIL import Image

from clusiam_jax.eval import tasks
from clusiam_jax.export import atlas
from clusiam_jax.export import format as fmt
from clusiam_jax.export.palette import cluster_palette
from clusiam_jax.slides import coords as coords_lib

K = 10
SLIDE = 'cmu-1-small-region'
# Three "slides" of the export, all cut from the demo slide: alpha has every patch, beta
# every second, gamma every third from the second.
SUBSETS = {'alpha': (0, 1), 'beta': (0, 2), 'gamma': (1, 3)}


def _write_h5(path, arrays, coords_attrs, slide_path=None):
    with h5py.File(path, 'w') as f:
        for name, value in arrays.items():
            if value.dtype.kind in 'OU':
                f.create_dataset(name, data=np.asarray(value, dtype=object),
                                 dtype=h5py.string_dtype('utf-8'))
            else:
                f[name] = value
        f['coords'].attrs.update(coords_attrs)
        if slide_path:
            f.attrs['slide_path'] = slide_path


def _crafted_logits(ids, rng):
    """Logits whose argmax is `ids`, with varied margins (so typicality is ordered)."""
    logits = rng.normal(0, 1, (len(ids), K)).astype(np.float32)
    logits[np.arange(len(ids)), ids] += 4 + 3 * rng.random(len(ids))
    return logits


@pytest.fixture(scope='module')
def slide_export(demo_tiles, tmp_path_factory):
    """An export of the tiled demo slide as three slides (h5 layout, slide_path), with
    crafted cluster ids (by patch brightness: what an H&E model might separate) and
    logits; its atlas."""
    tiled = coords_lib.read_coords(coords_lib.trident_file(demo_tiles, SLIDE))
    coords, slide_path = tiled.coords.astype(np.int64), tiled.attrs['slide_path']
    with openslide.OpenSlide(slide_path) as slide:
        brightness = np.array([np.asarray(slide.read_region((int(x), int(y)), 0, (224, 224)))
                               [..., :3].mean() for x, y in coords])
    groups = [0, 0, 3, 3, 3, 7, 7, 9, 5, 2]      # unequal shares, ids not in share order
    ids = np.empty(len(coords), np.int64)
    ids[np.argsort(brightness)] = [groups[r * 10 // len(coords)] for r in range(len(coords))]
    logits = _crafted_logits(ids, np.random.default_rng(0))
    out = tmp_path_factory.mktemp('atlas_export') / 'export'
    os.makedirs(out / fmt.H5_DIR)
    rows, parts = [], {}
    attrs = {k: tiled.attrs[k] for k in ('patch_size', 'patch_size_level0', 'level0_width',
                                         'level0_height')}
    for slide_id, (start, step) in SUBSETS.items():
        sel = np.arange(start, len(coords), step)
        parts[slide_id] = sel
        _write_h5(out / fmt.H5_DIR / f'{slide_id}.h5',
                  {'features': np.zeros((len(sel), 4), np.float32), 'coords': coords[sel],
                   'cluster_ids': ids[sel].astype(np.int32), 'cluster_logits': logits[sel]},
                  attrs, slide_path)
        rows.append(dict(slide_id=slide_id, n_patches=len(sel), label='',
                         file=f'{fmt.H5_DIR}/{slide_id}.h5'))
    fmt.write_manifest(str(out), rows)
    fmt.write_info(str(out), {'checkpoint_step': 120, 'workdir': '/runs/demo_run'})
    result = atlas.write_atlas(str(out))
    return dict(out=out, atlas=result, coords=coords, ids=ids, logits=logits, parts=parts,
                slide_path=slide_path, patch_size=int(tiled.attrs['patch_size_level0']))


def test_clusters_in_decreasing_share_with_their_counts(slide_export):
    a, ids, parts = slide_export['atlas'], slide_export['ids'], slide_export['parts']
    every = np.concatenate([ids[sel] for sel in parts.values()])
    counts = np.bincount(every, minlength=K)
    assert [e.cluster_id for e in a.entries] == \
        sorted(np.flatnonzero(counts).tolist(), key=lambda c: (-counts[c], c))
    assert a.n_patches == len(every) and a.n_slides == 3 and a.num_clusters == K
    for entry in a.entries:
        assert entry.n_patches == counts[entry.cluster_id]
        holding = [s for s, sel in parts.items() if (ids[sel] == entry.cluster_id).any()]
        assert entry.n_slides == len(holding)
        assert sorted(s for s, _ in entry.top_slides) == sorted(holding)
    # Only clusters with patches get a sheet; the file is named by id.
    names = sorted(n for n in os.listdir(slide_export['out'] / 'atlas') if n.endswith('.png'))
    assert names == sorted(f'cluster_{e.cluster_id}.png' for e in a.entries)


def test_grids_hold_the_most_typical_patches_from_several_slides(slide_export):
    ids, logits, parts = slide_export['ids'], slide_export['logits'], slide_export['parts']
    for entry in slide_export['atlas'].entries:
        c = entry.cluster_id
        assert entry.picks and len(entry.picks) <= atlas.PER_CLUSTER
        # Every pick is of the cluster; picks go most typical first.
        probs = []
        for pick in entry.picks:
            row = parts[pick.slide_id][pick.index]
            assert ids[row] == c
            p = np.exp(logits[row] - logits[row].max())
            probs.append(p[c] / p.sum())
        assert probs == sorted(probs, reverse=True)
        # No patch of the cluster left out is more typical than the least typical pick,
        # except one its slide's cap kept out.
        per_slide = {s: sum(p.slide_id == s for p in entry.picks) for s in parts}
        cap = int(np.ceil(atlas.PER_CLUSTER / entry.n_slides))
        picked = {(p.slide_id, p.index) for p in entry.picks}
        for slide_id, sel in parts.items():
            for i in np.flatnonzero(ids[sel] == c):
                if (slide_id, i) in picked:
                    continue
                z = logits[sel[i]] - logits[sel[i]].max()
                prob = np.exp(z[c]) / np.exp(z).sum()
                assert prob <= probs[-1] + 1e-6 or per_slide[slide_id] >= cap
        if entry.n_slides > 1 and entry.n_patches > atlas.PER_CLUSTER:
            assert len({p.slide_id for p in entry.picks}) > 1


def test_choose_caps_a_slide_then_fills_with_the_best():
    picks = [atlas.Pick('a', i, 10.0 - i * 0.1) for i in range(20)]
    picks += [atlas.Pick('b', i, 1.0 - i * 0.1) for i in range(3)]
    chosen = atlas.choose(picks, 16)
    # cap 8 per slide: b's three (though the least typical) are in, a fills the rest.
    assert sum(p.slide_id == 'b' for p in chosen) == 3
    assert [p.index for p in chosen if p.slide_id == 'a'] == list(range(13))
    assert [p.score for p in chosen] == sorted((p.score for p in chosen), reverse=True)
    assert atlas.choose(picks[:2], 16) == picks[:2]
    # Typicality is the log-odds: the softmax order, without saturating at 1.0.
    logits = np.array([[40.0, 0, 0], [30.0, 0, 0], [0, 1.0, 0.5]], np.float32)
    scores = atlas.typicality(logits, [0, 0, 1])
    prob = np.exp(1.0) / (1 + np.exp(1.0) + np.exp(0.5))
    assert scores[0] > scores[1] > 0 and scores[2] == pytest.approx(np.log(prob / (1 - prob)))


def test_patches_are_the_slides_pixels_at_the_tiling_coordinates(slide_export):
    parts, coords = slide_export['parts'], slide_export['coords']
    size = slide_export['patch_size']
    entry = slide_export['atlas'].entries[0]
    sheet = np.asarray(Image.open(entry.png).convert('RGB'))
    with openslide.OpenSlide(slide_export['slide_path']) as slide:
        for pick, (x0, y0, x1, y1) in zip(entry.picks[:4], entry.boxes):
            x, y = coords[parts[pick.slide_id][pick.index]]
            # The demo slide is at 0.499 µm/px, the tiling's target 0.5: the patch is the
            # level-0 square of the tiling, area-resized to the sheet's tile.
            region = np.asarray(slide.read_region((int(x), int(y)), 0, (size, size)))[..., :3]
            want = cv2.resize(region, (atlas.TILE, atlas.TILE), interpolation=cv2.INTER_AREA)
            np.testing.assert_array_equal(sheet[y0:y1, x0:x1], want)
    # The caption's swatch is the cluster's map color.
    color = cluster_palette(128)[entry.cluster_id]
    assert (sheet[:80].reshape(-1, 3) == color).all(axis=1).sum() > 400
    assert Image.open(entry.png).text['Title'] == f'Cluster {entry.cluster_id}'


def test_index_is_self_contained_and_ordered_by_share(slide_export):
    a = slide_export['atlas']
    page = open(a.index, encoding='utf-8').read()
    assert 'http://' not in page and 'https://' not in page and '//' not in \
        re.sub(r'<script>.*?</script>', '', page, flags=re.S).replace('<!DOCTYPE', '')
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources == [os.path.basename(e.png) for e in a.entries]
    assert all(os.path.isfile(os.path.join(os.path.dirname(a.index), s)) for s in sources)
    assert not re.search(r'<(link|iframe|object|embed)\b|@import|url\(|\ssrc="(?!cluster_)',
                         page)
    palette = cluster_palette(128)
    for entry in a.entries:
        color = '#' + ''.join(f'{v:02x}' for v in palette[entry.cluster_id])
        assert f'style="background:{color}"></span>Cluster {entry.cluster_id}<' in page
    assert 'K=10' in page and 'run demo_run' in page and 'step 120' in page


def _chromium():
    return shutil.which('chromium') or shutil.which('chromium-browser')


def _headless(tmp_path, *args):
    """chromium, headless, offline and with a fresh profile; its stdout."""
    command = [_chromium(), '--headless', '--no-sandbox', '--disable-gpu',
               '--disable-background-networking', '--disable-component-update',
               '--disable-sync', '--no-first-run', '--disable-extensions',
               f'--user-data-dir={tmp_path / "profile"}', *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_page_renders_in_a_real_browser_with_every_image(slide_export, tmp_path):
    if not _chromium():
        if os.environ.get('CI'):
            pytest.fail('chromium is missing in CI (.ci/run installs it)')
        pytest.skip('chromium is not installed (apt-get install chromium); CI runs this')
    a = slide_export['atlas']
    url = 'file://' + os.path.abspath(a.index)
    dom = _headless(tmp_path, '--virtual-time-budget=10000', '--dump-dom', url)
    # The page's own script counts the images that decoded (naturalWidth > 0).
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[:500]
    assert int(loaded.group(1)) == int(loaded.group(2)) == len(a.entries)
    assert re.search(r'id="missing"[^>]*hidden', dom)
    shot = tmp_path / 'shot.png'
    _headless(tmp_path, f'--screenshot={shot}', '--window-size=1200,2000',
              '--virtual-time-budget=10000', url)
    pixels = np.asarray(Image.open(shot).convert('RGB')).astype(int)
    assert pixels.shape[:2] == (2000, 1200)
    # Not blank: dark text, swatches and the sheets' tissue (pink-purple H&E) are there.
    assert (pixels.sum(-1) < 150).mean() > 0.001
    he = (pixels[..., 0] > 120) & (pixels[..., 2] > 120) & (pixels[..., 1] < pixels[..., 0] - 30)
    assert he.mean() > 0.05
    # A page moved without its images says so.
    lone = tmp_path / 'lone'
    lone.mkdir()
    shutil.copy(a.index, lone / 'index.html')
    dom = _headless(tmp_path, '--virtual-time-budget=10000', '--dump-dom',
                    'file://' + str(lone / 'index.html'))
    assert f'data-images-loaded="0/{len(a.entries)}"' in dom
    assert not re.search(r'id="missing"[^>]*hidden', dom)


def test_patch_folder_export_reads_the_patch_files(tmp_path, caplog):
    rng = np.random.default_rng(3)
    files, ids = [], np.array([1, 1, 1, 4, 4])
    for i in range(5):
        path = tmp_path / 'patches' / 's1' / f'{i}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        files.append(str(path))
    files[2] = str(tmp_path / 'patches' / 'gone.png')       # unreadable: left out
    out = tmp_path / 'export'
    os.makedirs(out / fmt.H5_DIR)
    _write_h5(out / fmt.H5_DIR / 's1.h5',
              {'features': np.zeros((5, 4), np.float32), 'coords': -np.ones((5, 2), np.int64),
               'cluster_ids': ids.astype(np.int32),
               'cluster_logits': np.eye(K, dtype=np.float32)[ids] * np.arange(5, 0, -1)[:, None],
               'paths': np.array(files, dtype=object)}, {'patch_size': 64})
    fmt.write_manifest(str(out), [dict(slide_id='s1', n_patches=5, label='',
                                       file=f'{fmt.H5_DIR}/s1.h5')])
    with caplog.at_level(logging.WARNING, logger='clusiam_jax'):
        a = atlas.write_atlas(str(out), tile=32)
    assert 'gone.png' in caplog.text and '1 patch files are unreadable' in caplog.text
    assert [e.cluster_id for e in a.entries] == [1, 4]
    first = a.entries[0]
    assert [p.index for p in first.picks] == [0, 1]           # most typical first
    sheet = np.asarray(Image.open(first.png).convert('RGB'))
    x0, y0, x1, y1 = first.boxes[0]
    want = cv2.resize(np.asarray(Image.open(files[0])), (32, 32), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(sheet[y0:y1, x0:x1], want)
    # Fewer clusters later: the sheet of a cluster without patches goes.
    (out / 'atlas' / 'cluster_7.png').write_bytes(b'old')
    atlas.write_atlas(str(out), tile=32)
    assert not (out / 'atlas' / 'cluster_7.png').exists()


def test_no_atlas_without_cluster_head_or_pixels(tmp_path):
    out = tmp_path / 'export'
    os.makedirs(out / fmt.H5_DIR)
    _write_h5(out / fmt.H5_DIR / 's1.h5', {'features': np.zeros((2, 4), np.float32),
                                         'coords': np.zeros((2, 2), np.int64)},
              {'patch_size': 32})
    fmt.write_manifest(str(out), [dict(slide_id='s1', n_patches=2, label='',
                                       file=f'{fmt.H5_DIR}/s1.h5')])
    assert atlas.write_atlas(str(out)) is None                # no cluster head
    with h5py.File(out / fmt.H5_DIR / 's1.h5', 'a') as f:
        f['cluster_ids'] = np.zeros(2, np.int32)
    assert atlas.write_atlas(str(out)) is None                # no slide, no files
    assert not (out / 'atlas').exists()
    from clusiam_jax.errors import ConfigError
    with pytest.raises(ConfigError, match='at least 1 patch'):
        atlas.write_atlas(str(out), per_cluster=0)


def test_a_missing_slide_is_a_one_line_error_naming_it(slide_export, tmp_path):
    out = tmp_path / 'export'
    shutil.copytree(slide_export['out'], out)
    moved = str(tmp_path / 'gone.svs')
    for slide_id in SUBSETS:
        with h5py.File(out / fmt.H5_DIR / f'{slide_id}.h5', 'a') as f:
            f.attrs['slide_path'] = moved
    from clusiam_jax.errors import DataError
    with pytest.raises(DataError) as error:
        atlas.write_atlas(str(out))
    message = str(error.value)
    assert moved in message and 'slide alpha' in message and len(message.splitlines()) == 1
    # Another file under the slide's name (not the size it was exported from): refused.
    for slide_id in SUBSETS:
        with h5py.File(out / fmt.H5_DIR / f'{slide_id}.h5', 'a') as f:
            f.attrs['slide_path'] = slide_export['slide_path']
            f['coords'].attrs['level0_width'] = 5000
    with pytest.raises(DataError, match=r'^atlas: .* but slide alpha was exported from a '
                                        r'5000 x \d+ px slide \(another file'):
        atlas.write_atlas(str(out))


def test_eval_maps_and_export_write_the_atlas(slide_export, tmp_path, monkeypatch):
    out = tmp_path / 'export'
    shutil.copytree(slide_export['out'], out, ignore=shutil.ignore_patterns('atlas'))
    rows = fmt.read_export_manifest(str(out))
    fmt.write_manifest(str(out), rows[1:2])      # one map (over the slide) is enough
    result = tasks.run_maps(str(out))
    assert result['atlas'] == str(out / 'atlas' / 'index.html')
    assert os.path.isfile(result['atlas']) and len(result['written']) == 1
    # export.atlas (default False): after the export, the atlas is drawn.
    from clusiam_jax.config import default_config
    from clusiam_jax.export import run as export_run
    exp = default_config().export
    assert exp.atlas is False
    shutil.rmtree(out / 'atlas')

    class Job:
        out_dir, slide_ids = str(out), ['beta']

        def run_export(self):
            pass
    monkeypatch.setattr(export_run, 'prepare_export', lambda *args: Job())
    export_run.export(str(tmp_path), exp)
    assert not (out / 'atlas').exists()
    exp.atlas = True
    export_run.export(str(tmp_path), exp)
    assert (out / 'atlas' / 'index.html').is_file()
