"""Export of a tiny trained run: layout, values, resume, crash safety, cluster maps."""
import csv
import json
import os

import h5py
import jax
import numpy as np
import pytest
from PIL import Image

from clusiam_jax import export
from clusiam_jax.data import augment, load_rgb
from clusiam_jax.eval import exported
from clusiam_jax.eval.cluster_map import cluster_palette
from clusiam_jax.models import FEATURE_WIDTH
from clusiam_jax.train.loop import train
from clusiam_jax.train.step import normalize_images
from fakes import SyntheticLoader
from tiny import tiny_config

# slide -> patch coordinates; 19 readable patches over 3 slides, so with a batch of 8
# the batches straddle slides and the last one is padded.
SLIDES = {
    'slide_a': [(0, 0), (32, 0), (64, 0), (0, 32), (32, 32)],
    'slide_b': [(x, y) for x in (0, 32, 64, 96) for y in (0, 32, 64)][:11],
    'slide_c': [(128, 64), (160, 64), (128, 96)],
}
BAD = os.path.join('slide_b', '999_999.png')


def _write_patches(root, size=32):
    rng = np.random.default_rng(0)
    for slide, coords in SLIDES.items():
        os.makedirs(root / slide)
        for x, y in coords:
            # slide_c's patches are 40 px: the export resizes them to image_size.
            side = 40 if slide == 'slide_c' else size
            img = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / slide / f'{x}_{y}.png')
    (root / BAD).write_bytes(b'not an image')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A trained tiny CluSiam run and a patch folder to export."""
    base = tmp_path_factory.mktemp('export')
    patches = base / 'patches'
    _write_patches(patches)
    config = tiny_config('clusiam', batch_size=8, image_size=32, num_epochs=1)
    config.data.mean = SyntheticLoader.mean
    config.data.std = SyntheticLoader.std
    config.export.batch_size = 8
    config.export.data_path = str(patches)
    workdir = str(base / 'run')
    train(config, workdir, loader=SyntheticLoader(2, 1, 8, 32))
    return config, workdir, patches


def _export(config, workdir, out_dir, **overrides):
    config = config.copy_and_resolve_references()
    config.export.out_dir = str(out_dir)
    for key, value in overrides.items():
        config.export[key] = value
    return export.export_run(config, workdir)


def _direct_forward(network, state, paths, image_size, mean, std):
    images = []
    for p in paths:
        img = load_rgb(p)
        if img.shape[:2] != (image_size, image_size):
            img = augment.resized_crop(img, (0, 0) + img.shape[:2], image_size)
        images.append(img)
    x = normalize_images(np.stack(images), mean, std)
    out = network.apply({'params': state.params, 'batch_stats': state.batch_stats}, x,
                        train=False)
    return np.asarray(out['features']), np.asarray(out['logits'])


def test_export_layout_and_values(run, tmp_path):
    config, workdir, patches = run
    out = tmp_path / 'out'
    _export(config, workdir, out)
    run_config, network, state = export.load_run(workdir)
    assert int(state.step) == 2

    manifest = list(csv.DictReader(open(out / 'manifest.csv')))
    assert [r['slide_id'] for r in manifest] == sorted(SLIDES)
    for row in manifest:
        slide = row['slide_id']
        assert row['file'] == f'h5_files/{slide}.h5'
        with h5py.File(out / row['file'], 'r') as f:
            feats, coords = f['features'][()], f['coords'][()]
            ids, logits = f['cluster_ids'][()], f['cluster_logits'][()]
            paths = [p.decode() for p in f['paths'][()]]
            n = len(SLIDES[slide])
            assert int(row['n_patches']) == n
            assert feats.dtype == np.float32 and feats.shape == (n, FEATURE_WIDTH['resnet_tiny'])
            assert coords.dtype == np.int64 and coords.shape == (n, 2)
            assert logits.dtype == np.float32 and logits.shape == (n, 8)
            assert ids.dtype == np.int32 and np.array_equal(ids, logits.argmax(1))
            assert int(f.attrs['checkpoint_step']) == 2
            np.testing.assert_allclose(f.attrs['norm_mean'], SyntheticLoader.mean)
            assert f['coords'].attrs['patch_level'] == 0
            assert f['coords'].attrs['patch_size'] == (40 if slide == 'slide_c' else 32)
            assert json.loads(f.attrs['config_json'])['model']['name'] == 'clusiam'
        # Every patch of this slide, in path order, with its own coordinates.
        expected = sorted(str(patches / slide / f'{x}_{y}.png') for x, y in SLIDES[slide])
        assert paths == expected
        for p, (x, y) in zip(paths, coords):
            assert os.path.basename(p) == f'{x}_{y}.png'
        want_feats, want_logits = _direct_forward(network, state, paths, 32,
                                                  SyntheticLoader.mean, SyntheticLoader.std)
        np.testing.assert_allclose(feats, want_feats, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-5)

    skipped = (out / 'skipped_files.txt').read_text().split()
    assert skipped == [str(patches / BAD)]
    info = json.loads((out / 'export_info.json').read_text())
    assert info['checkpoint_step'] == 2 and info['n_patches'] == 19
    assert info['normalization']['mean'] == list(SyntheticLoader.mean)
    assert not [n for n in os.listdir(out / 'h5_files') if not n.endswith('.h5')]


def test_rerun_skips_finished_slides(run, tmp_path, monkeypatch):
    config, workdir, _ = run
    out = tmp_path / 'out'
    _export(config, workdir, out)
    before = {n: os.stat(out / 'h5_files' / n).st_mtime_ns for n in os.listdir(out / 'h5_files')}
    writes = []
    monkeypatch.setattr(export, '_write_h5', lambda path, *a, **k: writes.append(path))
    _export(config, workdir, out)
    assert writes == []
    after = {n: os.stat(out / 'h5_files' / n).st_mtime_ns for n in os.listdir(out / 'h5_files')}
    assert before == after


def test_crash_mid_export_leaves_no_partial_file(run, tmp_path, monkeypatch):
    config, workdir, _ = run
    out = tmp_path / 'out'
    real_create = h5py.Group.create_dataset
    calls = {'files': set()}

    def failing_create(self, name, *args, **kwargs):
        calls['files'].add(self.file.filename)
        if len(calls['files']) == 2 and name == 'coords':
            raise RuntimeError('simulated crash while writing the second slide')
        return real_create(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, 'create_dataset', failing_create)
    with pytest.raises(RuntimeError, match='simulated crash'):
        _export(config, workdir, out)
    monkeypatch.undo()
    # The first slide is complete, the second left nothing behind (no temp file either).
    assert sorted(os.listdir(out / 'h5_files')) == ['slide_a.h5']
    assert not (out / 'manifest.csv').exists()
    # A killed process leaves its temp file: the rerun deletes it.
    (out / 'h5_files' / 'slide_b.h5.tmp12345').write_bytes(b'half')

    writes = []
    real_write = export._write_h5
    monkeypatch.setattr(export, '_write_h5',
                        lambda path, *a: writes.append(os.path.basename(path))
                        or real_write(path, *a))
    _export(config, workdir, out)
    assert writes == ['slide_b.h5', 'slide_c.h5']
    assert sorted(os.listdir(out / 'h5_files')) == ['slide_a.h5', 'slide_b.h5', 'slide_c.h5']
    assert len(list(csv.DictReader(open(out / 'manifest.csv')))) == 3


def test_npz_format_matches_h5(run, tmp_path):
    config, workdir, _ = run
    _export(config, workdir, tmp_path / 'h5')
    _export(config, workdir, tmp_path / 'npz', format='npz', with_projection=True)
    assert not (tmp_path / 'npz' / 'h5_files').exists()
    from_h5 = exported.read_export(str(tmp_path / 'h5'))
    from_npz = exported.read_export(str(tmp_path / 'npz'))
    assert sorted(from_h5) == sorted(from_npz) == sorted(SLIDES)
    for slide in SLIDES:
        a, b = from_h5[slide], from_npz[slide]
        for key in ('features', 'coords', 'cluster_ids', 'cluster_logits', 'paths'):
            np.testing.assert_array_equal(a[key], b[key])
        assert a['patch_size'] == b['patch_size']
        assert b['projections'].shape == (len(SLIDES[slide]), 16)


def test_cluster_map_cells_sit_at_patch_coordinates(run, tmp_path):
    config, workdir, _ = run
    out = tmp_path / 'out'
    _export(config, workdir, out, cluster_maps=True)
    data = exported.read_export(str(out))
    palette = cluster_palette(128)[:8]
    for slide, arrays in data.items():
        png = out / 'cluster_maps' / f'{slide}.png'
        assert png.exists()
        image = np.asarray(Image.open(png).convert('RGB'))
        size = arrays['patch_size']
        for (x, y), cid in zip(arrays['coords'], arrays['cluster_ids']):
            # Mosaic over white, alpha 0.5: the cell's center shows its cluster's color.
            want = np.round(0.5 * 255 + 0.5 * palette[cid]).astype(np.uint8)
            np.testing.assert_array_equal(image[y + size // 2, x + size // 2], want)


def test_one_thumbnail_for_several_slides_fails_before_embedding(run, tmp_path):
    from clusiam_jax.config import ConfigError
    config, workdir, _ = run
    Image.new('RGB', (8, 8)).save(tmp_path / 'thumb.png')
    with pytest.raises(ConfigError, match='is one file but the export has'):
        _export(config, workdir, tmp_path / 'out', cluster_maps=True,
                thumbnail=str(tmp_path / 'thumb.png'), thumbnail_downsample=8.0)
    assert not (tmp_path / 'out').exists()  # nothing was embedded


def test_training_normalization_from_the_training_list(run, tmp_path):
    config, _, patches = run
    c = config.copy_and_resolve_references()
    c.data.mean = None
    c.data.std = None
    c.data.path = str(patches)
    mean, std, origin = export.training_normalization(c, str(tmp_path))
    from clusiam_jax.data import compute_stats
    from clusiam_jax.data.sources import open_source
    want_mean, want_std = compute_stats(open_source(str(patches))[1])
    np.testing.assert_allclose(mean, want_mean)
    np.testing.assert_allclose(std, want_std)
    c.data.path = str(tmp_path / 'gone')
    with pytest.raises(FileNotFoundError, match='data.mean'):
        export.training_normalization(c)


def test_nothing_readable_is_an_error_not_an_empty_export(run, tmp_path):
    from clusiam_jax.data import DataError
    config, workdir, _ = run
    garbage = tmp_path / 'garbage' / 'slide'
    os.makedirs(garbage)
    for i in range(3):
        (garbage / f'{i * 32}_0.png').write_bytes(b'not an image')
    with pytest.raises(DataError, match='no readable patch'):
        _export(config, workdir, tmp_path / 'out', data_path=str(tmp_path / 'garbage'))


def test_bad_export_settings_fail_early(tmp_path):
    from clusiam_jax.config import ConfigError
    c = tiny_config()
    c.export.format = 'parquet'
    with pytest.raises(ConfigError, match='export.format'):
        export.export_run(c, str(tmp_path))  # fails before looking for a run
    c.export.format = 'h5'
    c.export.cluster_maps = True
    thumb = tmp_path / 'thumb.png'
    Image.new('RGB', (4, 4)).save(thumb)
    c.export.thumbnail = str(thumb)
    with pytest.raises(ConfigError, match='thumbnail_downsample'):
        export.export_run(c, str(tmp_path))
    c.export.thumbnail_downsample = 8.0
    with pytest.raises(FileNotFoundError, match='checkpoints'):
        export.export_run(c, str(tmp_path / 'no_run'))
