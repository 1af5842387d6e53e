"""Export of a tiny trained run: layout, values, resume, crash safety, cluster maps."""
import csv
import json
import os

import h5py
import numpy as np
import pytest
from PIL import Image

from clusiam_jax import run_dir
from clusiam_jax.data import augment, load_rgb
from clusiam_jax.errors import ConfigError, DataError
from clusiam_jax.export import format as fmt
from clusiam_jax.export import run as export_run
from clusiam_jax.export.palette import cluster_palette
from clusiam_jax.models import FEATURE_WIDTH
from clusiam_jax.models.preprocess import normalize_input
from clusiam_jax.train.loop import train
from tests.helpers import SyntheticLoader, tiny_config

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


def _export(config, workdir, out_dir, normalization=None, **overrides):
    config = config.copy_and_resolve_references()
    config.export.out_dir = str(out_dir)
    for key, value in overrides.items():
        config.export[key] = value
    return export_run.export(workdir, config.export, normalization)


def _direct_forward(run, paths, image_size, mean, std):
    images = []
    for p in paths:
        img = load_rgb(p)
        if img.shape[:2] != (image_size, image_size):
            img = augment.resized_crop(img, (0, 0) + img.shape[:2], image_size)
        images.append(img)
    x = normalize_input(np.stack(images), mean, std)
    out = run.network.apply(run.weights.online_variables, x, train=False)
    return np.asarray(out['features']), np.asarray(out['logits'])


def test_export_layout_and_values(run, tmp_path):
    config, workdir, patches = run
    out = tmp_path / 'out'
    _export(config, workdir, out)
    run = run_dir.load_run(workdir)
    assert run.step == 2 and int(run.weights.step) == 2

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
        want_feats, want_logits = _direct_forward(run, paths, 32, SyntheticLoader.mean,
                                                  SyntheticLoader.std)
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
    monkeypatch.setattr(fmt, 'write_slide_h5', lambda path, *a, **k: writes.append(path))
    _export(config, workdir, out)
    assert writes == []
    after = {n: os.stat(out / 'h5_files' / n).st_mtime_ns for n in os.listdir(out / 'h5_files')}
    assert before == after


