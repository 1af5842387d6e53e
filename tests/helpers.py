"""What the tests share: tiny configs, a synthetic loader, image and data helpers.

Tiny configs run every code path of the real recipes at a fraction of the compute. The
synthetic loader stands in for the data pipeline with the interface the loop uses;
its batches are a pure function of (seed, batch index), so runs are reproducible and a
restored iterator state continues with exactly the batch an uninterrupted run would see.
"""
import math
import os
import signal

import jax
import ml_collections
import numpy as np
from PIL import Image

from clusiam_jax import parallel
from clusiam_jax.config import method_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRCHP = os.path.join(REPO, '..', 'shared', 'data', 'crchp')
# Normalization of the data-pipeline tests (any valid values).
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def tiny_config(method='clusiam', batch_size=8, image_size=32, num_epochs=2):
    c = method_config(method)
    c.model.backbone = 'resnet_tiny'
    c.model.feat_size = 16
    c.model.pred_hidden = 32
    c.model.num_clusters = 8
    c.data.image_size = image_size
    c.train.batch_size = batch_size
    c.train.num_epochs = num_epochs
    c.train.log_every_steps = 1
    c.train.checkpoint_every_epochs = 1
    return c


def mesh_of(n):
    """A mesh of the first n (simulated) devices."""
    return parallel.make_mesh(jax.devices()[:n])


# ------------------------------------------------------------------ synthetic loader

class SyntheticIterator:
    def __init__(self, loader):
        self.loader, self.index = loader, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.index >= self.loader.steps_per_epoch * self.loader.num_epochs:
            raise StopIteration
        rng = np.random.default_rng([self.loader.seed, self.index])
        shape = (self.loader.batch_size, self.loader.image_size, self.loader.image_size, 3)
        self.index += 1
        local = self.loader.batch_size // self.loader.process_count
        share = slice(self.loader.process_index * local, (self.loader.process_index + 1) * local)
        return {'view1': rng.integers(0, 256, shape, dtype=np.uint8)[share],
                'view2': rng.integers(0, 256, shape, dtype=np.uint8)[share]}

    def get_state(self):
        return {'index': self.index}

    def set_state(self, state):
        self.index = int(state['index'])


class SyntheticLoader:
    mean = (0.6684, 0.5115, 0.6791)
    std = (0.2521, 0.2875, 0.2100)
    normalization_origin = 'synthetic'

    def __init__(self, steps_per_epoch, num_epochs, batch_size, image_size, seed=0,
                 process_index=0, process_count=1):
        self.steps_per_epoch, self.num_epochs = steps_per_epoch, num_epochs
        self.batch_size, self.image_size, self.seed = batch_size, image_size, seed
        self.num_records = steps_per_epoch * batch_size
        # Multi-host: each process yields its contiguous share of every global batch.
        self.process_index, self.process_count = process_index, process_count

    def iterator(self):
        return SyntheticIterator(self)


class PreemptedIterator(SyntheticIterator):
    """Sends this process `signum` when batch `at` is drawn, as a scheduler (SIGTERM) or
    a person (SIGINT) would."""

    def __init__(self, loader, at, signum):
        super().__init__(loader)
        self.at, self.signum = at, signum

    def __next__(self):
        if self.index == self.at:
            os.kill(os.getpid(), self.signum)
        return super().__next__()


class PreemptedLoader(SyntheticLoader):
    def __init__(self, at, signum=signal.SIGTERM, **kwargs):
        super().__init__(**kwargs)
        self.at, self.signum = at, signum

    def iterator(self):
        return PreemptedIterator(self, self.at, self.signum)


# ------------------------------------------------------------------- images, data

