"""On-device augmentation (data.augment_on_device): parameter distributions, each op
against the CPU path's ops for the same parameters, the train step and the loader."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from clusiam_jax import data, parallel
from clusiam_jax.config import validate
from clusiam_jax.data import augment, pipeline
from clusiam_jax.errors import ConfigError
from clusiam_jax.train import device_augment as da
from clusiam_jax.train.trainer import build_trainer
from tests.helpers import (
    MEAN,
    STD,
    SyntheticLoader,
    data_config,
    mesh_of,
    take,
    tiny_config,
    tissue_like,
    within,
    write_patches,
)

CFG = augment.AugmentConfig(image_size=32)
N_DRAWS = 20000


def _he_like(h=40, w=40, seed=0):
    """Pink (eosin) to purple (haematoxylin) with noise: typical H&E colours."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1), dtype=np.uint8)
    t = np.asarray(Image.fromarray(t).resize((w, h), Image.BICUBIC), np.float32)[..., None] / 255
    img = np.float32([230, 150, 200]) * (1 - t) + np.float32([120, 60, 160]) * t
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def _levels(x):
    """Device output (float [0, 1], batch of one) in uint8 levels."""
    return np.asarray(x[0], np.float64) * 255.0


def _dev(img):
    return jnp.asarray(img[None], jnp.float32) / 255.0


def _f(v):
    return jnp.asarray([v], jnp.float32)


# ---------------------------------------------------------------------------
# (a) parameter distributions
# ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def params():
    return jax.device_get(jax.jit(da.sample_device_params, static_argnums=(1, 2))(
        jax.random.PRNGKey(0), N_DRAWS, CFG))


def test_op_probabilities_match_spec(params):
    for name, p in (('jitter', 0.8), ('gray', 0.2), ('blur', 0.5), ('hflip', 0.5)):
        assert params[name].shape == (N_DRAWS,) and params[name].dtype == bool
        assert within(params[name].mean(), p, N_DRAWS), (name, params[name].mean())
    # Independent of each other (docs/method.md §1: each op drawn on its own).
    both = (params['jitter'] & params['gray']).mean()
    assert within(both, 0.8 * 0.2, N_DRAWS)


def test_factors_sigma_and_order(params):
    for name in ('brightness', 'contrast', 'saturation'):
        v = params[name]
        assert v.min() >= 0.6 and v.max() <= 1.4
        assert abs(v.mean() - 1.0) < 5 * 0.8 / math.sqrt(12 * N_DRAWS)
        assert abs(v.std() - 0.8 / math.sqrt(12)) < 0.01
    hue = params['hue']
    assert hue.min() >= -0.1 and hue.max() <= 0.1 and abs(hue.mean()) < 0.003
    sigma = params['sigma']
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean() - 1.05) < 0.02
    order = params['order']
    assert order.shape == (N_DRAWS, 4)
    np.testing.assert_array_equal(np.sort(order, axis=1), np.tile(np.arange(4), (N_DRAWS, 1)))
    for slot in range(4):  # every op equally likely in every slot
        counts = np.bincount(order[:, slot], minlength=4) / N_DRAWS
        assert all(within(c, 0.25, N_DRAWS) for c in counts), (slot, counts)
    perms = {tuple(o) for o in order}
    assert len(perms) == 24


# ---------------------------------------------------------------------------
# (b) each op against the CPU path (augment.py) for the same parameters
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('factor', [0.6, 0.83, 1.17, 1.4])
def test_brightness_contrast_saturation_within_two_levels(factor):
    img = tissue_like(40, 40)
    x = _dev(img)
    for dev_op, cpu_op in ((da.adjust_brightness, augment.adjust_brightness),
                           (da.adjust_contrast, augment.adjust_contrast),
                           (da.adjust_saturation, augment.adjust_saturation)):
        diff = np.abs(_levels(dev_op(x, _f(factor))) - cpu_op(img, factor))
        # PIL truncates to uint8 (and rounds the contrast mean and the luma).
        assert diff.max() <= 2.0 and diff.mean() < 0.7, (dev_op.__name__, diff.max())


def test_grayscale_within_one_level():
    img = tissue_like(40, 40)
    out = _levels(da.grayscale(_dev(img)))
    assert np.abs(out - augment.grayscale(img)).max() <= 1.0
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize('hue', [-0.1, -0.04, 0.03, 0.1])
def test_hue_within_a_few_levels(hue):
    shift = int(hue * 255) / 256  # the CPU path's (PIL's) quantized shift, in turns
    for img, worst in ((_he_like(), 6.0), (tissue_like(40, 40), 12.0)):
        diff = np.abs(_levels(da.adjust_hue(_dev(img), _f(shift))) - augment.adjust_hue(img, hue))
        assert diff.mean() < 1.0 and diff.max() <= worst, (diff.mean(), diff.max())


