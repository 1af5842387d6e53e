"""Training at several resolutions (data.mpps, data.mpp_weights, data.cross_scale): each
sample's µm/px is drawn from (seed, epoch, position), the patch keeps its grid square's
centre and covers the tiling's patch_size px at that µm/px, read from the best pyramid level.

References: OpenSlide's own read of the level-0 square (resized as read_patch resizes), and
level 0 box-averaged by NumPy, which no pyramid level enters; 0 vs 2 workers, 1 vs 2
processes and a resumed iterator against an uninterrupted one.
"""
import os

import cv2
import numpy as np
import openslide
import pytest
import tifffile

from clusiam_jax import data
from clusiam_jax.data import augment, pipeline, slide_sampler
from clusiam_jax.errors import ConfigError, DataError
from clusiam_jax.slides import reader, tiling
from tests.helpers import (
    MEAN,
    STD,
    count_range_reads,
    data_config,
    same_views,
    take,
    within,
    write_patches,
    write_pyramid,
)
from tests.test_slides import synthetic_base, tile_params
from tests.test_storage_slides import slide_folder  # noqa: F401  (fixture)
from tests.test_storage_slides import tiled as bucket_tiling  # noqa: F401  (fixture)

LEVEL0_MPP = 0.25   # the scan; the tiling: 64 px at 0.5 µm/px = 128 level-0 px


@pytest.fixture(scope='module')
def scan(tmp_path_factory):
    """(slide path, level-0 RGB, tiling folder): a 0.25 µm/px scan with levels 1, 2, 4."""
    root = tmp_path_factory.mktemp('multi_mpp')
    rgb = synthetic_base(LEVEL0_MPP)
    path = write_pyramid(str(root / 'a.tif'), rgb, LEVEL0_MPP)
    out = str(root / 'tiled')
    tiling.tile_slides([tiling.SlideEntry('a', path)], tile_params(), out)
    return path, rgb, out


def _config(out, **data_keys):
    cfg = data_config(out, mean=MEAN, std=STD, batch=4, size=32, **data_keys)
    for key, value in dict(mpps=(), mpp_weights=(), cross_scale=False).items():
        if key not in cfg.data:
            cfg.data[key] = value
    return cfg


def _openslide_patch(path, x, y, size0, out):
    """The level-0 square read by OpenSlide at the coarsest level within size0 / out, over
    white, area-resized: read_patch's recipe, with OpenSlide's own levels and reads."""
    with openslide.OpenSlide(path) as slide:
        wanted = size0 / out
        level = max(i for i, ds in enumerate(slide.level_downsamples) if ds <= wanted * 1.01)
        side = int(round(size0 / slide.level_downsamples[level]))
        rgba = np.asarray(slide.read_region((x, y), level, (side, side))).astype(np.float64)
    rgb = rgba[..., :3] * rgba[..., 3:] / 255 + 255 * (1 - rgba[..., 3:] / 255)
    rgb = np.round(rgb).astype(np.uint8)
    return cv2.resize(rgb, (out, out), interpolation=cv2.INTER_AREA) if side != out else rgb


def _box(rgb, x, y, size0, factor):
    """Level 0 averaged over factor x factor blocks by NumPy (no pyramid level involved)."""
    block = rgb[y:y + size0, x:x + size0].astype(np.float64)
    n = size0 // factor
    return block.reshape(n, factor, n, factor, 3).mean(axis=(1, 3))


