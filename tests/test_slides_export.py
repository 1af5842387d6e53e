"""Export from slides: per-slide files whose coords are the tiling's, the tiling's
attributes carried over, CLAM's pt files, QuPath tiles, and cluster maps over the slide
with annotation contours; patch labels from annotations for the patch-level kNN."""
import json
import os

import h5py
import numpy as np
import pytest
from PIL import Image

from clusiam_jax.data import augment
from clusiam_jax.data import sources as sources_lib
from clusiam_jax.eval import tasks
from clusiam_jax.export import run as export_run
from clusiam_jax.export.palette import cluster_palette
from clusiam_jax.models.preprocess import normalize_input
from clusiam_jax.run_dir import load_run
from clusiam_jax.slides import annotations as ann
from clusiam_jax.slides import coords as coords_lib
from clusiam_jax.slides import tiling
from clusiam_jax.train.loop import train
from tests.helpers import SyntheticLoader, tiny_config, write_pyramid
from tests.test_slides import synthetic_base, tile_params

SQUARE = [[64, 64], [320, 64], [320, 320], [64, 320], [64, 64]]   # level-0 px, 0.5 µm/px


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """Two synthetic slides tiled, a tiny run trained on synthetic batches, exported from
    the tiling with pt files, QuPath tiles and maps with annotations."""
    base = tmp_path_factory.mktemp('slide_export')
    rgb = synthetic_base(0.5)
    slides = base / 'wsi'
    slides.mkdir()
    write_pyramid(str(slides / 'alpha.tif'), rgb, 0.5)
    write_pyramid(str(slides / 'beta.tif'), np.ascontiguousarray(rgb[::-1]), 0.5)
    tiles = base / 'tiles'
    tiling.tile_slides(tiling.list_slides(str(slides)), tile_params(), str(tiles))
    notes = base / 'annotations'
    notes.mkdir()
    (notes / 'alpha.geojson').write_text(json.dumps({'type': 'FeatureCollection', 'features': [
        {'type': 'Feature', 'geometry': {'type': 'Polygon', 'coordinates': [SQUARE]},
         'properties': {'classification': {'name': 'Tumor'}}}]}))

    config = tiny_config('clusiam', batch_size=8, image_size=32, num_epochs=1)
    config.data.mean, config.data.std = SyntheticLoader.mean, SyntheticLoader.std
    workdir = str(base / 'run')
    train(config, workdir, loader=SyntheticLoader(2, 1, 8, 32))
    exp = config.export.copy_and_resolve_references()
    exp.data_path, exp.out_dir, exp.batch_size = str(tiles), str(base / 'export'), 16
    exp.pt_files, exp.qupath, exp.cluster_maps = True, True, True
    exp.annotations = str(notes)
    export_run.export(workdir, exp, None)
    return dict(tiles=tiles, out=base / 'export', workdir=workdir, notes=notes,
                slides=slides)


def test_export_coords_are_the_tiling_coords_with_its_attributes(exported):
    for slide in ('alpha', 'beta'):
        tiled = coords_lib.read_coords(coords_lib.trident_file(str(exported['tiles']), slide))
        with h5py.File(exported['out'] / 'h5_files' / f'{slide}.h5', 'r') as f:
            np.testing.assert_array_equal(f['coords'][()], tiled.coords)
            for key in ('patch_size', 'patch_size_level0', 'level0_magnification',
                        'target_magnification', 'overlap', 'level0_width', 'level0_height',
                        'target_mpp', 'level0_mpp', 'name'):
                assert f['coords'].attrs[key] == tiled.attrs[key], key
            assert f.attrs['slide_path'] == str(exported['slides'] / f'{slide}.tif')
            assert f['features'].shape[0] == len(tiled.coords)
            assert f['cluster_ids'].shape == (len(tiled.coords),)


def test_features_are_the_network_on_the_slide_patches(exported):
    run = load_run(exported['workdir'])
    source = sources_lib.open_source(str(exported['tiles']))
    recs = list(map(source.record, range(len(source))))
    picks = [i for i, r in enumerate(recs) if r.slide_id == 'beta'][:5]
    images = np.stack([augment.resized_crop(source.load(i), (0, 0, 64, 64), 32)
                       for i in picks])
    x = normalize_input(images, run.normalization.mean, run.normalization.std)
    want = np.asarray(run.network.apply(run.weights.online_variables, x,
                                        train=False)['features'])
    with h5py.File(exported['out'] / 'h5_files' / 'beta.h5', 'r') as f:
        np.testing.assert_allclose(f['features'][:5], want, rtol=1e-4, atol=1e-5)


def test_pt_files_hold_the_features(exported):
    torch = pytest.importorskip('torch')
    with h5py.File(exported['out'] / 'h5_files' / 'alpha.h5', 'r') as f:
        features = f['features'][()]
    loaded = torch.load(exported['out'] / 'pt_files' / 'alpha.pt', weights_only=True)
    np.testing.assert_array_equal(loaded.numpy(), features)


