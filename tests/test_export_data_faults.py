"""Faults of issue 22 in export resume, normalization statistics and data resume:

* an export never keeps features of other weights (a run trained again, another run) or
  of other patches (a slide tiled again at another resolution, other patch files);
* normalization statistics that would poison a run are refused or not cached, and a
  repaired source recomputes them;
* a run resumes with any data.num_workers, ending bit for bit where an uninterrupted
  run ends.
"""
import json
import os
import pathlib
import shutil
import signal

import h5py
import jax
import numpy as np
import pytest
from PIL import Image

from clusiam_jax import data, interrupts
from clusiam_jax.data import pipeline
from clusiam_jax.data import stats as stats_lib
from clusiam_jax.errors import ConfigError, DataError
from clusiam_jax.export import format as fmt
from clusiam_jax.export import run as export_run
from clusiam_jax.slides import tiling
from clusiam_jax.train.loop import train
from tests.helpers import (
    MEAN,
    STD,
    SyntheticLoader,
    assert_trees_equal,
    data_config,
    mesh_of,
    take,
    tiny_config,
    write_patches,
    write_pyramid,
)
from tests.test_slides import synthetic_base, tile_params

# ------------------------------------------------------------------------ export


def _train(config, workdir, seed):
    """Two steps of the tiny run on synthetic batches drawn from `seed`: the loader's
    seed is not in the config, so two seeds give two sets of weights of one config."""
    train(config, str(workdir), loader=SyntheticLoader(2, 1, 8, 32, seed=seed),
          mesh=mesh_of(1))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp('export_faults')
    patches = base / 'patches'
    write_patches(str(patches), 9, size=32)
    config = tiny_config('clusiam', batch_size=8, image_size=32, num_epochs=1)
    config.data.mean, config.data.std = SyntheticLoader.mean, SyntheticLoader.std
    config.export.batch_size = 8
    config.export.data_path = str(patches)
    _train(config, base / 'run', seed=0)
    return config, str(base / 'run'), patches


def _export(config, workdir, out_dir, **overrides):
    exp = config.export.copy_and_resolve_references()
    exp.out_dir = str(out_dir)
    for key, value in overrides.items():
        exp[key] = value
    return export_run.export(workdir, exp, None)


def _features(out_dir):
    return {s: a['features'] for s, a in fmt.read_export(str(out_dir)).items()}


def test_weights_trained_again_at_the_same_step_are_exported_again(run, tmp_path):
    """The same run directory trained again (same config, same step, other data) holds
    other weights: its export into the folder of the first must not keep the first's
    features, but equal a fresh export of the new weights."""
    config, first_run, _ = run
    workdir = tmp_path / 'run'
    shutil.copytree(first_run, workdir)
    out = tmp_path / 'out'
    _export(config, str(workdir), out)
    before = _features(out)
    shutil.rmtree(workdir / 'checkpoints')
    _train(config, workdir, seed=1)
    _export(config, str(workdir), out)
    _export(config, str(workdir), tmp_path / 'fresh')
    after, fresh = _features(out), _features(tmp_path / 'fresh')
    assert sorted(after) == sorted(fresh) == sorted(before)
    for slide in fresh:
        assert not np.allclose(before[slide], fresh[slide])   # the weights did change
        np.testing.assert_array_equal(after[slide], fresh[slide])


def test_a_folder_holding_another_runs_export_is_refused(run, tmp_path):
    """Another run (other weights, another folder) is refused with one line naming the
    folder and the way out; its own folder is exported as usual. The same run moved to
    another folder (the same weights) is not another run."""
    config, workdir, _ = run
    out = tmp_path / 'out'
    _export(config, workdir, out)
    moved = tmp_path / 'moved_run'
    shutil.copytree(workdir, moved)
    _export(config, str(moved), out)   # the same weights: accepted
    other = tmp_path / 'other_run'
    shutil.copytree(workdir, other)
    shutil.rmtree(other / 'checkpoints')
    _train(config, other, seed=1)
    with pytest.raises(ConfigError, match='holds .* another export .*export.out_dir') as err:
        _export(config, str(other), out)
    assert '\n' not in str(err.value) and str(moved) in str(err.value)
    _export(config, str(other), other / 'export')   # inside the run: its own
    assert _features(other / 'export').keys() == _features(out).keys()


def test_a_patch_folder_with_other_coordinates_is_exported_again(run, tmp_path):
    """The same slides with as many patches at other coordinates (a folder extracted
    again at another resolution): the coordinates in the file are the new ones."""
    config, workdir, patches = run
    folder = tmp_path / 'patches'
    shutil.copytree(patches, folder)
    out = tmp_path / 'out'
    _export(config, workdir, out, data_path=str(folder))
    for path in sorted(folder.rglob('*.png')):
        x, y = map(int, path.stem.split('_'))
        path.rename(path.with_name(f'{2 * x + 1}_{2 * y + 1}.png'))
    _export(config, workdir, out, data_path=str(folder))
    _export(config, workdir, tmp_path / 'fresh', data_path=str(folder))
    got = fmt.read_export(str(out))
    want = fmt.read_export(str(tmp_path / 'fresh'))
    assert sorted(got) == sorted(want)
    for slide in want:
        np.testing.assert_array_equal(got[slide]['coords'], want[slide]['coords'])
        assert list(got[slide]['paths']) == list(want[slide]['paths'])
        np.testing.assert_array_equal(got[slide]['features'], want[slide]['features'])


