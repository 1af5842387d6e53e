"""PyTorch interop: importing original-format checkpoints and exporting torchvision weights.

Skipped without torch (pip install -r requirements-torch.txt). The "original" checkpoints
are built here with torchvision plus the heads of docs/method.md (tests/torch_reference.py),
carrying the original's key names, randomized BatchNorm statistics and a non-zero frozen
projector bias, so that every layout rule and the bias folding are exercised.
"""
import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('torchvision')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torchvision  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from clusiam_jax import convert, run_dir  # noqa: E402
from clusiam_jax.errors import ClusiamError, ConversionError  # noqa: E402
from clusiam_jax.interop import from_torch, read_weights, to_torch  # noqa: E402
from clusiam_jax.models import build_network, build_target_encoder  # noqa: E402
from tests import torch_reference as ref  # noqa: E402

SIZES = {'clusiam': dict(feat_size=32, pred_hidden=16, num_clusters=8),
         'clubyol': dict(feat_size=24, pred_hidden=48, num_clusters=6)}
IMAGE = 32
ATOL = 1e-4


def reference_model(method, seed=0):
    torch.manual_seed(seed)
    model = ref.ReferenceNetwork(method, 'resnet18', **SIZES[method])
    ref.randomize_(model, seed)
    if method == 'clubyol':
        ref.randomize_(model.target_encoder, seed + 1)   # a target that differs from the online
    return model.eval()


def save_original_checkpoint(model, path, wrap_module=True):
    """The original's save_checkpoint layout: {'epoch', 'state_dict', 'optimizer'}."""
    state_dict = model.state_dict()
    if wrap_module:  # DataParallel
        state_dict = {'module.' + k: v for k, v in state_dict.items()}
    optimizer = ref.make_sgd(model, 0.1, fix_pred_lr=True)
    torch.save({'epoch': 50, 'state_dict': state_dict,
                'optimizer': optimizer.state_dict()}, path)


def images(seed=0, n=4):
    return np.random.RandomState(seed).randn(n, IMAGE, IMAGE, 3).astype(np.float32)


def torch_images(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b.detach().numpy()))))


@pytest.fixture(scope='module', params=['clusiam', 'clubyol'])
def imported(request, tmp_path_factory):
    """(method, torch model, imported work directory) via the command line."""
    method = request.param
    tmp = tmp_path_factory.mktemp(method)
    model = reference_model(method)
    ckpt = str(tmp / 'checkpoint_0049.pth.tar')
    save_original_checkpoint(model, ckpt)
    out = str(tmp / 'run')
    assert convert.main(['from-torch', ckpt, '--out', out, '--model', method,
                         '--mean', '0.6684', '0.5115', '0.6791',
                         '--std', '0.2521', '0.2875', '0.2100']) == 0
    return method, model, out


def test_import_writes_a_work_directory(imported):
    method, _, out = imported
    run = run_dir.load_run(out)
    config, state = run.config, run.weights
    assert config.model.name == method
    assert config.model.backbone == 'resnet18'
    for key, value in SIZES[method].items():
        assert config.model[key] == value
    assert config.data.mean == (0.6684, 0.5115, 0.6791)
    assert int(state.step) == 0
    assert bool(state.target_params) == (method == 'clubyol')
    info = json.load(open(os.path.join(out, from_torch.IMPORT_INFO)))
    assert info['epoch'] == 50
    # The recipe's training settings come along (CluBYOL forces fix_pred_lr off).
    assert config.optim.fix_pred_lr == (method == 'clusiam')
    assert run.normalization.mean == (0.6684, 0.5115, 0.6791)
    # Weights only (no optimizer state): training starts from it with train.init_from,
    # whose reader finds every array of the online network there.
    source = read_weights.read_weights(out, config)
    online = run_dir.abstract_weights(config).online_variables
    assert set(source.arrays) == set(read_weights.variable_names(online))


def test_imported_network_matches_torch_in_inference(imported):
    """Features, projections, predictions and cluster logits, online and EMA target."""
    method, model, out = imported
    run = run_dir.load_run(out)
    config, state = run.config, run.weights
    network = build_network(config.model)
    x = images()
    with jax.default_matmul_precision('highest'):
        ours = network.apply({'params': state.params, 'batch_stats': state.batch_stats},
                             jnp.asarray(x), train=False)
    with torch.no_grad():
        theirs = model.view(torch_images(x))
    for name in ('features', 'z', 'p', 'logits'):
        assert max_diff(ours[name], theirs[name]) < ATOL, name
    if method == 'clubyol':
        target = build_target_encoder(network)
        with jax.default_matmul_precision('highest'):
            features, z = target.apply({'params': state.target_params,
                                        'batch_stats': state.target_batch_stats},
                                       jnp.asarray(x), train=False)
        with torch.no_grad():
            t_features = ref.resnet_features(model.target_encoder, torch_images(x))
            t_z = model.target_encoder(torch_images(x))
        assert max_diff(features, t_features) < ATOL
        assert max_diff(z, t_z) < ATOL


