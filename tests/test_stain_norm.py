"""Stain normalisation (data/stain_norm.py) against references it does not compute itself:
images built by Beer-Lambert from known stain vectors and concentrations, LAB statistics
measured here with OpenCV and a NumPy saturation rule, and a real H&E region read by
OpenSlide."""
import json
import os
import pickle

import cv2
import ml_collections
import numpy as np
import pytest

from clusiam_jax.data import image_io, stain_norm
from clusiam_jax.errors import ConfigError, DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLIDE = os.path.join(REPO, 'clusiam_jax', 'demo_data', 'cmu-1-small-region.svs')

# Unit OD vectors (R, G, B) of haematoxylin and eosin: Ruifrok & Johnston's haematoxylin
# with an eosin that absorbs some red, as scanned slides show (Macenko's beta drops pixels
# under 0.15 in any channel, so a pure eosin without red would never be seen), and a second
# pair of the kind another lab's staining gives.
STAINS_A = np.array([[0.65, 0.70, 0.29], [0.22, 0.80, 0.56]])
STAINS_B = np.array([[0.49, 0.77, 0.41], [0.30, 0.90, 0.32]])
STAINS_A /= np.linalg.norm(STAINS_A, axis=1, keepdims=True)
STAINS_B /= np.linalg.norm(STAINS_B, axis=1, keepdims=True)