def test_a_slide_tiled_again_at_another_resolution_is_exported_again(run, tmp_path):
    """Tiled at 0.5 µm/px with 32-px patches, then again at 1 µm/px with 16-px patches:
    the same level-0 grid (same count, same coordinates), other pixels. The second export
    redoes the slide and carries the new tiling's attributes."""
    config, workdir, _ = run
    slides = tmp_path / 'wsi'
    slides.mkdir()
    write_pyramid(str(slides / 'gamma.tif'), synthetic_base(0.5), 0.5)
    tiles, out = tmp_path / 'tiles', tmp_path / 'out'
    tiling.tile_slides(tiling.list_slides(str(slides)), tile_params(patch_size=32), str(tiles))
    _export(config, workdir, out, data_path=str(tiles))
    first = fmt.read_export(str(out))['gamma']
    tiling.tile_slides(tiling.list_slides(str(slides)),
                       tile_params(patch_size=16, target_mpp=1.0), str(tiles))
    _export(config, workdir, out, data_path=str(tiles))
    _export(config, workdir, tmp_path / 'fresh', data_path=str(tiles))
    again = fmt.read_export(str(out))['gamma']
    fresh = fmt.read_export(str(tmp_path / 'fresh'))['gamma']
    assert len(fresh['coords']) == len(first['coords'])   # the case that fooled the resume
    np.testing.assert_array_equal(again['features'], fresh['features'])
    assert not np.allclose(again['features'], first['features'])
    with h5py.File(out / 'h5_files' / 'gamma.h5', 'r') as f:
        assert int(f['coords'].attrs['patch_size']) == 16


# ---------------------------------------------------------------- normalization


def _uniform_patches(root, n=6, colour=(200, 120, 180)):
    os.makedirs(root / 'slide_u', exist_ok=True)
    for i in range(n):
        Image.new('RGB', (16, 16), colour).save(root / 'slide_u' / f'{i * 16}_0.png')