def test_a_patch_at_2_covers_4x_the_field_of_one_at_half_around_the_same_centre(scan):
    path, rgb, out = scan
    sampler = data.create_train_loader(_config(out, mpps=(0.5, 2.0))).source
    assert isinstance(sampler, slide_sampler.SlideSampler)
    h, w = rgb.shape[:2]
    xy = sampler.base._xy   # squares of 512 px around these lie inside the slide
    inner = [i for i in range(len(sampler))
             if 192 <= xy[i][0] <= w - 320 and 192 <= xy[i][1] <= h - 320]
    assert len(inner) >= 4
    for i in inner[:6]:
        s, x, y, size0, px = sampler.region(i, 0, 0.5)
        assert (size0, px) == (128, 64) and (x, y) == tuple(sampler.base._xy[i])
        fine = sampler.load_sample(i, 0, 0.5)
        np.testing.assert_array_equal(fine, sampler.base.load(i))   # the tiling's own
        _, cx, cy, coarse_size0, _ = sampler.region(i, 0, 2.0)
        assert coarse_size0 == 4 * 128   # 64 px at 2 µm/px over 0.25 µm/px level-0 pixels
        assert (cx + coarse_size0 / 2, cy + coarse_size0 / 2) == (x + 64, y + 64)   # centre
        coarse = sampler.load_sample(i, 0, 2.0)
        # OpenSlide's read of the same square and the same resize: the same bytes.
        np.testing.assert_array_equal(coarse, _openslide_patch(path, cx, cy, 512, 64))
        # Level 0 averaged over 8 x 8 blocks: the pyramid's level 2 (4 x 4 means, rounded
        # twice) then a 2 x 2 area resize round three times; each rounding moves a pixel
        # by at most half a level, so no pixel is more than 2 levels away.
        box = _box(rgb, cx, cy, 512, 8)
        assert np.abs(coarse - box).max() <= 2, np.abs(coarse - box).max()
        # The fine patch is the middle quarter of the field (16 of 64 px across).
        middle = coarse[24:40, 24:40].astype(np.float64)
        fine_small = _box(fine, 0, 0, 64, 4)
        assert np.abs(middle - fine_small).max() <= 3
        assert np.abs(middle - _box(rgb, x, y, 128, 8)).max() <= 2


def test_squares_reaching_outside_the_slide_are_white_there(scan):
    """read_patch reads a square over the slide's edge (coarse patches at the edge): the
    slide's pixels inside, background white outside, for direct and OpenSlide reads."""
    path, rgb, _ = scan
    h, w = rgb.shape[:2]
    for direct in (True, False):
        with reader.open_slide(path, direct=direct) as slide:
            for x, y in ((-100, -60), (w - 100, h - 40), (-30, h - 50)):
                got = reader.read_patch(slide, x, y, 256, 256)   # level 0, no resize
                want = np.full((256, 256, 3), 255, np.uint8)
                x0, y0 = max(x, 0), max(y, 0)
                x1, y1 = min(x + 256, w), min(y + 256, h)
                want[y0 - y:y1 - y, x0 - x:x1 - x] = rgb[y0:y1, x0:x1]
                np.testing.assert_array_equal(got, want)
                coarse = reader.read_patch(slide, x - 512, y - 512, 1024, 64)
                np.testing.assert_array_equal(coarse, _openslide_patch(path, x - 512, y - 512,
                                                                       1024, 64))
                assert (coarse[:4, :4] == 255).all() or (coarse[-4:, -4:] == 255).all()