def test_export_loads_into_torchvision_strictly(imported, tmp_path, monkeypatch):
    """Flax -> safetensors (written with torch blocked) -> torchvision, strict=True."""
    method, model, out = imported
    backbone_file = str(tmp_path / 'backbone.safetensors')
    encoder_file = str(tmp_path / 'encoder.safetensors')
    with monkeypatch.context() as blocked:
        blocked.setitem(sys.modules, 'torch', None)   # `import torch` now fails
        assert convert.main(['to-torch', '--workdir', out, '--out', backbone_file]) == 0
        assert convert.main(['to-torch', '--workdir', out, '--out', encoder_file,
                             '--with-projector']) == 0

    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()
    net.load_state_dict(load_file(backbone_file), strict=True)
    encoder = ref.torch_encoder('resnet18', SIZES[method]['feat_size'])
    encoder.load_state_dict(load_file(encoder_file), strict=True)
    net.eval(), encoder.eval()
    x = torch_images(images(1))
    with torch.no_grad():
        assert float((net(x) - ref.resnet_features(model.encoder, x)).abs().max()) < ATOL
        assert float((encoder(x) - model.encoder(x)).abs().max()) < ATOL
    # The frozen bias is written as zeros; its value lives in fc.7's running mean.
    assert float(encoder.fc[6].bias.abs().max()) == 0.0
    from safetensors import safe_open
    with safe_open(backbone_file, 'np') as f:
        normalization = json.loads(f.metadata()['normalization'])
    assert normalization['mean'] == [0.6684, 0.5115, 0.6791]
    assert normalization['std'] == [0.2521, 0.2875, 0.2100]
    with safe_open(backbone_file, 'np') as f:
        assert f.metadata()['image_size'] == '224'
    # Readable by everyone the umask allows, like any file this user writes.
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(backbone_file).st_mode & 0o777 == 0o666 & ~umask


def test_pth_output_is_a_torch_file(imported, tmp_path):
    """.pth means torch.save: torch.load reads it (weights_only) into torchvision."""
    method, model, out = imported
    path = str(tmp_path / 'backbone.pth')
    assert convert.main(['to-torch', '--workdir', out, '--out', path]) == 0
    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()
    net.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch_images(images(1))
    with torch.no_grad():
        want = ref.resnet_features(model.encoder, x)
        assert float((net.eval()(x) - want).abs().max()) < ATOL
    assert json.load(open(path + '.json'))['method'] == method


def test_an_output_name_without_a_known_extension_is_refused(imported, tmp_path, capsys):
    _, _, out = imported
    assert convert.main(['to-torch', '--workdir', out, '--out', str(tmp_path / 'w.bin')]) == 2
    assert '.safetensors' in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_conversion_errors_are_one_line(imported, tmp_path, capsys):
    _, _, out = imported
    (tmp_path / 'folder').mkdir()
    (tmp_path / 'folder.safetensors').mkdir()
    assert convert.main(['to-torch', '--workdir', out, '--out',
                         str(tmp_path / 'folder.safetensors')]) == 2
    assert 'is a folder' in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ['folder', 'folder.safetensors']
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'not a checkpoint')
    assert convert.main(['from-torch', str(garbage), '--out', str(tmp_path / 'run')]) == 2
    assert 'not a PyTorch checkpoint' in capsys.readouterr().err


def test_export_target_encoder(imported, tmp_path):
    method, model, out = imported
    path = str(tmp_path / 'target.safetensors')
    if method != 'clubyol':
        assert convert.main(['to-torch', '--workdir', out, '--out', path, '--target']) == 2
        return
    assert convert.main(['to-torch', '--workdir', out, '--out', path, '--target']) == 0
    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()
    net.load_state_dict(load_file(path), strict=True)
    x = torch_images(images(2))
    with torch.no_grad():
        want = ref.resnet_features(model.target_encoder, x)
        assert float((net.eval()(x) - want).abs().max()) < ATOL


def test_round_trip_state_dict_keys():
    """Torch -> ours -> torch gives back exactly the original's keys and shapes."""
    model = reference_model('clubyol')
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    _, state = from_torch.import_state_dict(state_dict)
    back = to_torch.network_state_dict(state.params, state.batch_stats, state.target_params,
                                       state.target_batch_stats)
    assert sorted(back) == sorted(state_dict)
    for key, value in state_dict.items():
        assert back[key].shape == value.shape, key
        if key.endswith(('fc.6.bias', 'fc.7.running_mean', 'num_batches_tracked')):
            continue    # the folded bias (checked by the forward tests) and the counter
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    model = reference_model('clusiam')
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    del state_dict['encoder.layer3.1.bn2.running_var']
    del state_dict['predictor.3.bias']
    state_dict['encoder.fc.9.weight'] = np.zeros((3, 3), np.float32)
    with pytest.raises(ConversionError) as error:
        from_torch.import_state_dict(state_dict)
    message = str(error.value)
    for key in ('encoder.layer3.1.bn2.running_var', 'predictor.3.bias', 'encoder.fc.9.weight'):
        assert key in message
    assert 'missing keys (2)' in message and 'unexpected keys (1)' in message


