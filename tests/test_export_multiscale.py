"""Multi-scale export (export.mpps) and stain-augmented copies (export.augment_copies):
the coarse patches' geometry in level-0 px, `cat` = [fine, parents], coarse features
against the network on OpenSlide's own read of the region, the default export untouched,
deterministic and distinct copies, the one-line refusals, and DSMIL on the bags."""
import os
import shutil

import cv2
import h5py
import numpy as np
import openslide
import pytest

from clusiam_jax.data import augment
from clusiam_jax.data import sources as sources_lib
from clusiam_jax.errors import ConfigError, DataError
from clusiam_jax.eval import dsmil
from clusiam_jax.export import embed, scales
from clusiam_jax.export import format as fmt
from clusiam_jax.export import run as export_run
from clusiam_jax.models.preprocess import normalize_input
from clusiam_jax.run_dir import load_run
from clusiam_jax.slides import coords as coords_lib
from clusiam_jax.slides import tiling
from tests.helpers import tiny_config, write_patches, write_pyramid
from tests.test_slides import synthetic_base, tile_params
from tests.test_storage_export import _write_run as write_run

SLIDES = ('alpha', 'beta', 'gamma', 'delta')
MPPS = (0.5, 2.0, 3.0)   # the grid's own, 4x the field, 6x (its squares reach past the edge)
COPIES = 2
HED = 0.05


def _exp(config, tiles, out, **keys):
    exp = config.export.copy_and_resolve_references()
    exp.data_path, exp.out_dir, exp.batch_size = str(tiles), str(out), 16
    for key, value in keys.items():
        exp[key] = value
    return exp


@pytest.fixture(scope='module')
def made(tmp_path_factory):
    """Four synthetic slides (one field, flipped) at 0.5 µm/px tiled, a tiny run of random
    weights (nothing trained: no compile), exported plain and with three resolutions and two
    HED copies."""
    base = tmp_path_factory.mktemp('multiscale')
    rgb = synthetic_base(0.5)
    slides = base / 'wsi'
    slides.mkdir()
    for name, view in zip(SLIDES, (rgb, rgb[::-1], rgb[:, ::-1], rgb[::-1, ::-1])):
        write_pyramid(str(slides / f'{name}.tif'), np.ascontiguousarray(view), 0.5)
    tiles = base / 'tiles'
    tiling.tile_slides(tiling.list_slides(str(slides)), tile_params(), str(tiles))
    config = tiny_config('clusiam', batch_size=8, image_size=32, num_epochs=1)
    workdir = str(base / 'run')
    write_run(workdir, config)
    export_run.export(workdir, _exp(config, tiles, base / 'plain'), None)
    export_run.export(workdir, _exp(config, tiles, base / 'multi', mpps=MPPS,
                                    augment_copies=COPIES), None, hed=HED)
    return dict(base=base, tiles=tiles, slides=slides, workdir=workdir, config=config,
                plain=base / 'plain', multi=base / 'multi')


def _read(path):
    with h5py.File(path, 'r') as f:
        arrays = {k: f[k][()] for k in f if k != 'paths'}
        attrs = {k: dict(f[k].attrs) for k in f}
        attrs[''] = dict(f.attrs)
    return arrays, attrs


def _slide_file(folder, slide):
    return folder / 'h5_files' / f'{slide}.h5'


def test_every_parent_holds_its_patch_centre(made):
    for slide in SLIDES:
        a, attrs = _read(_slide_file(made['multi'], slide))
        size0 = float(attrs['coords']['patch_size_level0'])
        centres = a['coords'] + size0 / 2
        assert list(attrs['']['export_mpps']) == list(MPPS)
        for s, mpp in enumerate(MPPS[1:], start=1):
            side = float(attrs[f'coords_scale{s}']['patch_size_level0'])
            assert side == pytest.approx(size0 * mpp / MPPS[0])   # 4x and 6x the field
            assert attrs[f'features_scale{s}']['mpp'] == mpp
            top_left = a[f'coords_scale{s}'][a[f'parent_scale{s}']]
            assert np.all(top_left <= centres) and np.all(centres < top_left + side), slide
            # Every coarse patch is some patch's parent, and none is listed twice.
            assert set(a[f'parent_scale{s}']) == set(range(len(a[f'coords_scale{s}'])))
            assert len(np.unique(a[f'coords_scale{s}'], axis=0)) == len(a[f'coords_scale{s}'])


