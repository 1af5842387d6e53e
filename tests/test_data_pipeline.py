"""The grain pipeline: determinism, sharding, resume, bad files, stats, TFDS, devices."""
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from clusiam_jax import data
from clusiam_jax.data import stats as stats_lib
from clusiam_jax.errors import DataError
from tests.helpers import CRCHP, MEAN, STD, data_config, subprocess_env, take, write_patches

CRCHP_IMAGES = os.path.join(CRCHP, 'images')

def batches_equal(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in ('view1', 'view2'))


@pytest.fixture(scope='module')
def patch_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('patches')
    write_patches(str(root), 18)
    return root


def test_shapes_steps_and_epochs(patch_dir):
    loader = data.create_train_loader(data_config(patch_dir, mean=MEAN, std=STD))
    assert loader.num_records == 18 and loader.steps_per_epoch == 18 // 4
    assert loader.mean == MEAN and loader.std == STD
    batches = list(loader.iterator())
    assert len(batches) == 2 * loader.steps_per_epoch
    for b in batches:
        assert set(b) == {'view1', 'view2'}
        for v in b.values():
            assert v.shape == (4, 24, 24, 3) and v.dtype == np.uint8
        assert not np.array_equal(b['view1'], b['view2'])


def test_each_epoch_is_a_fresh_truncated_permutation(patch_dir):
    loader = data.create_train_loader(data_config(patch_dir, epochs=3, mean=MEAN, std=STD))
    maker = loader.pair_maker()
    per_epoch = loader.steps_per_epoch * 4
    epochs = [[maker.record_index(e * per_epoch + k)[2] for k in range(per_epoch)]
              for e in range(3)]
    for order in epochs:
        assert len(set(order)) == per_epoch  # no record twice in an epoch
    assert epochs[0] != epochs[1] != epochs[2]


def test_same_seed_same_batches_other_seed_differs(patch_dir):
    first = take(data.create_train_loader(data_config(patch_dir, mean=MEAN, std=STD)).iterator(), 3)
    again = take(data.create_train_loader(data_config(patch_dir, mean=MEAN, std=STD)).iterator(), 3)
    other = take(data.create_train_loader(
        data_config(patch_dir, seed=1, mean=MEAN, std=STD)).iterator(), 3)
    assert batches_equal(first, again)
    assert not any(np.array_equal(a['view1'], b['view1']) for a, b in zip(first, other))


def test_process_shares_assemble_the_single_process_batch(patch_dir):
    whole = take(data.create_train_loader(data_config(patch_dir, mean=MEAN, std=STD)).iterator(), 5)
    shares = [take(data.create_train_loader(data_config(patch_dir, mean=MEAN, std=STD),
                                            process_index=p, process_count=2).iterator(), 5)
              for p in range(2)]
    for step in range(5):
        for k in ('view1', 'view2'):
            assert shares[0][step][k].shape[0] == 2
            joined = np.concatenate([shares[0][step][k], shares[1][step][k]])
            np.testing.assert_array_equal(joined, whole[step][k])


