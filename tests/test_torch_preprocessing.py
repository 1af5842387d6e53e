"""`convert to-torch` says what field of view the encoder was trained on, and the README's
preprocessing snippet, run as written (the ```python block starting with MARKER), turns
patches read with OpenSlide into the inputs the export fed the network: torchvision with
the converted weights reproduces the exported features. Writing the weights where they
cannot go is one `error:` line.

Skipped without torch, torchvision or OpenSlide.
"""
import json
import os
import re

import h5py
import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('torchvision')
openslide = pytest.importorskip('openslide')

from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from clusiam_jax import cli, run_dir  # noqa: E402
from clusiam_jax.export import run as export_run  # noqa: E402
from clusiam_jax.interop import to_torch  # noqa: E402
from clusiam_jax.interop.from_torch import weights_of  # noqa: E402
from clusiam_jax.models import build_network  # noqa: E402
from clusiam_jax.slides import tiling  # noqa: E402
from tests.helpers import MEAN, REPO, STD, tiny_config, write_pyramid  # noqa: E402
from tests.test_slides import synthetic_base, tile_params  # noqa: E402

MARKER = '# clusiam-preprocess'
IMAGE = 32
ATOL = 1e-4


def readme_snippet() -> dict:
    """The names the README's preprocessing block defines, by running it."""
    with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
        blocks = re.findall(r'```python\n(.*?)```', f.read(), re.S)
    found = [b for b in blocks if b.startswith(MARKER)]
    assert len(found) == 1, f'README.md has {len(found)} python blocks starting {MARKER!r}'
    namespace = {}
    exec(compile(found[0], 'README.md (preprocessing snippet)', 'exec'), namespace)
    return namespace


def tiny_torchvision():
    """torchvision's ResNet at resnet_tiny's size: one BasicBlock per stage, width 8."""
    from torchvision.models.resnet import BasicBlock, ResNet
    net = ResNet(BasicBlock, [1, 1, 1, 1])
    net.inplanes = 8
    net.conv1 = torch.nn.Conv2d(3, 8, 7, 2, 3, bias=False)
    net.bn1 = torch.nn.BatchNorm2d(8)
    for stage, width in enumerate((8, 16, 32, 64)):
        setattr(net, f'layer{stage + 1}',
                net._make_layer(BasicBlock, width, 1, stride=1 if stage == 0 else 2))
    net.fc = torch.nn.Identity()
    return net


def write_tiny_run(workdir, data_path):
    """A run of the tiny model trained on `data_path` as far as its files say, with
    random weights and BatchNorm statistics (no training step: only the weights matter
    here)."""
    config = tiny_config('clusiam', batch_size=8, image_size=IMAGE, num_epochs=1)
    config.data.path = data_path
    config.data.mean, config.data.std = MEAN, STD
    network = build_network(config.model)
    shapes = jax.eval_shape(lambda: network.init(
        jax.random.PRNGKey(0), np.zeros((1, IMAGE, IMAGE, 3), np.float32), train=False))
    rng = np.random.RandomState(0)

    def random(path, leaf):   # no init run: eval_shape compiles nothing
        name, shape = path[-1].key, leaf.shape
        if name == 'kernel':   # He-normal over the fan-in
            return rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape).astype(np.float32)
        if name in ('scale', 'var'):   # BN: no zero-init residuals, spread variances
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return rng.normal(0, 0.2, shape).astype(np.float32)   # bias, mean
    params = jax.tree_util.tree_map_with_path(random, shapes['params'])
    stats = jax.tree_util.tree_map_with_path(random, shapes['batch_stats'])
    run_dir.write_run(workdir, config, weights_of(params, stats, step=3),
                      run_dir.Normalization(MEAN, STD, 'given by the test'))
    return config


@pytest.fixture(scope='module')
def run(demo_tiles, tmp_path_factory):
    """A tiny run whose data is the demo slide's tiling (224 px at 0.5 µm/px), exported
    from it (patches larger than the 32 px input) and from a synthetic 0.25 µm/px slide
    tiled at 24 px at 0.8 µm/px (read from a coarser level, area-resized, then enlarged),
    and converted to .safetensors and .pth."""
    base = tmp_path_factory.mktemp('torch_preprocessing')
    workdir = str(base / 'run')
    config = write_tiny_run(workdir, demo_tiles)

    slides = base / 'wsi'
    slides.mkdir()
    write_pyramid(str(slides / 'field.tif'), synthetic_base(0.25), 0.25)
    synthetic_tiles = str(base / 'tiles')
    tiling.tile_slides(tiling.list_slides(str(slides)),
                       tile_params(patch_size=24, target_mpp=0.8), synthetic_tiles)
    exports = {}
    for name, data_path in (('demo', demo_tiles), ('synthetic', synthetic_tiles)):
        exp = config.export.copy_and_resolve_references()
        exp.data_path, exp.out_dir, exp.batch_size = data_path, str(base / name), 64
        export_run.export(workdir, exp, None)
        exports[name] = base / name / 'h5_files'

    weights = str(base / 'encoder.safetensors')
    assert cli.main(['--mode', 'convert', 'to-torch', '--workdir', workdir,
                     '--out', weights]) == 0
    pth = str(base / 'encoder.pth')
    assert cli.main(['--mode', 'convert', 'to-torch', '--workdir', workdir,
                     '--out', pth]) == 0
    return dict(workdir=workdir, weights=weights, pth=pth, exports=exports, base=base)