def test_resolutions_follow_their_weights():
    weights = (0.6, 0.3, 0.1)
    scales = pipeline.Scales((0.5, 1.0, 2.0), weights)
    n = 6000
    draws = [scales.draw(3, epoch, pos) for epoch in range(3) for pos in range(n // 3)]
    assert all(a == b for a, b in draws)   # one µm/px for both views unless cross_scale
    got = [a for a, _ in draws]
    for mpp, p in zip(scales.mpps, weights):
        assert within(got.count(mpp) / n, p, n), (mpp, got.count(mpp) / n)
    cross = pipeline.Scales((0.5, 1.0, 2.0), weights, cross=True)
    pairs = [cross.draw(3, epoch, pos) for epoch in range(3) for pos in range(n // 3)]
    for view in (0, 1):   # each view alone follows the weights, independent of the other
        got = [pair[view] for pair in pairs]
        for mpp, p in zip(cross.mpps, weights):
            assert within(got.count(mpp) / n, p, n)
    same = sum(a == b for a, b in pairs) / n
    assert within(same, sum(p * p for p in weights), n)
    assert pipeline.Scales.from_config(_config('x', mpps=(0.5, 2.0),
                                               mpp_weights=(3, 1)).data).weights == (0.75, 0.25)
    assert pipeline.Scales.from_config(_config('x').data) is None


def _recording(sampler, monkeypatch):
    """Each load_sample's µm/px, and a flat image of a grey level that names it."""
    asked = []

    def load_sample(index, epoch, mpp):
        asked.append((index, epoch, mpp))
        return np.full((64, 64, 3), int(mpp * 100), np.uint8)
    monkeypatch.setattr(sampler, 'load_sample', load_sample)
    return asked


@pytest.mark.parametrize('cross', [False, True])
def test_views_share_a_resolution_unless_cross_scale(scan, monkeypatch, cross):
    _, _, out = scan
    cfg = _config(out, mpps=(0.5, 1.0, 2.0), cross_scale=cross, augment_on_device=True)
    loader = data.create_train_loader(cfg)
    asked = _recording(loader.source, monkeypatch)
    pm = loader.pair_maker()
    elements = 3 * loader.plan.local_batch * loader.steps_per_epoch
    differ = 0
    for k in range(elements):
        start = len(asked)
        pair = pm(k)
        epoch, pos, index = pm.record_index(k)
        want = loader.scales.draw(0, epoch, pos)
        reads = asked[start:]
        assert [r[2] for r in reads] == list(dict.fromkeys(want))   # one read per µm/px
        assert all(r[:2] == (index, epoch) for r in reads)
        # Crops only (augment_on_device): each view's grey level is its image's µm/px.
        assert int(pair['view1'][0, 0, 0]) == int(want[0] * 100)
        assert int(pair['view2'][0, 0, 0]) == int(want[1] * 100)
        differ += want[0] != want[1]
    assert (differ > 0) == cross


def _batches(loader, n):
    it = loader.iterator()
    try:
        return take(it, n)
    finally:
        it.close()


def test_no_mpps_is_the_grid_stream_and_the_own_mpp_reads_the_same_pixels(scan):
    """mpps=() is the paper's stream: element (epoch, pos) is the permutation's record read
    as tiled, augmented with its own stream. data.mpps=(the tiling's µm/px,) reads the same
    squares and draws the augmentation from the same stream: the same bytes."""
    _, _, out = scan
    plain = data.create_train_loader(_config(out))
    got = _batches(plain, 3)
    own = _batches(data.create_train_loader(_config(out, mpps=(0.5,))), 3)
    assert same_views(got, own)
    pm = plain.pair_maker()
    for step, batch in enumerate(got):
        for slot in range(plain.plan.local_batch):
            epoch, pos, index = pm.record_index(step * plain.plan.local_batch + slot)
            rng = np.random.default_rng([0, epoch, pos, pipeline._AUGMENT])
            views = augment.two_views(plain.source.load(index), rng, plain.aug)
            np.testing.assert_array_equal(batch['view1'][slot], views[0])
            np.testing.assert_array_equal(batch['view2'][slot], views[1])


def test_batches_same_for_0_and_2_workers_1_and_2_processes_and_resumed(scan):
    _, _, out = scan
    keys = dict(mpps=(0.5, 1.0, 2.0), mpp_weights=(1, 1, 2), cross_scale=True)
    serial = _batches(data.create_train_loader(_config(out, **keys)), 4)
    parallel = _batches(data.create_train_loader(_config(out, workers=2, **keys)), 4)
    assert same_views(serial, parallel)
    shares = [_batches(data.create_train_loader(_config(out, **keys), process_index=p,
                                                process_count=2), 4) for p in range(2)]
    for step in range(4):
        for k in ('view1', 'view2'):
            np.testing.assert_array_equal(
                np.concatenate([shares[0][step][k], shares[1][step][k]]), serial[step][k])
    it = data.create_train_loader(_config(out, **keys)).iterator()
    take(it, 1)
    state = it.get_state()
    it.close()
    again = data.create_train_loader(_config(out, **keys)).iterator()
    again.set_state(state)
    assert same_views(take(again, 3), serial[1:])
    again.close()


def test_a_resolution_finer_than_level_0_is_refused_naming_the_slide(scan):
    _, _, out = scan
    with pytest.raises(DataError, match=r'slide a .*data.mpps 0.1 µm/px is finer .*level 0: '
                                        r'0.25 µm/px'):
        data.create_train_loader(_config(out, mpps=(0.1, 0.5)))
    # Within 1% of level 0 is read from level 0; coarser than the last level is fine.
    loader = data.create_train_loader(_config(out, mpps=(0.248, 16.0)))
    patch = loader.source.load_sample(0, 0, 16.0)   # 4096 level-0 px: past the slide
    assert patch.shape == (64, 64, 3)


def test_mpps_on_patch_files_are_refused(tmp_path):
    write_patches(str(tmp_path / 'p'), 8)
    with pytest.raises(ConfigError, match=r'data.mpps .* is a folder or list of patch files'):
        data.create_train_loader(_config(tmp_path / 'p', mpps=(0.5, 1.0)))


def test_a_slide_of_unknown_resolution_is_refused_naming_it(scan, tmp_path):
    """A CLAM folder (no level0_mpp recorded) over a TIFF without resolution tags."""
    import h5py
    _, rgb, _ = scan
    slides = tmp_path / 'wsi'
    slides.mkdir()
    tifffile.imwrite(str(slides / 'nompp.tif'), rgb[:512, :512], tile=(128, 128),
                     photometric='rgb')
    with openslide.OpenSlide(str(slides / 'nompp.tif')) as s:
        assert 'openslide.mpp-x' not in s.properties
    patches = tmp_path / 'job' / 'patches'
    patches.mkdir(parents=True)
    with h5py.File(patches / 'nompp.h5', 'w') as f:
        ds = f.create_dataset('coords', data=np.array([[0, 0], [128, 128]], np.int64))
        ds.attrs.update(patch_level=0, patch_size=64, downsample=[1.0, 1.0])
    cfg = _config(tmp_path / 'job', slide_dir=str(slides), mpps=(0.5, 1.0))
    cfg.train.batch_size = 2
    with pytest.raises(DataError, match=r'slide nompp .*level-0 µm/px.*no µm/px'):
        data.create_train_loader(cfg)
    assert os.path.isfile(slides / 'nompp.tif')


def test_read_ahead_reads_what_each_drawn_sample_reads(bucket_tiling, tmp_path,  # noqa: F811
                                                       monkeypatch):
    """Slides in a bucket: the next batch's samples (their drawn µm/px, their epoch's fresh
    position) are fetched before they are asked for, so reading them makes no request; the
    pixels are those of the slides on local disk."""
    out, local = bucket_tiling
    reads = count_range_reads(monkeypatch)
    keys = dict(mpps=(1.0, 2.0), cross_scale=True, sampling='tissue_random')
    loader = data.create_train_loader(_config(out, cache_dir=str(tmp_path / 'c'), **keys))
    on_disk = data.create_train_loader(_config(out, slide_dir=local, **keys))
    pm, reference = loader.pair_maker(), on_disk.pair_maker()
    sampler, b = loader.source, loader.plan.local_batch
    by_range = {i for i, s in enumerate(sampler.base.slides) if s.slide_id == 'c'}

    def ranged(k):   # c's levels are all read by byte ranges
        return int(sampler.slide_index[pm.record_index(k)[2]]) in by_range

    warmed = []
    warm = sampler.base._warm

    def recorded(region):
        warmed.append(region)
        warm(region)
    monkeypatch.setattr(sampler.base, '_warm', recorded)
    last = next(k for k in range(b - 1, 40 * b, b) if any(ranged(j) for j in range(k + 1,
                                                                                  k + 1 + b)))
    for s in np.unique(sampler.slide_index):   # a worker past its first sample of each slide
        sampler.region(int(np.argmax(sampler.slide_index == s)), 0, None)
    got = pm(last)
    sampler.base._pool.shutdown(wait=True)
    fetched = len(reads)
    for k in range(last + 1, last + 1 + b):
        epoch, pos, index = pm.record_index(k)
        for mpp in set(loader.scales.draw(0, epoch, pos)):
            assert sampler.region(index, epoch, mpp) in warmed   # what the read reads
            if ranged(k):
                sampler.load_sample(index, epoch, mpp)
    assert len(reads) == fetched, 'the next batch was not read ahead'
    sampler.base._pool = None
    for k in [last] + list(range(last + 1, last + 1 + b)):
        got, want = pm(k), reference(k)
        for key in ('view1', 'view2'):
            np.testing.assert_array_equal(got[key], want[key])
    loader.close()


# ------------------------------------------- the transform slot, the read-ahead threads

class _Paint:
    """A picklable transform: the patch painted one grey level, its shape kept."""

    def __init__(self, level):
        self.level = level

    def __call__(self, img):
        assert img.dtype == np.uint8 and img.shape == (64, 64, 3)   # the loaded patch
        return np.full_like(img, self.level)


@pytest.mark.parametrize('keys', [{}, dict(mpps=(0.5, 2.0), cross_scale=True)])
def test_the_transform_sees_every_loaded_patch_before_the_augmentation(scan, keys):
    _, _, out = scan
    loader = data.create_train_loader(_config(out, augment_on_device=True, **keys))
    loader.transform = _Paint(77)
    for batch in _batches(loader, 2):   # crops of a flat image: flat
        assert (batch['view1'] == 77).all() and (batch['view2'] == 77).all()


def test_the_transform_travels_to_the_workers(scan):
    _, _, out = scan
    loader = data.create_train_loader(_config(out, workers=2, augment_on_device=True),
                                      transform=_Paint(9))
    assert all((b['view1'] == 9).all() for b in _batches(loader, 2))


def test_read_ahead_threads_never_hold_up_the_exit_and_stop_when_closed(monkeypatch):
    import subprocess
    import sys
    import threading
    import time

    from clusiam_jax.data import read_ahead
    from tests.helpers import subprocess_env
    code = ('import time\nfrom clusiam_jax.data.read_ahead import DaemonPool\n'
            'pool = DaemonPool(2, "t")\nfor _ in range(6):\n    pool.submit(time.sleep, 120)\n'
            'time.sleep(0.5)\nprint("done")\n')
    start = time.monotonic()
    done = subprocess.run([sys.executable, '-c', code], env=subprocess_env(), timeout=60,
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == 'done', done.stderr
    assert time.monotonic() - start < 60   # not after the two sleeps under way

    release = threading.Event()
    pool = read_ahead.DaemonPool(2, 'test')
    ran = []
    for i in range(5):
        pool.submit(lambda i=i: (release.wait(30), ran.append(i)))
    time.sleep(0.2)
    threads = list(pool._threads)
    assert len(threads) == 2
    assert pool.shutdown(wait=False) == 3   # the queued calls dropped, none awaited
    assert not pool.submit(ran.append, 'late')
    release.set()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert sorted(ran) == [0, 1]
    monkeypatch.setattr(read_ahead, 'IDLE_SECONDS', 0.1)   # idle threads end by themselves
    idle = read_ahead.DaemonPool(2, 'idle')
    idle.submit(ran.append, 2)
    time.sleep(0.5)
    assert ran[-1] == 2 and not idle._threads