def test_cat_is_each_patch_then_its_parents(made):
    for slide in SLIDES:
        a, attrs = _read(_slide_file(made['multi'], slide))
        want = np.concatenate([a['features']] + [a[f'features_scale{s}'][a[f'parent_scale{s}']]
                                                 for s in (1, 2)], axis=1)
        np.testing.assert_array_equal(a['cat'], want)
        want = np.concatenate([a['features_augmented']] + [
            a[f'features_scale{s}_augmented'][a[f'parent_scale{s}']] for s in (1, 2)], axis=2)
        np.testing.assert_array_equal(a['cat_augmented'], want)
        assert a['cat'].shape == (len(a['coords']), 3 * a['features'].shape[1])
        assert list(attrs['cat']['mpps']) == list(MPPS)


def _openslide_square(path, x, y, side, out):
    """OpenSlide's own read of the level-0 square (transparent over white), area-resized."""
    with openslide.OpenSlide(str(path)) as slide:
        rgba = np.asarray(slide.read_region((int(x), int(y)), 0, (side, side)), np.float64)
    rgb = rgba[..., :3] * rgba[..., 3:] / 255 + 255 * (1 - rgba[..., 3:] / 255)
    return cv2.resize(np.round(rgb).astype(np.uint8), (out, out), interpolation=cv2.INTER_AREA)


def test_coarse_features_are_the_network_on_openslides_read(made):
    run = load_run(made['workdir'])
    a, attrs = _read(_slide_file(made['multi'], 'beta'))
    out = int(attrs['coords']['patch_size'])
    images, want, reaches_out = [], [], False
    for s in (1, 2):
        side = int(round(attrs[f'coords_scale{s}']['patch_size_level0']))
        width = int(attrs['coords']['level0_width'])
        for j in range(len(a[f'coords_scale{s}'])):
            x, y = a[f'coords_scale{s}'][j]
            reaches_out |= x + side > width
            read = _openslide_square(made['slides'] / 'beta.tif', x, y, side, out)
            images.append(augment.resized_crop(read, (0, 0, out, out), 32))
            want.append(a[f'features_scale{s}'][j])
    assert reaches_out   # some 3 µm/px squares run past the slide: white there, as OpenSlide's
    x = normalize_input(np.stack(images), run.normalization.mean, run.normalization.std)
    got = np.asarray(run.network.apply(run.weights.online_variables, x,
                                       train=False)['features'])
    want = np.stack(want)
    # The export reads level 1 (area-averaged by 2 when written) and resizes by 2; the
    # reference resizes level 0 by 4: a rounding apart, far below two neighbouring squares'.
    err = np.abs(got - want).max(axis=1)
    apart = np.abs(want[1:] - want[:-1]).max(axis=1)
    assert err.max() < 0.1 * np.median(apart), (err.max(), np.median(apart))


def test_without_mpps_the_export_is_todays(made):
    run = load_run(made['workdir'])
    source = sources_lib.open_source(str(made['tiles']))
    records = list(map(source.record, range(len(source))))
    for slide in SLIDES:
        plain, attrs = _read(_slide_file(made['plain'], slide))
        assert set(plain) == {'coords', 'features', 'cluster_logits', 'cluster_ids'}
        assert not set(fmt.OPTION_ATTRS) & set(attrs[''])
        assert attrs['features'] == {}
        multi, _ = _read(_slide_file(made['multi'], slide))
        np.testing.assert_array_equal(multi['coords'], plain['coords'])
        # The finest scale is the grid's own patch: `features` as without export.mpps.
        np.testing.assert_allclose(multi['features'], plain['features'], rtol=1e-6, atol=1e-6)
    picks = [i for i, r in enumerate(records) if r.slide_id == 'gamma'][:4]
    images = np.stack([augment.resized_crop(source.load(i), (0, 0, 64, 64), 32) for i in picks])
    x = normalize_input(images, run.normalization.mean, run.normalization.std)
    want = np.asarray(run.network.apply(run.weights.online_variables, x,
                                        train=False)['features'])
    plain, _ = _read(_slide_file(made['plain'], 'gamma'))
    np.testing.assert_allclose(plain['features'][:4], want, rtol=1e-4, atol=1e-5)


