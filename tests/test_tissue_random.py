"""Fresh positions every epoch (data.sampling=tissue_random, data.patches_per_slide): each
epoch's squares are drawn inside the tissue mask the tiling kept its grid by, under its
tile.min_tissue rule; the batches do not depend on the worker or process count and a
resumed iterator continues exactly.

References: the stored mask read back and measured by NumPy slicing (the rule's rounding,
no integral image), OpenSlide's own read of each drawn square, 0 vs 2 workers, 1 vs 2
processes, a resumed iterator against an uninterrupted one.
"""
import os
import shutil

import h5py
import numpy as np
import pytest

from clusiam_jax import data
from clusiam_jax.data import slide_sampler
from clusiam_jax.errors import ConfigError, DataError
from clusiam_jax.slides import coords as coords_lib
from clusiam_jax.slides import tiling
from tests.helpers import MEAN, STD, data_config, same_views, take, write_patches, write_pyramid
from tests.test_multi_mpp import _openslide_patch
from tests.test_slides import synthetic_base, tile_params


@pytest.fixture(scope='module')
def tiled(tmp_path_factory):
    """(tiling folder, {slide id: slide path}): the field scanned at 0.25 and 0.5 µm/px."""
    root = tmp_path_factory.mktemp('tissue_random')
    base = synthetic_base(0.25)
    import cv2
    half = cv2.resize(base, (base.shape[1] // 2, base.shape[0] // 2),
                      interpolation=cv2.INTER_AREA)
    paths = {'s40': write_pyramid(str(root / 's40.tif'), base, 0.25),
             's20': write_pyramid(str(root / 's20.tif'), half, 0.5)}
    out = str(root / 'tiled')
    tiling.tile_slides([tiling.SlideEntry(k, v) for k, v in paths.items()], tile_params(), out)
    return out, paths


def _config(out, **data_keys):
    cfg = data_config(out, mean=MEAN, std=STD, batch=4, size=32, epochs=3,
                      sampling='tissue_random', **data_keys)
    if 'patches_per_slide' not in cfg.data:
        cfg.data.patches_per_slide = 0
    return cfg


def _fraction(mask, ds, x, y, size0):
    """The square's tissue fraction on the mask, by slicing (the tiling's rounding)."""
    h, w = mask.shape
    x0, x1 = min(max(round(x / ds), 0), w), min(max(round((x + size0) / ds), 0), w)
    y0, y1 = min(max(round(y / ds), 0), h), min(max(round((y + size0) / ds), 0), h)
    x1, y1 = min(max(x1, x0 + 1), w), min(max(y1, y0 + 1), h)
    return mask[y0:y1, x0:x1].mean()


def test_positions_lie_on_tissue_and_change_every_epoch(tiled):
    out, paths = tiled
    sampler = data.create_train_loader(_config(out)).source
    assert isinstance(sampler, slide_sampler.SlideSampler)
    grid = data.create_train_loader(data_config(out, mean=MEAN, std=STD, batch=4)).source
    assert len(sampler) == len(grid)   # the grid's count per slide by default
    np.testing.assert_array_equal(np.bincount(sampler.slide_index),
                                  np.bincount(grid.slide_index))
    min_tissue = tile_params().min_tissue
    epochs = []
    for epoch in range(3):
        squares = [sampler.region(i, epoch, None) for i in range(len(sampler))]
        for s, x, y, size0, _ in squares:
            slide = sampler.base.slides[s]
            found = coords_lib.read_tissue(slide.coord_file)
            w, h = slide.coords.attrs['level0_width'], slide.coords.attrs['level0_height']
            assert 0 <= x <= w - size0 and 0 <= y <= h - size0
            fraction = _fraction(found.mask, found.downsample, x, y, size0)
            assert fraction >= min_tissue and fraction > 0, (slide.slide_id, x, y, fraction)
            if slide.slide_id == 's40':   # read from level 1: on its pixels (even x, y)
                assert x % 2 == 0 and y % 2 == 0
        epochs.append({(s, x, y) for s, x, y, _, _ in squares})
    for a in range(3):
        for b in range(a):
            assert len(epochs[a] & epochs[b]) < 0.1 * len(sampler)   # fresh every epoch
    # What is read is the drawn square, as OpenSlide reads it.
    for i in (0, len(sampler) - 1):
        s, x, y, size0, px = sampler.region(i, 2, None)
        np.testing.assert_array_equal(sampler.load_sample(i, 2, None),
                                      _openslide_patch(paths[sampler.base.slides[s].slide_id],
                                                       x, y, size0, px))


def _batches(loader, n, state=None):
    it = loader.iterator()
    try:
        if state is not None:
            it.set_state(state)
        return take(it, n)
    finally:
        it.close()


def test_same_for_0_and_2_workers_1_and_2_processes_and_resumed(tiled):
    """patches_per_slide 6 of 2 slides: 12 records, 3 batches of 4 an epoch; 7 batches
    cross two epoch boundaries. With data.mpps too (the centre of each fresh square)."""
    out, _ = tiled
    keys = dict(patches_per_slide=6, mpps=(0.5, 1.0), mpp_weights=(), cross_scale=False)
    loader = data.create_train_loader(_config(out, **keys))
    assert len(loader.source) == 12 and loader.steps_per_epoch == 3
    assert np.bincount(loader.source.slide_index).tolist() == [6, 6]
    serial = _batches(loader, 7)
    parallel = _batches(data.create_train_loader(_config(out, workers=2, **keys)), 7)
    assert same_views(serial, parallel)
    shares = [_batches(data.create_train_loader(_config(out, **keys), process_index=p,
                                                process_count=2), 7) for p in range(2)]
    for step in range(7):
        for k in ('view1', 'view2'):
            np.testing.assert_array_equal(
                np.concatenate([shares[0][step][k], shares[1][step][k]]), serial[step][k])
    it = data.create_train_loader(_config(out, **keys)).iterator()
    take(it, 4)   # mid-epoch 1
    state = it.get_state()
    it.close()
    resumed = _batches(data.create_train_loader(_config(out, **keys)), 3, state)
    assert same_views(resumed, serial[4:])
    # Another epoch, other positions: the same record's pixels differ.
    assert not np.array_equal(loader.source.load_sample(0, 0, None),
                              loader.source.load_sample(0, 1, None))


def test_tissue_random_on_patch_files_is_refused(tmp_path):
    write_patches(str(tmp_path / 'p'), 8)
    with pytest.raises(ConfigError, match=r'tissue_random .* is a folder or list of patch '
                                          r'files, which has no slides'):
        data.create_train_loader(_config(tmp_path / 'p'))


def test_a_tiling_without_stored_masks_is_refused_naming_the_slide(tiled, tmp_path):
    """A tiling made before masks were stored (the mask dataset dropped), and a CLAM file."""
    out, paths = tiled
    old = str(tmp_path / 'old')
    shutil.copytree(out, old)
    path = coords_lib.trident_file(old, 's20')
    with h5py.File(path, 'a') as f:
        del f[coords_lib.TISSUE_MASK]
    with pytest.raises(DataError, match=r'slide s20 .*tissue_random needs the tissue mask.*'
                                        r'tile again'):
        data.create_train_loader(_config(old))
    clam = tmp_path / 'clam' / 'patches'
    clam.mkdir(parents=True)
    with h5py.File(clam / 's20.h5', 'w') as f:
        ds = f.create_dataset('coords', data=np.array([[0, 0], [128, 128]], np.int64))
        ds.attrs.update(patch_level=0, patch_size=64, downsample=[1.0, 1.0])
    cfg = _config(tmp_path / 'clam', slide_dir=os.path.dirname(paths['s20']))
    cfg.train.batch_size = 2
    with pytest.raises(DataError, match=r'slide s20 .*CLAM/TRIDENT file.*tile again'):
        data.create_train_loader(cfg)