def tissue_like(h=48, w=56, seed=0):
    """A smooth, colourful image (not pure noise), like a stained patch."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC)).astype(np.int16)
    img += rng.integers(-12, 13, img.shape).astype(np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def within(p_hat, p, n, sigmas=5.0):
    """Whether a frequency p_hat over n draws is within `sigmas` standard errors of p."""
    return abs(p_hat - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def data_config(path, batch=4, epochs=2, seed=0, workers=0, size=24, mean=None, std=None,
                **data_keys):
    """The config sections the data pipeline reads (other `data` keys: their defaults)."""
    c = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict(dict(
        path=str(path), image_size=size, num_workers=workers, prefetch=2,
        vflip=False, rot90=False, augment_on_device=False, slide_dir='', sampling='uniform',
        min_tissue=0.0, stats_sample=4096, open_slides=512))
    for key, value in data_keys.items():
        c.data[key] = value
    c.data.mean = ml_collections.FieldReference(mean, field_type=tuple)
    c.data.std = ml_collections.FieldReference(std, field_type=tuple)
    c.train = ml_collections.ConfigDict(dict(batch_size=batch, num_epochs=epochs, seed=seed))
    return c


def write_patches(root, n, size=32, seed=0):
    """n small smooth RGB PNGs in the original layout; returns their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        d = os.path.join(root, f'class_{i % 2}', f'slide_{i % 3}')
        os.makedirs(d, exist_ok=True)
        low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((size, size), Image.BILINEAR)
        path = os.path.join(d, f'{i * 32}_{i * 64}.png')
        img.save(path)
        paths.append(path)
    return paths


def same_views(a, b):
    """Two lists of batches hold the same views, batch for batch."""
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True)
               for k in ('view1', 'view2'))


def count_range_reads(monkeypatch):
    """A list that gets, per storage.read_ranges call, how many ranges it asked for."""
    from clusiam_jax import storage
    reads = []
    real = storage.read_ranges

    def counted(path, ranges):
        reads.append(len(ranges))
        return real(path, ranges)
    monkeypatch.setattr(storage, 'read_ranges', counted)
    return reads


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
        np.testing.assert_array_equal(x, y)


def assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
        np.testing.assert_allclose(x, y, **tol)


def as_from_a_terminal():
    """`preexec_fn` for a child the test will send SIGINT: Ctrl-C's default action, as in
    a terminal. A test run started as a shell script's background job inherits SIGINT
    ignored, and the command line keeps an ignored SIGINT ignored, as Python does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def subprocess_env(**extra):
    """The environment for a test's child Python process: the repo importable."""
    env = dict(os.environ, **extra)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p)
    return env


# ------------------------------------------------------------------ synthetic slides

def synthetic_tissue(height, width, blobs, seed=0):
    """A slide-like RGB image: near-white glass with stained discs (cx, cy, r in px)."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 240, np.uint8)
    img += rng.integers(0, 6, img.shape, dtype=np.uint8)
    texture = tissue_like(height, width, seed=seed + 1).astype(np.float32)
    stain = np.array([190, 80, 160], np.float32)
    yy, xx = np.mgrid[:height, :width]
    for cx, cy, r in blobs:
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        img[inside] = np.clip(0.55 * stain + 0.45 * texture[inside], 0, 255).astype(np.uint8)
    return img


def _halvings(rgb, min_side):
    """rgb, then each level area-averaged by 2 from the one before, until a side would
    drop below `min_side`."""
    import cv2
    level = rgb
    while True:
        yield level
        if min(level.shape[:2]) // 2 < min_side:
            return
        level = cv2.resize(level, (level.shape[1] // 2, level.shape[0] // 2),
                           interpolation=cv2.INTER_AREA)


def write_pyramid(path, rgb, mpp, tile=128, min_side=200):
    """A tiled pyramidal TIFF OpenSlide reads as generic-tiff with openslide.mpp-x: level
    k is level k-1 area-averaged by 2, until a side would drop below `min_side`."""
    import tifffile
    with tifffile.TiffWriter(path) as tw:
        for k, level in enumerate(_halvings(rgb, min_side)):
            res = 1e4 / (mpp * 2 ** k)   # pixels per centimetre
            tw.write(level, tile=(tile, tile), compression='zlib', photometric='rgb',
                     resolution=(res, res), resolutionunit='CENTIMETER',
                     subfiletype=0 if k == 0 else 1)
    return path


def write_ome_pyramid(path, rgb, mpp, tile=128, min_side=200):
    """The same levels as write_pyramid, as an OME-TIFF keeping the reduced levels in
    SubIFDs (as QuPath and bfconvert write them): OpenSlide sees level 0 only."""
    import tifffile
    levels = list(_halvings(rgb, min_side))
    res = 1e4 / mpp
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, tile=(tile, tile), compression='zlib',
                 photometric='rgb', resolution=(res, res), resolutionunit='CENTIMETER',
                 metadata={'PhysicalSizeX': mpp, 'PhysicalSizeY': mpp})
        for level in levels[1:]:
            tw.write(level, tile=(tile, tile), compression='zlib', photometric='rgb',
                     subfiletype=1)
    return path