def test_augmented_copies_are_deterministic_and_distinct(made):
    # Another batch size and worker count: the copies are drawn per patch, not per batch.
    exp = _exp(made['config'], made['tiles'], made['base'] / 'again', mpps=MPPS,
               augment_copies=COPIES, batch_size=8, num_workers=3)
    export_run.export(made['workdir'], exp, None, hed=HED)
    for slide in SLIDES:
        a, attrs = _read(_slide_file(made['multi'], slide))
        b, _ = _read(_slide_file(made['base'] / 'again', slide))
        assert attrs['']['augment_copies'] == COPIES and attrs['']['augment_hed'] == HED
        for key in ('features_augmented', 'features_scale1_augmented', 'cat_augmented'):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)
        copies, plain = a['features_augmented'], a['features']
        assert copies.shape == (len(plain), COPIES, plain.shape[1])
        scale = np.abs(plain).mean()
        for k in range(COPIES):   # every copy moved away from the plain patch ...
            assert np.abs(copies[:, k] - plain).max(axis=1).min() > 1e-3 * scale
        # ... and from the other copy
        assert np.abs(copies[:, 0] - copies[:, 1]).max(axis=1).min() > 1e-3 * scale


def test_copy_draws_depend_on_slide_patch_and_copy_only():
    draws = {key: embed.copy_rng(0, *key).random(4).tolist()
             for key in (('a', 0, 0, 0), ('a', 0, 0, 1), ('a', 0, 1, 0), ('b', 0, 0, 0),
                         ('a', 1, 0, 0))}
    assert len({tuple(v) for v in draws.values()}) == len(draws)
    assert embed.copy_rng(0, 'a', 0, 1, 0).random(4).tolist() == draws[('a', 0, 1, 0)]


def _refuses_before_compiling(monkeypatch):
    def compiled(*args, **kwargs):
        raise AssertionError('compiled before refusing')
    monkeypatch.setattr(embed.Embedder, 'embed_fn', compiled)


def test_refusals(made, tmp_path, monkeypatch):
    _refuses_before_compiling(monkeypatch)
    config, workdir = made['config'], made['workdir']
    with pytest.raises(ConfigError, match=r"finer than slide alpha's level 0 \(0.5 µm/px\)"):
        export_run.export(workdir, _exp(config, made['tiles'], tmp_path / 'a',
                                        mpps=(0.25, 1.0)), None)
    patches = tmp_path / 'patches'
    write_patches(str(patches), 4)
    with pytest.raises(ConfigError, match='export.mpps .* patch folder'):
        export_run.export(workdir, _exp(config, patches, tmp_path / 'b', mpps=(0.5, 2.0)),
                          None)
    with pytest.raises(ConfigError, match='augment.hed'):
        export_run.export(workdir, _exp(config, made['tiles'], tmp_path / 'c',
                                        augment_copies=2), None)
    # A TRIDENT patches/ folder without level0_mpp, of a slide whose metadata has no µm/px.
    import tifffile
    folder = tmp_path / 'trident'
    (folder / 'patches').mkdir(parents=True)
    (tmp_path / 'bare').mkdir()
    rgb = np.asarray(openslide.OpenSlide(str(made['slides'] / 'alpha.tif')).read_region(
        (0, 0), 0, (512, 512)))[..., :3]
    tifffile.imwrite(tmp_path / 'bare' / 'alpha.tif', np.ascontiguousarray(rgb),
                     tile=(128, 128), photometric='rgb')
    tiled = coords_lib.read_coords(coords_lib.trident_file(str(made['tiles']), 'alpha'))
    attrs = {k: v for k, v in tiled.attrs.items()
             if k not in ('level0_mpp', 'target_mpp', 'level0_width', 'level0_height')}
    coords_lib.write_trident(str(folder / 'patches' / 'alpha_patches.h5'),
                             tiled.coords[np.all(tiled.coords < 400, axis=1)], attrs)
    exp = _exp(config, folder, tmp_path / 'd', mpps=(0.5, 2.0))
    exp.slide_dir = str(tmp_path / 'bare')
    with pytest.raises(DataError, match='slide alpha has no known level-0 µm/px'):
        export_run.export(workdir, exp, None)