def test_a_resumed_run_keeps_its_recorded_normalization(patch_dir, monkeypatch):
    """The statistics a run recorded when it started are used as they are: nothing is
    computed or read from the data set's cache (its list may have changed since)."""
    from clusiam_jax.run_dir import Normalization

    def no_rescan(*args, **kwargs):
        raise AssertionError('the data set was scanned for statistics')
    monkeypatch.setattr(stats_lib, 'cached_stats', no_rescan)
    recorded = Normalization((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 'recorded at the start')
    loader = data.create_train_loader(data_config(patch_dir), recorded=recorded)
    assert (loader.mean, loader.std) == (recorded.mean, recorded.std)
    assert loader.normalization_origin == 'recorded at the start'


def test_config_errors_are_one_line(tmp_path, patch_dir):
    with pytest.raises(DataError, match='patch source not found'):
        data.create_train_loader(data_config(tmp_path / 'missing', mean=MEAN, std=STD))
    with pytest.raises(DataError, match='larger than the 18 records'):
        data.create_train_loader(data_config(patch_dir, batch=32, mean=MEAN, std=STD))


_RESUME_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    from tests.helpers import data_config
    from clusiam_jax import data

    if __name__ == '__main__':
        cfg = data_config({path!r}, workers=2, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        loader = data.create_train_loader(cfg)
        it = loader.iterator()
        with open({state!r}) as f:
            it.set_state(json.load(f))
        batch = next(it)
        np.savez({out!r}, **batch)
        it.close()
""")


def test_resume_in_a_fresh_process_with_workers(patch_dir, tmp_path):
    cfg = data_config(patch_dir, workers=2, mean=MEAN, std=STD)
    it = data.create_train_loader(cfg).iterator()
    seen = take(it, 3)
    state = it.get_state()
    expected = next(it)
    it.close()
    # the stream does not depend on the number of workers
    serial_loader = data.create_train_loader(data_config(patch_dir, mean=MEAN, std=STD))
    serial = take(serial_loader.iterator(), 4)
    assert batches_equal(seen + [expected], serial)

    state_file, out = tmp_path / 'state.json', tmp_path / 'next.npz'
    state_file.write_text(json.dumps(state))  # must be JSON-serializable
    script = tmp_path / 'resume.py'
    script.write_text(_RESUME_SCRIPT.format(path=str(patch_dir),
                                            state=str(state_file), out=str(out)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=240, cwd=str(tmp_path), env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = dict(np.load(out))
    assert batches_equal([resumed], [expected])


def _bad_files(root):
    good_png = io.BytesIO()
    Image.new('RGB', (40, 40), (200, 30, 90)).save(good_png, 'PNG')
    good_jpg = io.BytesIO()
    Image.new('RGB', (40, 40), (20, 130, 90)).save(good_jpg, 'JPEG')
    bad = {
        'empty.png': b'',
        'truncated.png': good_png.getvalue()[:60],
        'truncated.jpg': good_jpg.getvalue()[:len(good_jpg.getvalue()) // 2],
        'not_an_image.png': b'<html>404</html>',
        'garbage.tif': bytes(range(256)) * 4,
    }
    d = os.path.join(root, 'bad', 'slide_x')
    os.makedirs(d, exist_ok=True)
    paths = []
    for name, content in bad.items():
        with open(os.path.join(d, name), 'wb') as f:
            f.write(content)
        paths.append(os.path.join(d, name))
    return paths


def _odd_but_readable(root):
    """Files that must be converted, not skipped."""
    d = os.path.join(root, 'odd', 'slide_y')
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert('L').save(os.path.join(d, 'gray.png'))
    Image.fromarray(np.dstack([rgb, rgb[..., :1]]), 'RGBA').save(os.path.join(d, 'rgba.png'))
    Image.fromarray(rng.integers(0, 65536, (30, 30), dtype=np.uint16)).save(
        os.path.join(d, 'deep16.png'))
    Image.fromarray(rgb[:3, :2]).save(os.path.join(d, 'tiny.png'))  # smaller than the crop


def test_bad_files_are_skipped_once_and_listed(tmp_path):
    root = tmp_path / 'data'
    write_patches(str(root), 11)
    _odd_but_readable(str(root))
    bad = _bad_files(str(root))
    workdir = tmp_path / 'work'
    # 20 records, batch 5: every record is read in each of the 2 epochs, by two
    # worker processes; stats are computed too (they read every file).
    cfg = data_config(root, batch=5, epochs=2, workers=2, size=16)
    loader = data.create_train_loader(cfg, workdir=str(workdir))
    assert loader.num_records == 20
    it = loader.iterator()
    batches = list(it)
    it.close()
    assert len(batches) == 2 * 4
    assert all(b['view1'].shape == (5, 16, 16, 3) for b in batches)
    listed = (workdir / 'skipped_files.txt').read_text().splitlines()
    assert sorted(listed) == sorted(bad)  # exactly the bad ones, each once
    assert len(loader.skipped_files()) == len(bad)
    # the stats were computed over the readable files only
    assert all(0 < s < 0.5 for s in loader.std)


def test_a_source_of_only_unreadable_files_is_a_data_error(tmp_path):
    root = tmp_path / 'data' / 'slide'
    os.makedirs(root)
    for i in range(6):
        (root / f'{i * 32}_0.png').write_bytes(b'not an image')
    # With mean/std given nothing reads the files up front: the batch assembly finds out.
    it = data.create_train_loader(data_config(tmp_path / 'data', mean=MEAN, std=STD),
                                  workdir=str(tmp_path / 'work')).iterator()
    with pytest.raises(DataError, match='substitutes in a row were unreadable'):
        next(it)


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    """Normalization caches in a folder of the test's own ($XDG_CACHE_HOME)."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    return tmp_path / 'cache'


def test_stats_are_the_pixel_mean_and_population_std(tmp_path, user_cache):
    root = tmp_path / 'd'
    paths = write_patches(str(root), 7, size=20, seed=3)
    pixels = np.concatenate([np.asarray(Image.open(p).convert('RGB')).reshape(-1, 3)
                             for p in paths]).astype(np.float64) / 255.0
    loader = data.create_train_loader(data_config(root, batch=2), workdir=str(tmp_path / 'w'))
    np.testing.assert_allclose(loader.mean, pixels.mean(0), rtol=1e-10)
    np.testing.assert_allclose(loader.std, pixels.std(0), rtol=1e-9)
    # Cached in the user's cache folder, never inside the data folder (input).
    assert os.path.exists(stats_lib.cache_file(str(root)))
    assert sorted(os.listdir(root)) == ['class_0', 'class_1']


def test_stats_cache_is_keyed_by_the_file_list(tmp_path, user_cache, monkeypatch):
    root = tmp_path / 'd'
    write_patches(str(root), 5, size=16)
    first = data.create_train_loader(data_config(root, batch=2))
    calls = []
    real = stats_lib.compute_stats
    monkeypatch.setattr(stats_lib, 'compute_stats',
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    again = data.create_train_loader(data_config(root, batch=2))
    assert (again.mean, again.std) == (first.mean, first.std) and not calls
    Image.new('RGB', (16, 16), (255, 255, 255)).save(root / 'class_0' / 'slide_0' / '1_1.png')
    changed = data.create_train_loader(data_config(root, batch=2))
    assert calls and changed.mean != first.mean


def test_tfds_dataset_yields_exactly_the_source_pixels(tmp_path):
    src = tmp_path / 'src'
    write_patches(str(src), 6)
    _odd_but_readable(str(src))
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
        src / 'class_0' / 'slide_0' / '7_7.jpg', quality=80)
    bad = _bad_files(str(src))
    out = tmp_path / 'built'
    data.build_dataset(str(src), str(out))
    from clusiam_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
    recs = data.discover(str(out))
    assert len(recs) == 6 + 4 + 1
    source = tfds_builder.open_data_source(str(out / 'clusiam_patches' / '1.0.0'))
    assert len(source) == len(recs)
    for i, rec in enumerate(recs):
        example = source[i]
        assert example['path'].decode() == rec.path
        assert example['x'] == (-1 if rec.x is None else rec.x)
        got = data.decode_rgb(example['image'])
        pil = Image.open(rec.path)
        if pil.mode.startswith('I'):
            ref = data.load_rgb(rec.path)  # 16-bit: our documented scaling
        else:
            ref = np.asarray(pil.convert('RGB'))
        np.testing.assert_array_equal(got, ref)
    skipped = (out / 'clusiam_patches' / '1.0.0' / 'skipped_files.txt').read_text()
    assert sorted(line.split('\t')[0] for line in skipped.splitlines()) == sorted(bad)
    assert 'tensorflow' not in sys.modules


def test_built_dataset_trains_like_its_folder(tmp_path, user_cache):
    src = tmp_path / 'src'
    write_patches(str(src), 9)
    dataset_dir = data.build_dataset(str(src), str(tmp_path / 'built'))
    from_folder = take(data.create_train_loader(data_config(src, mean=MEAN, std=STD)).iterator(), 2)
    from_tfds = take(data.create_train_loader(data_config(dataset_dir, mean=MEAN, std=STD))
                     .iterator(), 2)
    assert batches_equal(from_folder, from_tfds)
    # stats are the same too (cached next to the dataset)
    a = data.create_train_loader(data_config(src))
    b = data.create_train_loader(data_config(tmp_path / 'built'))
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12)
    assert os.path.exists(stats_lib.cache_file(str(tmp_path / 'built'), dataset_dir))
    assert not os.path.exists(os.path.join(dataset_dir, stats_lib.CACHE_NAME))


def test_to_device_and_prefetch(patch_dir):
    jax = pytest.importorskip('jax')
    from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top

    from clusiam_jax.train import prefetch
    mesh = Mesh(np.array(jax.devices()[:1]), ('data',))
    sharding = NamedSharding(mesh, PartitionSpec('data'))
    loader = data.create_train_loader(data_config(patch_dir, epochs=1, mean=MEAN, std=STD))
    host = list(loader.iterator())
    on_device = list(prefetch.prefetch_to_device(iter(host), sharding, size=2))
    assert len(on_device) == len(host)
    for h, d in zip(host, on_device):
        assert d['view1'].sharding == sharding and d['view1'].dtype == np.uint8
        np.testing.assert_array_equal(np.asarray(d['view2']), h['view2'])
    x = prefetch.to_device(host[0], {'view1': sharding, 'view2': sharding})['view1']
    assert x.sharding == sharding
    np.testing.assert_array_equal(np.asarray(x), host[0]['view1'])


@pytest.mark.skipif(not os.path.isdir(CRCHP_IMAGES), reason='../shared/data/crchp is absent')
def test_real_crchp_images_read_and_augment(tmp_path):
    names = sorted(os.listdir(CRCHP_IMAGES))[:8]
    manifest = tmp_path / 'crchp.csv'
    manifest.write_text('path,slide_id\n' + ''.join(
        f'{os.path.join(CRCHP_IMAGES, n)},{os.path.splitext(n)[0]}\n' for n in names))
    loader = data.create_train_loader(data_config(manifest, batch=4, epochs=1, size=64),
                                      workdir=str(tmp_path))
    batches = list(loader.iterator())
    assert len(batches) == 2 and not loader.skipped_files()
    for b in batches:
        assert b['view1'].shape == (4, 64, 64, 3)
        assert b['view1'].std() > 5  # real texture survived the augmentation
    # H&E: more red/blue than green on average
    assert loader.mean[1] < loader.mean[0] and loader.mean[1] < loader.mean[2]
    img = data.load_rgb(os.path.join(CRCHP_IMAGES, names[0]))
    assert img.shape == (500, 500, 3)