def test_metadata_says_the_field_of_view(run):
    with safe_open(run['weights'], 'np') as f:
        meta = f.metadata()
    assert json.loads(meta['target_mpp']) == 0.5
    assert json.loads(meta['patch_size_px']) == 224
    assert json.loads(meta['field_of_view_um']) == 112.0
    assert meta['image_size'] == str(IMAGE)
    assert 'bilinear' in meta['resize'] and 'antialiased' in meta['resize']
    assert 'INTER_AREA' in meta['patch_read']
    assert run['workdir'] not in meta['resolution_source']   # the tiling, not the run
    assert json.loads(meta['normalization'])['mean'] == list(MEAN)
    # A .pth carries the same metadata beside it.
    with open(run['pth'] + '.json') as f:
        beside = json.load(f)
    for key in ('target_mpp', 'patch_size_px', 'field_of_view_um', 'resize', 'patch_read',
                'resolution_source', 'image_size', 'normalization'):
        assert beside[key] == meta[key], key


@pytest.mark.parametrize('which', ['demo', 'synthetic'])
def test_readme_preprocessing_reproduces_the_exported_features(run, which):
    """Coordinates of the export, patches read with OpenSlide, the README's preprocess,
    torchvision with the converted weights: the export's features."""
    snippet = readme_snippet()
    meta = snippet['read_metadata'](run['weights'])
    net = tiny_torchvision()
    net.load_state_dict(load_file(run['weights']), strict=True)
    net.eval()
    h5_file, = sorted(run['exports'][which].iterdir())
    with h5py.File(h5_file, 'r') as f:
        coords, features = f['coords'][()], f['features'][()]
        size = int(f['coords'].attrs['patch_size'])
        size0 = float(f['coords'].attrs['patch_size_level0'])
        slide_path = f.attrs['slide_path']
    picks = np.linspace(0, len(coords) - 1, 6).astype(int)
    slide = openslide.OpenSlide(slide_path)
    try:
        patches = [snippet['read_patch'](slide, int(x), int(y), size, size0)
                   for x, y in coords[picks]]
    finally:
        slide.close()
    assert patches[0].shape == (size, size, 3) and patches[0].dtype == np.uint8
    batch = torch.stack([snippet['preprocess'](p, meta) for p in patches])
    assert batch.shape == (len(picks), 3, IMAGE, IMAGE) and batch.dtype == torch.float32
    with torch.no_grad():
        got = net(batch).numpy()
    np.testing.assert_allclose(got, features[picks], rtol=0, atol=ATOL)
    if which == 'demo':
        # What the README said before (a native crop at image_size) is another input.
        crops = np.stack([p[:IMAGE, :IMAGE] for p in patches])
        with torch.no_grad():
            native = net(torch.stack([snippet['preprocess'](c, meta) for c in crops])).numpy()
        assert np.abs(native - features[picks]).max() > 100 * ATOL


def test_patch_files_have_no_mpp_and_say_so(tmp_path):
    folder = tmp_path / 'patches_png'
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 40, 3), 100 + i, np.uint8)).save(folder / f'p{i}.png')
    config = tiny_config()
    config.data.path = str(folder)
    found = to_torch.training_field_of_view(config)
    assert found['target_mpp'] == 'null' and found['patch_size_px'] == 'null'
    assert found['field_of_view_um'] == 'null'
    assert 'µm/px' in found['resolution_source'] and str(folder) in found['resolution_source']
    config.data.path = ''
    assert to_torch.training_field_of_view(config)['target_mpp'] == 'null'


# ------------------------------------------------------------- unwritable destinations

def one_error(capsys, code):
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    return lines[0]


@pytest.mark.parametrize('where, reason', [
    ('missing/w.safetensors', 'does not exist'),
    ('missing/deeper/w.pth', 'does not exist'),
    ('a_file.txt/w.safetensors', 'is a file'),
    ('a_file.txt/w.pth', 'is a file'),
])
def test_an_out_that_cannot_be_written_is_one_error_line(run, tmp_path, capsys, where,
                                                         reason):
    (tmp_path / 'a_file.txt').write_text('a file, not a folder')
    out = str(tmp_path / where)
    line = one_error(capsys, cli.main(['--mode', 'convert', 'to-torch', '--workdir',
                                       run['workdir'], '--out', out]))
    assert out in line and reason in line, line
    assert sorted(os.listdir(tmp_path)) == ['a_file.txt']   # nothing made


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='needs Linux /proc')
@pytest.mark.parametrize('name', ['w.safetensors', 'w.pth'])
def test_a_failed_write_is_one_error_line(run, capsys, name):
    """/proc takes no new files, even from root: the write itself fails."""
    out = f'/proc/clusiam_to_torch_test_{os.getpid()}_{name}'
    line = one_error(capsys, cli.main(['--mode', 'convert', 'to-torch', '--workdir',
                                       run['workdir'], '--out', out]))
    assert out in line and 'cannot write' in line, line
    assert not os.path.exists(out) and not os.path.exists(out + '.json')