def _splits(path):
    rows = ['slide_id,split,label', 'alpha,train,a', 'beta,train,b', 'gamma,val,a',
            'delta,val,b']
    path.write_text('\n'.join(rows) + '\n')
    return str(path)


def test_dsmil_takes_the_multiscale_bags(made, tmp_path, monkeypatch):
    seen = []
    original = dsmil.train_dsmil

    def recording(train_bags, val_bags, test_bags, *args, **kwargs):
        seen.append(([np.shape(x) for x, _ in train_bags], [np.shape(x) for x, _ in val_bags]))
        return original(train_bags, val_bags, test_bags, *args, **kwargs)
    monkeypatch.setattr(dsmil, 'train_dsmil', recording)
    splits = _splits(tmp_path / 'splits.csv')
    config = dsmil.DSMILConfig(epochs=2)
    result = dsmil.run_dsmil(str(made['multi']), splits, seeds=(0,), config=config)
    assert result['bags'] == 'cat' and not result['augmented']
    with h5py.File(_slide_file(made['multi'], 'alpha'), 'r') as f:
        dim = f['features'].shape[1] * len(MPPS)
    assert [s[1] for s in seen[0][0]] == [dim, dim]
    assert dsmil.run_dsmil(str(made['plain']), splits, seeds=(0,), config=config)['bags'] == \
        'features'
    result = dsmil.run_dsmil(str(made['multi']), splits, seeds=(0,), config=config,
                             augmented=True)
    train_shapes, val_shapes = seen[-1]
    assert len(train_shapes) == 2 * (1 + COPIES) and len(val_shapes) == 2
    assert {s[1] for s in train_shapes + val_shapes} == {dim}
    # A multi-scale export missing one slide's bags is refused, not mixed.
    mixed = tmp_path / 'mixed'
    shutil.copytree(made['multi'], mixed)
    shutil.copy(_slide_file(made['plain'], 'delta'), _slide_file(mixed, 'delta'))
    with pytest.raises(DataError, match='slide delta has not'):
        dsmil.run_dsmil(str(mixed), splits, seeds=(0,), config=config)
    assert os.path.isfile(_slide_file(mixed, 'alpha'))


def test_a_finest_resolution_other_than_the_grids_keeps_its_centres(made):
    source = sources_lib.open_source(str(made['tiles']))
    groups = embed.group_by_slide(source)
    plans = scales.plan_slides(source, (4.0, 1.0), groups, str(made['tiles']))
    plan = plans['alpha']
    assert [s.mpp for s in plan.scales] == [1.0, 4.0] and not plan.native
    grid = np.array([[source.record(int(i)).x, source.record(int(i)).y]
                     for i in groups['alpha']])
    size0 = float(source.slides[plan.slide_index].coords.patch_size_level0)
    fine = plan.scales[0]
    assert fine.size_level0 == pytest.approx(2 * size0)   # 64 px at 1 µm/px over 0.5 µm/px
    np.testing.assert_allclose(fine.coords + fine.size_level0 / 2, grid + size0 / 2, atol=0.5)
    coarse = plan.scales[1]
    top_left = coarse.coords[coarse.parent]
    assert np.all(top_left <= grid + size0 / 2)
    assert np.all(grid + size0 / 2 < top_left + coarse.size_level0)


def _invert(img):
    return 255 - img