def test_hue_zero_shift_and_gray_pixels_are_unchanged():
    img = tissue_like(40, 40)
    np.testing.assert_allclose(da.adjust_hue(_dev(img), _f(0.0)), _dev(img), atol=1e-6)
    gray = _dev(augment.grayscale(img))
    np.testing.assert_allclose(da.adjust_hue(gray, _f(0.09)), gray, atol=1e-6)


@pytest.mark.parametrize('sigma', [0.1, 0.6, 1.3, 2.0])
def test_blur_kernel_is_pils_and_blur_within_one_level(sigma):
    kernel = np.asarray(da.blur_kernels(_f(sigma), da.blur_support(CFG)))[0]
    ref = augment.pil_gaussian_kernel(sigma)
    # The fixed tap grid holds PIL's kernel, zero-padded for the smaller sigmas.
    np.testing.assert_allclose(kernel, np.pad(ref, (len(kernel) - len(ref)) // 2), atol=1e-6)
    img = tissue_like(40, 40)
    diff = np.abs(_levels(da.gaussian_blur(_dev(img), _f(sigma)))
                  - augment.gaussian_blur(img, sigma))
    assert diff.max() <= 1.0  # the CPU path rounds once: within half a level + float error


def test_hflip_is_exact():
    x = _dev(tissue_like(40, 40))
    np.testing.assert_array_equal(da.hflip(x), x[:, :, ::-1])


def _view_params(p, i):
    """The CPU path's ViewParams for sample i of device params p (crop: whole image)."""
    jitter = bool(p['jitter'][i])
    return augment.ViewParams(
        crop=(0, 0, 40, 40),
        jitter_order=tuple(int(o) for o in p['order'][i]) if jitter else None,
        brightness=float(p['brightness'][i]), contrast=float(p['contrast'][i]),
        saturation=float(p['saturation'][i]), hue=float(p['hue'][i]),
        gray=bool(p['gray'][i]), blur_sigma=float(p['sigma'][i]) if p['blur'][i] else None,
        hflip=bool(p['hflip'][i]))


def test_whole_chain_matches_apply_view_for_the_same_params():
    """Random order, masks and op composition agree with the CPU path's apply_view."""
    n = 24
    images = np.stack([_he_like(seed=s) if s % 2 else tissue_like(40, 40, seed=s)
                       for s in range(n)])
    p = jax.device_get(da.sample_device_params(jax.random.PRNGKey(7), n, CFG))
    # The device shifts hue continuously; give it the CPU path's 1/256-turn quantization.
    dev_p = dict(p, hue=np.float32([int(h * 255) / 256 for h in p['hue']]))
    out = np.asarray(da.apply_device_params(jnp.asarray(images), dev_p, CFG), np.float64) * 255
    assert p['jitter'].any() and p['blur'].any() and p['gray'].any() and p['hflip'].any()
    for i in range(n):
        want = augment.apply_view(images[i], _view_params(p, i), 40).astype(np.float64)
        diff = np.abs(out[i] - want)
        # PIL truncates after every op (about -0.5 level each), so the CPU path is darker
        # by 1-2 levels on average; a wrong op order shows as 10-35 levels at the 99th
        # percentile on most of these samples.
        assert diff.mean() < 2.5 and np.percentile(diff, 99) <= 8, (i, diff.mean(), diff.max())


def test_augment_views_same_draws_on_one_and_eight_devices():
    """Each sample's parameters depend on the key and its batch position only, not on
    how the batch is sharded (the step runs on the global, sharded batch)."""
    images = jnp.asarray(np.stack([tissue_like(40, 40, seed=s) for s in range(8)]))
    key = jax.random.PRNGKey(11)
    fn = lambda k, x: da.augment_views(k, x, CFG)
    one = jax.jit(fn)(key, images)
    assert one.dtype == jnp.float32 and one.shape == images.shape
    assert float(one.min()) >= 0.0 and float(one.max()) <= 1.0
    mesh = parallel.make_mesh(jax.devices()[:8])
    sharded = jax.device_put(images, parallel.batch_sharded(mesh))
    eight = jax.jit(fn, out_shardings=parallel.batch_sharded(mesh))(key, sharded)
    # XLA may fuse differently per sharding (1-ulp differences); other draws differ by
    # whole levels.
    np.testing.assert_allclose(np.asarray(one), np.asarray(eight), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# (c) the config key
# ---------------------------------------------------------------------------

def test_config_key_defaults_off_and_is_checked():
    c = tiny_config()
    assert c.data.augment_on_device is False
    validate(c, check_data_path=False)
    d = c.to_dict()
    d['data']['augment_on_device'] = 'yes'
    import ml_collections  # pylint: disable=g-import-not-at-top
    with pytest.raises(ConfigError, match='augment_on_device'):
        validate(ml_collections.ConfigDict(d), check_data_path=False)


# ---------------------------------------------------------------------------
# (d) the loader and the train step with the option on
# ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def patch_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('patches')
    write_patches(str(root), 12)
    return root


def _crop_config(path, **kw):
    c = data_config(path, mean=MEAN, std=STD, **kw)
    c.data.augment_on_device = True
    return c


def test_loader_yields_deterministic_uint8_crops(patch_dir):
    first = take(data.create_train_loader(_crop_config(patch_dir)).iterator(), 3)
    again = take(data.create_train_loader(_crop_config(patch_dir)).iterator(), 3)
    for a, b in zip(first, again):
        for k in ('view1', 'view2'):
            assert a[k].shape == (4, 24, 24, 3) and a[k].dtype == np.uint8
            np.testing.assert_array_equal(a[k], b[k])
    # Each view is the bare crop of the CPU path's draw for (seed, epoch, position).
    loader = data.create_train_loader(_crop_config(patch_dir))
    maker = loader.pair_maker()
    for k in range(4):
        epoch, pos, index = maker.record_index(k)
        img = loader.source.load(index)
        rng = np.random.default_rng([0, epoch, pos, pipeline._AUGMENT])
        p1 = augment.sample_view_params(rng, *img.shape[:2], loader.aug)
        p2 = augment.sample_view_params(rng, *img.shape[:2], loader.aug)
        np.testing.assert_array_equal(first[0]['view1'][k], augment.resized_crop(img, p1.crop, 24))
        np.testing.assert_array_equal(first[0]['view2'][k], augment.resized_crop(img, p2.crop, 24))


def test_histology_options_stay_on_the_cpu(patch_dir):
    c = _crop_config(patch_dir)
    c.data.vflip, c.data.rot90 = True, True
    loader = data.create_train_loader(c)
    maker = loader.pair_maker()
    epoch, pos, index = maker.record_index(0)
    img = loader.source.load(index)
    rng = np.random.default_rng([0, epoch, pos, pipeline._AUGMENT])
    p1 = augment.sample_view_params(rng, *img.shape[:2], loader.aug)
    want = augment.resized_crop(img, p1.crop, 24)
    if p1.vflip:
        want = want[::-1]
    want = np.rot90(want, p1.rot90)
    np.testing.assert_array_equal(maker(0)['view1'], want)


def test_step_augments_the_loaders_crops(monkeypatch, patch_dir):
    """The loader's bare crops through one real (jitted) step: both views go through
    device_augment and the loss is finite. Off, the step never calls it (traced only; the
    default path is checked by tests/test_step.py)."""
    calls = []
    real = da.augment_views

    def spy(key, images, cfg):
        calls.append((images.shape, images.dtype, cfg))
        return real(key, images, cfg)

    monkeypatch.setattr(da, 'augment_views', spy)
    batch = next(data.create_train_loader(_crop_config(patch_dir)).iterator())
    c = tiny_config('clusiam', batch_size=4, image_size=24)

    def trainer_for(on):
        c.data.augment_on_device = on
        return build_trainer(c, mesh_of(1), 2, SyntheticLoader.mean, SyntheticLoader.std)

    state = trainer_for(False).init_state()

    def step_for(on):
        return trainer_for(on).step_fn

    jax.eval_shape(step_for(False), state, batch)
    assert not calls
    new_state, metrics = jax.jit(step_for(True))(state, batch)
    assert calls == [((4, 24, 24, 3), jnp.uint8,
                      augment.AugmentConfig(image_size=24, on_device=True))] * 2
    assert math.isfinite(float(metrics['loss'])) and math.isfinite(float(metrics['grad_norm']))
    assert int(new_state.step) == 1
    leaves = jax.tree.leaves(new_state.params)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    assert any(not np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(state.params)))