def test_other_settings_are_exported_again_not_skipped(run, tmp_path, monkeypatch):
    """Same checkpoint, other settings (here the projections): every slide is redone."""
    config, workdir, _ = run
    out = tmp_path / 'out'
    _export(config, workdir, out)
    writes = []
    real_write = fmt.write_slide_h5
    monkeypatch.setattr(fmt, 'write_slide_h5',
                        lambda path, *a: writes.append(os.path.basename(path))
                        or real_write(path, *a))
    _export(config, workdir, out, with_projection=True)
    assert sorted(writes) == ['slide_a.h5', 'slide_b.h5', 'slide_c.h5']
    assert all('projections' in arrays for arrays in fmt.read_export(str(out)).values())


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
    real_write = fmt.write_slide_h5
    monkeypatch.setattr(fmt, 'write_slide_h5',
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
    from_h5 = fmt.read_export(str(tmp_path / 'h5'))
    from_npz = fmt.read_export(str(tmp_path / 'npz'))
    assert sorted(from_h5) == sorted(from_npz) == sorted(SLIDES)
    for slide in SLIDES:
        a, b = from_h5[slide], from_npz[slide]
        for key in ('features', 'coords', 'cluster_ids', 'cluster_logits', 'paths'):
            np.testing.assert_array_equal(a[key], b[key])
        assert a['patch_size'] == b['patch_size']
        assert b['projections'].shape == (len(SLIDES[slide]), 16)


def test_npz_keeps_labels_aligned_when_only_some_slides_have_them(run, tmp_path):
    """A manifest that labels slide_a only: every slide keeps its rows of `labels`."""
    config, workdir, patches = run
    manifest = tmp_path / 'patches.csv'
    rows = ['path,slide_id,label']
    for slide, coords in SLIDES.items():
        for x, y in coords:
            rows.append(f'{patches / slide / f"{x}_{y}.png"},{slide},'
                        f'{"tumor" if slide == "slide_a" else ""}')
    manifest.write_text('\n'.join(rows) + '\n')
    _export(config, workdir, tmp_path / 'npz', format='npz', data_path=str(manifest))
    data = fmt.read_export(str(tmp_path / 'npz'))
    assert list(data['slide_a']['labels']) == ['tumor'] * len(SLIDES['slide_a'])
    assert list(data['slide_b']['labels']) == [''] * len(SLIDES['slide_b'])


def test_cluster_map_cells_sit_at_patch_coordinates(run, tmp_path):
    config, workdir, _ = run
    out = tmp_path / 'out'
    _export(config, workdir, out, cluster_maps=True)
    data = fmt.read_export(str(out))
    palette = cluster_palette(128)[:8]
    for slide, arrays in data.items():
        png = out / 'cluster_maps' / f'{slide}.png'
        assert png.exists()
        with Image.open(png) as saved:
            top = int(saved.text['clusiam_map_top'])   # the map starts below its title
            image = np.asarray(saved.convert('RGB'))
        size = arrays['patch_size']
        for (x, y), cid in zip(arrays['coords'], arrays['cluster_ids']):
            # Mosaic over white, alpha 0.5: the cell's center shows its cluster's color.
            want = np.round(0.5 * 255 + 0.5 * palette[cid]).astype(np.uint8)
            np.testing.assert_array_equal(image[top + y + size // 2, x + size // 2], want)


def test_one_thumbnail_for_several_slides_fails_before_embedding(run, tmp_path):
    config, workdir, _ = run
    Image.new('RGB', (8, 8)).save(tmp_path / 'thumb.png')
    with pytest.raises(ConfigError, match='is one file but the export has'):
        _export(config, workdir, tmp_path / 'out', cluster_maps=True,
                thumbnail=str(tmp_path / 'thumb.png'), thumbnail_downsample=8.0)
    assert not (tmp_path / 'out').exists()  # nothing was embedded


def test_export_reads_the_recorded_normalization_and_never_the_data(run, tmp_path,
                                                                     monkeypatch):
    """Training recorded its normalization in the run; export uses it without looking at
    the training data's statistics again (the data set may be huge, or gone)."""
    config, workdir, _ = run
    recorded = run_dir.read_normalization(workdir)
    assert recorded.mean == SyntheticLoader.mean and recorded.origin == 'synthetic'
    from clusiam_jax.data import stats

    def no_rescan(*args, **kwargs):
        raise AssertionError('export rescanned the data set')
    monkeypatch.setattr(stats, 'compute_stats', no_rescan)
    monkeypatch.setattr(stats, 'cached_stats', no_rescan)
    _export(config, workdir, tmp_path / 'out')
    info = json.loads((tmp_path / 'out' / 'export_info.json').read_text())
    assert info['normalization'] == recorded.to_json()
    # A command-line normalization that contradicts the run's is refused.
    other = run_dir.Normalization((0.5,) * 3, (0.25,) * 3, 'given on the command line')
    with pytest.raises(ConfigError, match='drop --config.data.mean/std'):
        _export(config, workdir, tmp_path / 'other', normalization=other)


def test_a_run_without_recorded_normalization_needs_one_given(run, tmp_path):
    config, workdir, _ = run
    old = str(tmp_path / 'old_run')
    import shutil
    shutil.copytree(workdir, old)
    os.remove(os.path.join(old, run_dir.NORMALIZATION_NAME))
    run_config = run_dir.read_run_config(old)
    run_config.data.mean = run_config.data.std = None
    run_dir.write_run_config(old, run_config)
    with pytest.raises(ConfigError, match='records no normalization'):
        _export(config, old, tmp_path / 'out')
    given = run_dir.Normalization(SyntheticLoader.mean, SyntheticLoader.std, 'given')
    _export(config, old, tmp_path / 'out', normalization=given)
    a = fmt.read_export(str(tmp_path / 'out'))
    _export(config, workdir, tmp_path / 'reference')
    b = fmt.read_export(str(tmp_path / 'reference'))
    for slide in SLIDES:
        np.testing.assert_array_equal(a[slide]['features'], b[slide]['features'])


def test_nothing_readable_is_an_error_not_an_empty_export(run, tmp_path):
    config, workdir, _ = run
    garbage = tmp_path / 'garbage' / 'slide'
    os.makedirs(garbage)
    for i in range(3):
        (garbage / f'{i * 32}_0.png').write_bytes(b'not an image')
    with pytest.raises(DataError, match='no readable patch'):
        _export(config, workdir, tmp_path / 'out', data_path=str(tmp_path / 'garbage'))


def test_export_at_another_image_size(run, tmp_path):
    config, workdir, patches = run
    _export(config, workdir, tmp_path / 'out', image_size=48)
    arrays = fmt.read_export(str(tmp_path / 'out'))['slide_a']
    want, _ = _direct_forward(run_dir.load_run(workdir), list(arrays['paths']), 48,
                              SyntheticLoader.mean, SyntheticLoader.std)
    np.testing.assert_allclose(arrays['features'], want, rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / 'out' / 'export_info.json').read_text())['image_size'] == 48