def test_the_transform_is_applied_to_every_patch_read_and_recorded(made):
    out = made['base'] / 'inverted'
    export_run.export(made['workdir'], _exp(made['config'], made['tiles'], out, mpps=MPPS[:2]),
                      None, transform=_invert, transform_name='invert')
    run = load_run(made['workdir'])
    a, attrs = _read(_slide_file(out, 'delta'))
    assert attrs['']['input_transform'] == 'invert'
    b, _ = _read(_slide_file(made['multi'], 'delta'))
    source = sources_lib.open_source(str(made['tiles']))
    picks = [i for i in range(len(source)) if source.record(i).slide_id == 'delta'][:3]
    reads = [source.load(i) for i in picks]
    # the coarse patches too: read as the reference, from the slide at 2 µm/px
    side = int(round(attrs['coords_scale1']['patch_size_level0']))
    reads += [_openslide_square(made['slides'] / 'delta.tif', *a['coords_scale1'][j], side, 64)
              for j in range(2)]
    images = np.stack([augment.resized_crop(255 - r, (0, 0, 64, 64), 32) for r in reads])
    x = normalize_input(images, run.normalization.mean, run.normalization.std)
    want = np.asarray(run.network.apply(run.weights.online_variables, x,
                                        train=False)['features'])
    got = np.concatenate([a['features'][:3], a['features_scale1'][:2]])
    np.testing.assert_allclose(got[:3], want[:3], rtol=1e-4, atol=1e-5)
    # (a rounding apart, as in the test above; the untransformed ones are far from them)
    err = np.abs(got[3:] - want[3:]).max()
    assert err < 0.05 * np.abs(got[3:] - b['features_scale1'][:2]).max()
    assert np.abs(a['features'] - b['features']).max() > 0.1 * np.abs(b['features']).mean()


def test_augmented_copies_of_a_patch_folder_in_npz(made, tmp_path):
    patches = tmp_path / 'patches'
    write_patches(str(patches), 6)
    out = tmp_path / 'npz'
    export_run.export(made['workdir'], _exp(made['config'], patches, out, format='npz',
                                            augment_copies=COPIES), None, hed=HED)
    with np.load(out / fmt.NPZ_NAME) as f:
        features, copies = f['features'], f['features_augmented']
        assert int(f['augment_copies']) == COPIES and float(f['augment_hed']) == HED
    assert copies.shape == (len(features), COPIES, features.shape[1])
    assert np.abs(copies - features[:, None]).max(axis=2).min() > 0
    slides = fmt.read_export(str(out))
    assert sum(len(a['features_augmented']) for a in slides.values()) == len(features)


def test_a_run_trained_with_stain_norm_exports_normalised_patches(made):
    """The run's data.stain_norm and recorded target reach the export by themselves (the
    command line and the after-training export pass no transform)."""
    from clusiam_jax import run_dir
    from clusiam_jax.data import stain_norm
    workdir = made['base'] / 'run_stain'
    shutil.copytree(made['workdir'], workdir)
    config = run_dir.read_run_config(str(workdir))
    config.data.stain_norm = 'reinhard'
    run_dir.write_run_config(str(workdir), config)
    source = sources_lib.open_source(str(made['tiles']))
    target = stain_norm.fit('reinhard', [source.load(i) for i in range(0, len(source), 7)])
    (workdir / stain_norm.TARGET_NAME).write_text(target.to_json())
    by_run = made['base'] / 'by_run'
    export_run.export(str(workdir), _exp(made['config'], made['tiles'], by_run), None)
    given = made['base'] / 'given'
    export_run.export(made['workdir'], _exp(made['config'], made['tiles'], given), None,
                      transform=stain_norm.StainNormalizer(target),
                      transform_name='stain_norm=reinhard')
    a, attrs = _read(_slide_file(by_run, 'alpha'))
    b, _ = _read(_slide_file(given, 'alpha'))
    plain, _ = _read(_slide_file(made['plain'], 'alpha'))
    # named by the target's digest: another target is another export
    assert attrs['']['input_transform'] == stain_norm.digest(stain_norm.StainNormalizer(target))
    assert attrs['']['input_transform'].startswith('stain_norm=reinhard:')
    np.testing.assert_array_equal(a['features'], b['features'])
    assert not np.allclose(a['features'], plain['features'])