def test_qupath_tiles_carry_cluster_and_colour(exported):
    path = exported['out'] / 'qupath' / 'alpha.geojson'
    collection = json.loads(path.read_text())
    with h5py.File(exported['out'] / 'h5_files' / 'alpha.h5', 'r') as f:
        coords, ids = f['coords'][()], f['cluster_ids'][()]
        k = f['cluster_logits'].shape[1]
    assert len(collection['features']) == len(coords)
    palette = cluster_palette(128)[:k]
    for feature, (x, y), c in zip(collection['features'], coords, ids):
        ring = np.array(feature['geometry']['coordinates'][0])
        assert ring.min(0).tolist() == [x, y] and ring.max(0).tolist() == [x + 64, y + 64]
        assert feature['properties']['classification']['name'] == f'cluster {c}'
        assert feature['properties']['classification']['color'] == palette[c].tolist()


def test_cluster_map_is_drawn_over_the_slide_with_the_annotation(exported):
    png = exported['out'] / 'cluster_maps' / 'alpha.png'
    with Image.open(png) as im:
        assert im.text['clusiam_background'] == 'slide'
        top = int(im.text['clusiam_map_top'])
        scale = float(im.text['clusiam_downsample'])
        image = np.asarray(im.convert('RGB'))
    assert scale == pytest.approx(1.0)   # a small slide: drawn at level 0
    # The annotation's contour (Tumor's class colour) runs along the square's top edge.
    colour = np.array(ann.class_colors(['Tumor'])['Tumor'])
    edge = image[top + 64, 100:300]
    assert (np.abs(edge.astype(int) - colour).sum(1) < 60).mean() > 0.8
    # No map of beta drawn without its annotations is missing: both slides have maps.
    assert (exported['out'] / 'cluster_maps' / 'beta.png').exists()


def test_patch_labels_from_annotations(exported, tmp_path):
    splits = tmp_path / 'splits.csv'
    splits.write_text('slide_id,split\nalpha,train\nbeta,test\n')
    sets = tasks.patch_sets(str(exported['out']), str(splits),
                            annotations=str(exported['notes']))
    _, labels, _ = sets['train']
    with h5py.File(exported['out'] / 'h5_files' / 'alpha.h5', 'r') as f:
        coords = f['coords'][()]
    centres = coords + 32
    inside = ((centres >= 64) & (centres <= 320)).all(1)
    assert inside.any() and (~inside).any()
    np.testing.assert_array_equal(labels == 'Tumor', inside)
    assert set(labels[~inside]) == {'normal'}
    assert set(sets['test'][1]) == {'normal'}    # beta has no annotation file


def _count_embedded_slides(monkeypatch):
    """A list that gets, per embedding pass of an export, the set of slides embedded."""
    from clusiam_jax.export import embed
    calls = []
    original = embed._embed_stream

    def counting(embedder, source, writer, options):
        calls.append(set(writer.groups))
        return original(embedder, source, writer, options)
    monkeypatch.setattr(embed, '_embed_stream', counting)
    return calls


def test_export_resumes_per_slide(exported, monkeypatch, tmp_path):
    calls = _count_embedded_slides(monkeypatch)
    config = tiny_config('clusiam', image_size=32)
    exp = config.export
    exp.data_path, exp.out_dir = str(exported['tiles']), str(exported['out'])
    exp.batch_size, exp.pt_files, exp.qupath = 16, True, True
    os.remove(exported['out'] / 'h5_files' / 'beta.h5')
    export_run.export(exported['workdir'], exp, None)
    assert calls == [{'beta'}]


def test_a_vanished_slide_is_listed_once_and_the_rest_exported(exported, tmp_path):
    import shutil
    tiles = tmp_path / 'tiles'
    shutil.copytree(exported['tiles'], tiles)
    text = (tiles / 'slides.csv').read_text()
    gone = str(tmp_path / 'moved' / 'beta.tif')
    (tiles / 'slides.csv').write_text(text.replace(str(exported['slides'] / 'beta.tif'), gone))
    config = tiny_config('clusiam', image_size=32)
    exp = config.export
    exp.data_path, exp.out_dir, exp.batch_size = str(tiles), str(tmp_path / 'out'), 16
    export_run.export(exported['workdir'], exp, None)
    assert os.listdir(tmp_path / 'out' / 'h5_files') == ['alpha.h5']
    assert (tmp_path / 'out' / 'skipped_files.txt').read_text().split() == [gone]


def test_npz_from_slides_is_refused_and_pt_files_resume(exported, tmp_path, monkeypatch):
    from clusiam_jax.errors import ConfigError
    config = tiny_config('clusiam', image_size=32)
    exp = config.export
    exp.data_path, exp.out_dir, exp.format = str(exported['tiles']), str(tmp_path / 'n'), 'npz'
    with pytest.raises(ConfigError, match='export.format=h5'):
        export_run.export(exported['workdir'], exp, None)
    calls = _count_embedded_slides(monkeypatch)
    exp.format, exp.out_dir, exp.batch_size = 'h5', str(exported['out']), 16
    exp.pt_files, exp.qupath = True, True
    os.remove(exported['out'] / 'pt_files' / 'alpha.pt')
    export_run.export(exported['workdir'], exp, None)
    # A missing pt file of a finished slide is made from its h5 features: nothing is
    # embedded again (issue 23 item 8).
    assert calls == [] and (exported['out'] / 'pt_files' / 'alpha.pt').exists()
    test_pt_files_hold_the_features(exported)
