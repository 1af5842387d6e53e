"""Issue 23 items 4 and 8: a folder of raw slides (pyramidal TIFFs included) given as
data.path is refused with the tiling command, training never writes into its input
folder, export_info.json records the export's own settings, and pt files added to a
finished export are written from its stored features without embedding again."""
import json
import os

import h5py
import numpy as np
import pytest
from PIL import Image

from clusiam_jax.data import records as records_lib
from clusiam_jax.data import sources as sources_lib
from clusiam_jax.data import stats as stats_lib
from clusiam_jax.errors import DataError
from clusiam_jax.export import embed as embed_lib
from clusiam_jax.export import run as export_run
from clusiam_jax.train.loop import train
from tests.helpers import (
    mesh_of,
    synthetic_tissue,
    tiny_config,
    write_ome_pyramid,
    write_pyramid,
)

TILE_CMD = ('python launch.py --mode tile --config.tile.slides={root} '
            '--config.tile.out_dir=TILES')


def _listing(root):
    """Every file and folder under root (hidden ones included), relative."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, n), root) for n in dirnames + filenames]
    return sorted(out)


def _pyramid(path):
    return write_pyramid(str(path), synthetic_tissue(480, 560, [(280, 240, 150)]), 0.5)


def _ome_pyramid(path):
    return write_ome_pyramid(str(path), synthetic_tissue(480, 560, [(280, 240, 150)]), 0.5)


def _big_tiled(path):
    import tifffile
    tifffile.imwrite(str(path), np.zeros((64, 4352, 3), np.uint8), tile=(64, 64),
                     compression='zlib', photometric='rgb')
    return str(path)


@pytest.mark.parametrize('write_slide', [_pyramid, _ome_pyramid, _big_tiled],
                         ids=['pyramid', 'ome_subifds', 'tiled_over_4096px'])
def test_a_folder_with_a_pyramidal_tiff_is_refused_with_the_tiling_command(tmp_path,
                                                                          write_slide):
    root = tmp_path / 'slides'
    root.mkdir()
    write_slide(root / 'case1.tif')
    Image.new('RGB', (32, 32), (200, 60, 150)).save(root / 'label.png')
    with pytest.raises(DataError) as err:
        sources_lib.open_source(str(root))
    message = str(err.value)
    assert '\n' not in message
    assert '1 whole-slide file' in message and 'case1.tif' in message
    assert TILE_CMD.format(root=root) in message and 'data.path=TILES' in message


def test_small_plain_tiffs_stay_patches(tmp_path):
    import tifffile
    root = tmp_path / 'patches' / 's1'
    root.mkdir(parents=True)
    Image.new('RGB', (32, 32), (200, 60, 150)).save(root / '0_0.tif')
    tifffile.imwrite(str(root / '32_0.tiff'), np.full((48, 48, 3), 90, np.uint8),
                     tile=(16, 16), photometric='rgb')   # tiled but small: a patch
    recs = records_lib.discover(str(tmp_path / 'patches'))
    assert [os.path.basename(r.path) for r in recs] == ['0_0.tif', '32_0.tiff']


# ------------------------------------------------------------- training and export

PATCHES = {'slide_a': [(0, 0), (32, 0), (64, 0), (0, 32), (32, 32), (64, 32)],
           'slide_b': [(0, 0), (32, 0), (64, 0), (0, 32), (32, 32)],
           'slide_c': [(128, 64), (160, 64), (128, 96), (160, 96), (192, 96)]}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny run trained by the real pipeline on a patch folder (statistics computed),
    the folder's listing before training, and its export."""
    base = tmp_path_factory.mktemp('raw_folder_export')
    patches = base / 'patches'
    rng = np.random.default_rng(0)
    for slide, coords in PATCHES.items():
        (patches / slide).mkdir(parents=True)
        for x, y in coords:
            low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            Image.fromarray(low).resize((32, 32), Image.BILINEAR).save(
                patches / slide / f'{x}_{y}.png')
    listing = _listing(patches)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('XDG_CACHE_HOME', str(base / 'cache'))
        config = tiny_config('clusiam', batch_size=8, image_size=32, num_epochs=1)
        config.data.path = str(patches)
        workdir = str(base / 'run')
        train(config, workdir, mesh=mesh_of(1))   # the real data pipeline
        after_training = _listing(patches)
        cached = stats_lib.cache_file(str(patches))
        exp = config.export.copy_and_resolve_references()
        exp.out_dir, exp.batch_size = str(base / 'export'), 8
        export_run.export(workdir, exp, None)
        yield dict(patches=patches, listing=listing, after_training=after_training,
                   cached=cached, workdir=workdir, exp=exp, out=base / 'export', base=base)


def test_training_never_writes_into_the_data_folder(trained):
    assert trained['after_training'] == trained['listing']
    assert _listing(trained['patches']) == trained['listing']   # nor does the export
    # The statistics are cached in the user's cache folder, and recorded by the run.
    cached = trained['cached']
    assert cached.startswith(str(trained['base'] / 'cache' / 'clusiam_jax' / 'stats'))
    assert any(k.startswith('v2-') for k in json.load(open(cached)))
    normalization = json.load(open(os.path.join(trained['workdir'], 'normalization.json')))
    assert cached in normalization['origin']


def test_pt_files_added_to_a_finished_export_are_written_from_its_features(
        trained, monkeypatch):
    torch = pytest.importorskip('torch')
    out = trained['out']
    assert not (out / 'pt_files').exists()
    first = json.loads((out / 'export_info.json').read_text())
    assert first['export']['pt_files'] is False and first['export']['out_dir'] == str(out)

    def no_embedding(*args, **kwargs):
        raise AssertionError('a finished export embedded patches again')
    monkeypatch.setattr(embed_lib.Embedder, 'embed_fn', no_embedding)
    monkeypatch.setattr(embed_lib, '_embed_stream', no_embedding)
    exp = trained['exp'].copy_and_resolve_references()
    exp.pt_files, exp.qupath = True, True
    export_run.export(trained['workdir'], exp, None)

    for slide in PATCHES:
        with h5py.File(out / 'h5_files' / f'{slide}.h5', 'r') as f:
            features = f['features'][()]
        loaded = torch.load(out / 'pt_files' / f'{slide}.pt', weights_only=True)
        assert loaded.dtype == torch.float32
        np.testing.assert_array_equal(loaded.numpy(), features)
        assert (out / 'qupath' / f'{slide}.geojson').exists()
    info = json.loads((out / 'export_info.json').read_text())
    settings = info['export']
    assert settings['pt_files'] is True and settings['qupath'] is True
    assert settings['out_dir'] == str(out)
    assert settings['data_path'] == str(trained['patches'])
    assert settings['image_size'] == 32 and settings['batch_size'] == 8
    assert settings['checkpoint_step'] == info['checkpoint_step'] == 2
    assert 'export' not in info['config']   # the run's config: its own export section