def concentrations(h=96, w=96, seed=0):
    """float [H*W, 2]: H and E amounts, one tenth of the pixels pure H and one tenth pure
    E (the extremes Macenko's percentile angles find), none transparent."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.4, 1.6, (h * w, 2))
    pure = rng.permutation(h * w)
    c[pure[: h * w // 5]] = rng.uniform(0.8, 1.6, (h * w // 5, 2))
    c[pure[: h * w // 10], 1] = 0.0
    c[pure[h * w // 10: h * w // 5], 0] = 0.0
    return c


def beer_lambert(c, stains, shape=(96, 96)):
    """uint8 RGB of concentrations c [N, 2] through stains [2, 3] (the module's Io = 255)."""
    od = c @ stains
    return np.clip(np.rint(256.0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8).reshape(
        *shape, 3)


def lab_stats(img, mask):
    lab = cv2.cvtColor(img.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)[mask].astype(np.float64)
    return lab.mean(axis=0), lab.std(axis=0)


def saturated(img, over=15):
    """OpenCV's HSV saturation > `over` and value > 30, written out in NumPy."""
    top, bottom = img.max(axis=2).astype(float), img.min(axis=2).astype(float)
    return ((top - bottom) * 255 > over * np.maximum(top, 1)) & (top > 30)


def slide_region(x, y, size=224):
    openslide = pytest.importorskip('openslide')
    with openslide.OpenSlide(SLIDE) as slide:
        return np.asarray(slide.read_region((x, y), 0, (size, size)).convert('RGB'))


def background(seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(240 + rng.normal(0, 3, (64, 64, 3)), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ Macenko

def test_macenko_recovers_the_stain_vectors_an_image_was_made_with():
    target = stain_norm.fit('macenko', [beer_lambert(concentrations(), STAINS_A)])
    found = np.asarray(target.stains)
    cosines = (found * STAINS_A).sum(axis=1)   # haematoxylin first, both unit vectors
    assert cosines.min() > 0.99, cosines
    # and the 99th-percentile concentrations, up to the uint8 rounding
    np.testing.assert_allclose(target.max_concentrations,
                               np.percentile(concentrations(), 99, axis=0), rtol=0.03)


def test_macenko_maps_another_labs_staining_onto_the_target():
    c = concentrations(seed=1)
    reference = beer_lambert(concentrations(seed=2), STAINS_A)   # other tissue, same stains
    original = beer_lambert(c, STAINS_A)
    other_lab = beer_lambert(0.8 * c, STAINS_B)                 # other dyes, paler
    normalise = stain_norm.StainNormalizer(stain_norm.fit('macenko', [reference]))
    out = normalise(other_lab).astype(int)
    before = np.abs(other_lab.astype(int) - original).mean()
    after = np.abs(out - original)
    assert after.mean() < 2.0 and np.percentile(after, 99) <= 8, (after.mean(), before)
    assert before > 10 * after.mean()


# ------------------------------------------------------------------------------ Reinhard

def test_reinhard_output_has_the_targets_lab_statistics():
    reference = beer_lambert(concentrations(seed=3), STAINS_A)
    source = beer_lambert(0.7 * concentrations(seed=4), STAINS_B)
    assert saturated(reference).all() and saturated(source).all()   # tissue through and through
    target = stain_norm.fit('reinhard', [reference])
    mean, std = lab_stats(reference, saturated(reference))
    np.testing.assert_allclose(target.mean, mean, atol=1e-3)
    np.testing.assert_allclose(target.std, std, rtol=1e-3)
    out = stain_norm.StainNormalizer(target)(source)
    out_mean, out_std = lab_stats(out, saturated(source))
    before_mean, _ = lab_stats(source, saturated(source))
    assert np.abs(before_mean - mean).max() > 5
    np.testing.assert_allclose(out_mean, mean, atol=0.5)
    np.testing.assert_allclose(out_std, std, rtol=0.03, atol=0.2)


def test_reinhard_fit_pools_the_tissue_of_all_images_and_skips_background():
    a = beer_lambert(concentrations(seed=5), STAINS_A)
    b = beer_lambert(0.5 * concentrations(seed=6), STAINS_B)
    half = np.concatenate([b, background()[:, :32].repeat(3, axis=0)[:96]], axis=1)
    target = stain_norm.fit('reinhard', [a, half])
    both = np.concatenate([a.reshape(-1, 3), half.reshape(-1, 3)])[None]
    mean, std = lab_stats(both, saturated(both))
    np.testing.assert_allclose(target.mean, mean, atol=1e-3)
    np.testing.assert_allclose(target.std, std, rtol=1e-3)
    tissue = a.shape[0] * a.shape[1] + b.shape[0] * b.shape[1]
    assert target.pixels == saturated(both).sum() and 0 <= target.pixels - tissue < 0.001 * tissue


# ------------------------------------------------------------------------------ both

@pytest.mark.parametrize('kind', stain_norm.KINDS)
def test_background_and_specks_pass_unchanged(kind):
    normalise = stain_norm.StainNormalizer(
        stain_norm.fit(kind, [beer_lambert(concentrations(), STAINS_A)]))
    white, grey = background(), np.full((64, 64, 3), 128, np.uint8)
    speck = background(1)
    speck[:3, :3] = beer_lambert(concentrations(3, 3), STAINS_B, (3, 3))   # 9 of 4096 pixels
    for img in (white, grey, speck, np.full((64, 64, 3), 255, np.uint8)):
        assert np.array_equal(normalise(img), img)
    # one flat colour: no two stains (Macenko leaves it), no spread (Reinhard only shifts it)
    pink = np.full((64, 64, 3), (200, 120, 180), np.uint8)
    out = normalise(pink)
    assert out.dtype == np.uint8 and len(np.unique(out.reshape(-1, 3), axis=0)) == 1
    assert np.array_equal(out, pink) == (kind == 'macenko')
    with pytest.raises(DataError, match='no tissue'):
        stain_norm.fit(kind, [white, grey])


@pytest.mark.parametrize('kind', stain_norm.KINDS)
def test_deterministic_and_picklable(kind):
    images = [beer_lambert(concentrations(seed=s), STAINS_A) for s in (7, 8)]
    target = stain_norm.fit(kind, images)
    assert stain_norm.fit(kind, images) == target
    assert stain_norm.StainTarget.from_json(target.to_json()) == target
    normalise = stain_norm.StainNormalizer(target)
    img = beer_lambert(concentrations(seed=9), STAINS_B)
    out = normalise(img)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert np.array_equal(normalise(img), out)
    assert np.array_equal(pickle.loads(pickle.dumps(normalise))(img), out)


@pytest.mark.parametrize('kind', stain_norm.KINDS)
def test_a_real_he_region_stays_a_plausible_image(kind):
    reference, patch = slide_region(1120, 896), slide_region(896, 1792)   # both mostly tissue
    mixed = slide_region(1792, 896)                                      # mostly glass
    normalise = stain_norm.StainNormalizer(stain_norm.fit(kind, [reference]))
    for img in (patch, mixed):
        out = normalise(img)
        assert out.shape == img.shape and out.dtype == np.uint8
        # clearly stained pixels stay tissue (pale ones near the threshold may cross it)
        stained = saturated(img, over=30)
        assert (stained & saturated(out)).sum() > 0.95 * stained.sum()
    # glass more than 5 px from tissue stays glass (nearer, the normalisation fades out)
    glass = cv2.erode((~saturated(mixed) & (mixed.min(axis=2) > 200)).astype(np.uint8),
                      np.ones((11, 11), np.uint8)).astype(bool)
    assert glass.sum() > 0.5 * glass.size
    change = np.abs(normalise(mixed)[glass].astype(int) - mixed[glass]).max(axis=1)
    assert np.percentile(change, 99) <= 1
    # the patch moves towards the reference: its tissue's colour (Reinhard), its stain
    # vectors (Macenko's own estimate: what it matches, not the mean colour)
    if kind == 'reinhard':
        ref_mean, _ = lab_stats(reference, saturated(reference))
        before, _ = lab_stats(patch, saturated(patch))
        after, _ = lab_stats(normalise(patch), saturated(patch))
        assert np.linalg.norm(after - ref_mean) < 0.5 * np.linalg.norm(before - ref_mean)
    else:
        stains = lambda img: np.asarray(stain_norm.fit('macenko', [img]).stains)
        angle = lambda img: np.arccos(np.clip((stains(img) * stains(reference)).sum(1), -1, 1))
        assert (angle(normalise(patch)) < 0.5 * angle(patch)).all()


# ------------------------------------------------------------------------------ prepare

class Patches:
    """A PatchSource of in-memory patches: load() counts its reads."""

    def __init__(self, images):
        self.images, self.loads = images, []

    def __len__(self):
        return len(self.images)

    def load(self, i):
        self.loads.append(i)
        if self.images[i] is None:
            raise image_io.BadImageError('corrupt')
        return self.images[i]

    def path(self, i):
        return f'patch{i}.png'


def config(kind, reference=''):
    return ml_collections.ConfigDict(
        {'data': {'stain_norm': kind, 'stain_reference': reference}})


def save_png(path, img):
    cv2.imwrite(str(path), img[:, :, ::-1])
    return str(path)


def test_prepare_off_fits_on_a_sample_records_and_reads_back(tmp_path):
    assert stain_norm.prepare(config(''), str(tmp_path), None) is None
    images = [beer_lambert(concentrations(32, 32, seed=s), STAINS_A, (32, 32))
              for s in range(100)]
    images[3] = None                                   # an unreadable patch is skipped
    source = Patches(images)
    first = stain_norm.prepare(config('macenko'), str(tmp_path), source)
    sample = sorted(source.loads)
    assert len(sample) == stain_norm.SAMPLE_SIZE == len(set(sample))
    recorded = tmp_path / stain_norm.TARGET_NAME
    assert stain_norm.StainTarget.from_dict(json.loads(recorded.read_text())) == first.target
    assert [p.name for p in tmp_path.iterdir()] == [stain_norm.TARGET_NAME]   # atomic: no temp
    # the same sample again (deterministic), without a work directory nothing is written
    again = Patches(images)
    assert stain_norm.prepare(config('macenko'), None, again).target == first.target
    assert sorted(again.loads) == sample
    # a resumed run reads the record: no patch loaded, a reference is not read
    source.loads.clear()
    resumed = stain_norm.prepare(config('macenko', str(tmp_path / 'missing.png')),
                                 str(tmp_path), source)
    assert resumed.target == first.target and not source.loads
    with pytest.raises(ConfigError, match='records the macenko stain target'):
        stain_norm.prepare(config('reinhard'), str(tmp_path), source)


def test_prepare_fits_on_the_reference_and_refuses_bad_input(tmp_path):
    reference = beer_lambert(concentrations(seed=11), STAINS_B)
    path = save_png(tmp_path / 'ref.png', reference)
    workdir = tmp_path / 'run'
    got = stain_norm.prepare(config('reinhard', path), str(workdir), Patches([]))
    assert got.target == stain_norm.fit('reinhard', [reference], got.target.fitted_on)
    assert path in got.target.fitted_on
    assert stain_norm.read_target(str(workdir / stain_norm.TARGET_NAME)) == got.target
    bad = tmp_path / 'bad.png'
    bad.write_bytes(b'not an image')
    for ref, message in ((str(bad), 'is not a readable image'),
                         (str(tmp_path / 'none.png'), 'No such file'),
                         (save_png(tmp_path / 'white.png', background()), 'no tissue')):
        with pytest.raises(DataError, match=message) as e:
            stain_norm.prepare(config('macenko', ref), None, None)
        assert '\n' not in str(e.value) and ref in str(e.value)
    with pytest.raises(DataError, match='no tissue'):
        stain_norm.prepare(config('macenko'), None, Patches([background(s) for s in range(5)]))
    with pytest.raises(DataError, match='no stain target recorded'):
        stain_norm.prepare(config('macenko'), str(tmp_path / 'export'), None)
    recorded = workdir / stain_norm.TARGET_NAME
    changed = dict(json.loads(recorded.read_text()), parameters={'min_saturation': 10})
    recorded.write_text(json.dumps(changed))
    with pytest.raises(DataError, match='was fitted with'):
        stain_norm.prepare(config('reinhard'), str(workdir), None)
    recorded.write_text('{"kind": "reinhard", "mean": [1, 2]}')
    with pytest.raises(DataError, match='is not a stain target'):
        stain_norm.prepare(config('reinhard'), str(workdir), None)


def test_prepare_records_in_a_bucket_work_directory(bucket, objstore, tmp_path):
    path = save_png(tmp_path / 'ref.png', beer_lambert(concentrations(seed=12), STAINS_A))
    objstore.fs(bucket.split('://')[0]).put(path, f'{bucket}/refs/ref.png'.split('://')[1])
    workdir = f'{bucket}/runs/a'
    first = stain_norm.prepare(config('macenko', f'{bucket}/refs/ref.png'), workdir, None)
    assert stain_norm.TARGET_NAME in objstore.keys(workdir)
    assert stain_norm.prepare(config('macenko'), workdir, None).target == first.target