def _pixel_stats(paths):
    pixels = np.concatenate([np.asarray(Image.open(p).convert('RGB')).reshape(-1, 3)
                             for p in paths]).astype(np.float64) / 255.0
    return pixels.mean(0), pixels.std(0)


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    """Normalization caches in a folder of the test's own ($XDG_CACHE_HOME)."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    return tmp_path / 'cache'


def _cache_file(root):
    """Where the statistics of the patch folder `root` are cached (never inside it)."""
    return pathlib.Path(stats_lib.cache_file(str(root)))


def test_a_blank_data_set_is_refused_and_nothing_cached(tmp_path, user_cache):
    root = tmp_path / 'blank'
    _uniform_patches(root)
    with pytest.raises(DataError, match='blank or uniform') as err:
        data.create_train_loader(data_config(root, batch=2))
    assert '\n' not in str(err.value)
    assert not _cache_file(root).exists()


def test_a_cached_zero_std_is_not_reused(tmp_path, user_cache):
    """An entry with std 0 (as earlier versions cached for blank sets) is never used:
    the statistics are computed again from the images."""
    root = tmp_path / 'd'
    paths = write_patches(str(root), 6, size=16)
    key = stats_lib.list_key([r.path for r in data.discover(str(root))])
    _cache_file(root).parent.mkdir(parents=True)
    _cache_file(root).write_text(json.dumps({key: {'mean': [0.5] * 3, 'std': [0.0] * 3}}))
    loader = data.create_train_loader(data_config(root, batch=2))
    mean, std = _pixel_stats(paths)
    np.testing.assert_allclose(loader.std, std, rtol=1e-9)
    np.testing.assert_allclose(loader.mean, mean, rtol=1e-10)


def _break(paths):
    for p in paths:
        with open(p, 'wb') as f:
            f.write(b'not an image')


def test_statistics_of_a_mostly_unreadable_source_are_not_cached(tmp_path, user_cache):
    """5 of 7 images unreadable: the run gets the statistics of the 2 it can read, the
    cache gets nothing, and once repaired the statistics are those of all 7."""
    root = tmp_path / 'd'
    paths = write_patches(str(root), 7, size=16)
    originals = {p: open(p, 'rb').read() for p in paths}
    _break(paths[2:])
    loader = data.create_train_loader(data_config(root, batch=2), workdir=str(tmp_path / 'w'))
    mean, std = _pixel_stats(paths[:2])
    np.testing.assert_allclose(loader.mean, mean, rtol=1e-10)
    assert 'not cached' in loader.normalization_origin
    assert not _cache_file(root).exists() and not (tmp_path / 'w' / stats_lib.CACHE_NAME).exists()
    for p, content in originals.items():
        with open(p, 'wb') as f:
            f.write(content)
    repaired = data.create_train_loader(data_config(root, batch=2))
    mean, std = _pixel_stats(paths)
    np.testing.assert_allclose(repaired.mean, mean, rtol=1e-10)
    np.testing.assert_allclose(repaired.std, std, rtol=1e-9)


def test_a_repaired_file_recomputes_cached_statistics(tmp_path, user_cache):
    """1 of 7 unreadable: the statistics of the 6 are cached (and reused while nothing
    changes); repairing the file recomputes them over all 7."""
    root = tmp_path / 'd'
    paths = write_patches(str(root), 7, size=16)
    content = open(paths[3], 'rb').read()
    _break(paths[3:4])
    first = data.create_train_loader(data_config(root, batch=2))
    np.testing.assert_allclose(first.mean, _pixel_stats(paths[:3] + paths[4:])[0], rtol=1e-10)
    assert _cache_file(root).exists()
    again = data.create_train_loader(data_config(root, batch=2))
    assert again.mean == first.mean and 'cached' in again.normalization_origin
    with open(paths[3], 'wb') as f:
        f.write(content)
    repaired = data.create_train_loader(data_config(root, batch=2))
    np.testing.assert_allclose(repaired.mean, _pixel_stats(paths)[0], rtol=1e-10)


# ----------------------------------------------------------------- data resume


@pytest.fixture(scope='module')
def patch_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('resume_patches')
    write_patches(str(root), 18)
    return root


def _same_batches(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in ('view1', 'view2'))


def test_the_data_position_resumes_with_another_worker_count(patch_dir):
    """Saved with 2 workers, resumed serially (the reverse, in a whole run, below)."""
    saved_with, resumed_with = 2, 0
    serial = take(data.create_train_loader(data_config(patch_dir, mean=MEAN, std=STD))
                  .iterator(), 6)
    it = data.create_train_loader(data_config(patch_dir, workers=saved_with, mean=MEAN,
                                              std=STD)).iterator()
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))   # as a checkpoint stores it
    it.close()
    resumed = data.create_train_loader(data_config(patch_dir, workers=resumed_with,
                                                   mean=MEAN, std=STD)).iterator()
    resumed.set_state(state)
    try:
        assert _same_batches(take(resumed, 3), serial[3:])
    finally:
        resumed.close()


def test_positions_saved_by_grain_itself_still_resume():
    """Checkpoints written before the pipeline kept its own position hold grain's
    states: a serial one, and one of two workers after 3 batches."""
    assert pipeline.batches_drawn({'next_index': 5}) == 5
    assert pipeline.batches_drawn({
        'next_index_in_cycle': 1, 'next_index_in_datasets': 2,
        'iterators_in_use_indices': [0, 1], 'exhausted': [0, 0], 'future_states': {},
        'iterators_in_use_states': [{'next_index': 2}, {'next_index': 1}]}) == 3
    with pytest.raises(DataError, match='data position'):
        pipeline.batches_drawn({'something': 'else'})


class _StopAt:
    """Sends SIGTERM when batch `at` is drawn, as a scheduler would."""

    def __init__(self, loader, at):
        self.loader, self.at = loader, at
        self.steps_per_epoch, self.mean, self.std = (loader.steps_per_epoch, loader.mean,
                                                     loader.std)

    def iterator(self):
        it, at = self.loader.iterator(), self.at

        class Stopping:
            drawn = 0

            def __iter__(self):
                return self

            def __next__(self):
                if self.drawn == at:
                    os.kill(os.getpid(), signal.SIGTERM)
                self.drawn += 1
                return next(it)

            get_state, set_state, close = it.get_state, it.set_state, it.close
        return Stopping()


def test_training_resumes_with_another_worker_count_bit_exactly(patch_dir, tmp_path):
    """Stopped mid-epoch with data.num_workers=0, resumed with 2: the final parameters
    are those of the uninterrupted run, bit for bit."""
    config = tiny_config('clusiam', batch_size=4, image_size=24, num_epochs=2)
    config.data.path = str(patch_dir)
    config.data.mean, config.data.std = MEAN, STD
    config.train.checkpoint_every_epochs = 0

    def loader(workers):
        config.data.num_workers = workers
        return data.create_train_loader(config)
    reference = jax.device_get(train(config, str(tmp_path / 'straight'), loader(0),
                                     mesh_of(1)))
    workdir = str(tmp_path / 'stopped')
    stopped = train(config, workdir, _StopAt(loader(0), at=6), mesh_of(1))
    assert interrupts.received() == signal.SIGTERM
    assert 4 < int(stopped.step) < 8     # in the middle of epoch 2 (4 steps an epoch)
    resumed = jax.device_get(train(config, workdir, loader(2), mesh_of(1)))
    assert int(resumed.step) == 8
    assert_trees_equal(resumed, reference)
