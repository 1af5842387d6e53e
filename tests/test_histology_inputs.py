"""The histology input options as the training loader starts them: data.stain_norm fitted,
recorded and applied to every patch (and to the normalisation statistics), the same with 0
and 2 workers; augment.hed refused on grayscale data before anything compiles."""
import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from clusiam_jax import data
from clusiam_jax.data import stain_norm, stats
from clusiam_jax.errors import DataError
from tests.helpers import data_config, take, tissue_like


def write_folder(root, n, gray=False):
    for i in range(n):
        img = tissue_like(40, 40, seed=i)
        img[..., 0] = np.clip(img[..., 0].astype(int) + 60, 0, 255)   # a pinkish stain
        if gray:
            img = np.repeat(img.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)
        folder = root / f'slide_{i % 3}'
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f'{i}.png')
    return root


def with_augment(config, hed):
    config.augment = ml_collections.ConfigDict({'hed': hed})
    return config


def batches_equal(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in ('view1', 'view2'))


def test_stain_norm_is_fitted_recorded_applied_and_in_the_statistics(tmp_path):
    patches = write_folder(tmp_path / 'patches', 12)
    run = tmp_path / 'run'
    config = data_config(patches, stain_norm='reinhard')
    loader = data.create_train_loader(config, workdir=str(run))
    normalizer = loader.pair_maker().transform
    # recorded when the run starts for real (the loop, beside config.json), not by a start
    # that may still be refused
    assert isinstance(normalizer, stain_norm.StainNormalizer)
    assert not (run / stain_norm.TARGET_NAME).exists()
    stain_norm.record(str(run), normalizer)
    recorded = stain_norm.StainTarget.from_dict(
        json.loads((run / stain_norm.TARGET_NAME).read_text()))
    assert normalizer.target == recorded
    # the statistics are those of the normalised patches, computed independently here
    source = loader.source
    images = [normalizer(source.load(i)).reshape(-1, 3) / 255.0 for i in range(len(source))]
    pixels = np.concatenate(images)
    np.testing.assert_allclose(loader.mean, pixels.mean(0), atol=1e-6)
    np.testing.assert_allclose(loader.std, pixels.std(0), atol=1e-6)
    raw_mean, _ = stats.compute_stats(source)
    assert not np.allclose(loader.mean, raw_mean, atol=1e-3)
    assert 'stain normalisation (reinhard)' in loader.normalization_origin
    # every patch goes through it: a pair of the loader equals the augmentation of the
    # normalised patch, and 2 workers give the batches 0 workers give
    serial = take(loader.iterator(), 3)
    parallel = take(data.create_train_loader(
        data_config(patches, workers=2, stain_norm='reinhard'), workdir=str(run)).iterator(), 3)
    assert batches_equal(serial, parallel)
    plain = take(data.create_train_loader(
        data_config(patches, mean=tuple(loader.mean), std=tuple(loader.std))).iterator(), 3)
    assert not batches_equal(serial, plain)


def test_hed_on_grayscale_data_is_refused_at_start(tmp_path):
    gray = write_folder(tmp_path / 'gray', 6, gray=True)
    with pytest.raises(DataError, match='augment.hed jitters H&E stains; .* is grayscale'):
        data.create_train_loader(with_augment(data_config(gray), 0.05))
    data.create_train_loader(with_augment(data_config(gray), 0.0))   # off: no check
    colour = write_folder(tmp_path / 'colour', 6)
    data.create_train_loader(with_augment(data_config(colour), 0.05))


def test_the_monitor_sees_the_patches_training_sees(tmp_path):
    from clusiam_jax.data import sources
    from clusiam_jax.train import monitor
    from tests.helpers import tiny_config
    patches = write_folder(tmp_path / 'patches', 6)
    source = sources.open_source(str(patches))
    config = tiny_config(image_size=40)
    plain = monitor.build_monitor_set(source, range(6), config, 0)
    inverted = monitor.build_monitor_set(source, range(6), config, 0, lambda img: 255 - img)
    np.testing.assert_array_equal(inverted.images, 255 - plain.images)