def test_shape_mismatch_and_wrong_model_fail(tmp_path):
    model = reference_model('clusiam')
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    state_dict['cluster_projector.1.weight'] = np.ones((7,), np.float32)
    with pytest.raises(ConversionError, match='cluster_projector.1.weight'):
        from_torch.import_state_dict(state_dict)
    with pytest.raises(ConversionError, match='clusiam'):
        from_torch.import_state_dict(state_dict, model='clubyol')
    # The command line reports it in one line per problem and exits 2, writing nothing.
    path = str(tmp_path / 'bad.pth')
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path)
    out = str(tmp_path / 'run')
    assert convert.main(['from-torch', path, '--out', out]) == 2
    assert not os.path.exists(os.path.join(out, 'checkpoints'))


def test_refuses_a_non_checkpoint(tmp_path):
    path = str(tmp_path / 'weird.pth')
    torch.save({'epoch': 3, 'something': [1, 2]}, path)
    with pytest.raises(ConversionError):
        read_weights.load_state_dict_file(path)


class _Payload:
    """A pickle that runs a command when loaded: what a hostile .pth file holds."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


@pytest.mark.parametrize('entry', ['convert', 'init_from'])
def test_a_checkpoint_that_runs_code_when_unpickled_is_refused(tmp_path, capsys, entry):
    """`convert from-torch` and `train.init_from` read checkpoints with weights_only: a
    pickle carrying code is one error line and its code never runs."""
    import pickle

    from clusiam_jax import cli
    marker = tmp_path / 'the_payload_ran'
    evil = tmp_path / 'model.pth'
    with open(evil, 'wb') as f:
        pickle.dump({'state_dict': _Payload(marker)}, f)
    if entry == 'convert':
        code = cli.main(['--mode', 'convert', 'from-torch', str(evil), '--out',
                         str(tmp_path / 'run')])
        err = capsys.readouterr().err
        assert code == 2 and err.count('error:') == 1 and 'Traceback' not in err, err
    else:
        with pytest.raises(ClusiamError):
            read_weights.read_weights(str(evil), None)
    assert not marker.exists()


def test_an_import_stopped_while_writing_leaves_no_half_run(tmp_path, monkeypatch):
    """A signal (or a full disk) while `convert from-torch` writes its checkpoint left
    config.json and an empty checkpoints/ under --out: the suggested rerun was refused,
    and training there would have started from random weights."""
    import signal

    from clusiam_jax import interrupts
    from clusiam_jax.checkpoint import Checkpointer
    ckpt = str(tmp_path / 'checkpoint.pth.tar')
    save_original_checkpoint(reference_model('clusiam'), ckpt)
    out = str(tmp_path / 'run')

    def stopped(self, *args, **kwargs):
        raise interrupts.Interrupted(signal.SIGTERM)
    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, 'save', stopped)
        code = convert.main(['from-torch', ckpt, '--out', out, '--model', 'clusiam'])
    assert code == 128 + signal.SIGTERM  # 'stopped by SIGTERM', as any command but train
    assert not os.path.exists(out) and os.listdir(tmp_path) == ['checkpoint.pth.tar']
    assert convert.main(['from-torch', ckpt, '--out', out, '--model', 'clusiam']) == 0
    assert int(run_dir.load_run(out).step) == 0


def test_a_bucket_url_as_from_torch_out_or_to_torch_out_is_one_line(imported, tmp_path,
                                                                    capsys, monkeypatch):
    """os.path would write (or look for) a local './gs:' folder: refused, nothing written."""
    _, _, out = imported
    ckpt = str(tmp_path / 'c.pth.tar')
    save_original_checkpoint(reference_model('clusiam'), ckpt)
    monkeypatch.chdir(tmp_path)
    for url in ('gs://b/run', 's3://b/run'):
        assert convert.main(['from-torch', ckpt, '--out', url]) == 2
        err = capsys.readouterr().err
        assert 'writes a local folder only' in err and err.count('\n') == 1
        assert convert.main(['from-torch', url + '/c.pth', '--out', 'run']) == 2
        assert 'reads a local checkpoint file only' in capsys.readouterr().err
        assert convert.main(['to-torch', '--workdir', out, '--out',
                             url + '/w.safetensors']) == 2
        err = capsys.readouterr().err
        assert 'writes a local file only' in err and err.count('\n') == 1
    assert sorted(os.listdir(tmp_path)) == ['c.pth.tar']
