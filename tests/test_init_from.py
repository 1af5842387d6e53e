"""train.init_from: a fresh run starts from existing weights (torchvision/timm state_dicts
in .pth or .safetensors, the original's checkpoints, runs of ours) with step 0, a fresh
optimizer and the log naming what was loaded; a resumed run never applies it again.

The torchvision and original-checkpoint tests need torch (skipped without it); the runs
of ours and the safetensors files written by `convert to-torch` need none.
"""
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from clusiam_jax import run_dir
from clusiam_jax.config import validate
from clusiam_jax.errors import ConfigError, ConversionError
from clusiam_jax.interop import read_weights as torch_init
from clusiam_jax.interop import to_torch
from clusiam_jax.train import init_from
from clusiam_jax.train.loop import train
from clusiam_jax.train.trainer import build_trainer
from tests.helpers import SyntheticLoader, assert_trees_equal, mesh_of, tiny_config

SIZES = dict(steps_per_epoch=2, num_epochs=1, batch_size=8, image_size=32)
ATOL = 1e-4


def trainer_for(config, init_from_path=''):
    config.train.init_from = init_from_path
    validate(config, check_data_path=False)
    return build_trainer(config, mesh_of(1), SIZES['steps_per_epoch'], SyntheticLoader.mean,
                         SyntheticLoader.std)


def online(state):
    return jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})


def names(tree):
    return set(init_from.variable_names(tree))


@pytest.fixture(scope='module')
def source_run(tmp_path_factory):
    """A CluBYOL run of ours (tiny) at step 7 whose weights differ from any fresh init
    and whose EMA target differs from its online encoder."""
    config = tiny_config('clubyol')
    config.train.seed = 5
    trainer = trainer_for(config)
    state = trainer.init_state()
    bump = lambda tree, by: jax.tree.map(lambda x: x + by, tree)
    state = state.replace(step=jnp.asarray(7, jnp.int32),
                          batch_stats=bump(state.batch_stats, 0.25),
                          target_params=bump(state.target_params, 1.0))
    workdir = str(tmp_path_factory.mktemp('source') / 'run')
    run_dir.write_run(workdir, config, state)
    return workdir, jax.device_get(state)


# ------------------------------------------------------------------ runs of ours

def test_a_run_of_ours_loads_every_array_with_a_fresh_start(source_run, caplog):
    source, saved = source_run
    trainer = trainer_for(tiny_config('clubyol'), source)
    fresh = jax.device_get(trainer.init_state())
    for path in (source, os.path.join(source, 'checkpoints', '7')):
        trainer.config.train.init_from = path
        with caplog.at_level(logging.INFO, logger='clusiam_jax'):
            state, report = init_from.initial_state(trainer)
        state = jax.device_get(state)
        assert report.fresh == () and report.unused == () and report.misshapen == ()
        assert set(report.loaded) == names(online(saved))
        assert_trees_equal(online(state), online(saved))
        assert jax.tree.structure(online(state)) == jax.tree.structure(online(saved))
        # A fresh start around them: step 0, zero momentum, the seed's rng, and the
        # target a copy of the loaded online encoder (not the source's target).
        assert int(state.step) == 0
        assert_trees_equal(state.opt_state, fresh.opt_state)
        np.testing.assert_array_equal(state.rng, fresh.rng)
        assert_trees_equal(state.target_params, saved.params['encoder'])
        assert_trees_equal(state.target_batch_stats, saved.batch_stats['encoder'])
    assert f'loaded {len(report.loaded)} of {len(report.loaded)} arrays' in caplog.text
    assert 'everything' in caplog.text and 'freshly initialised 0: none' in caplog.text


def test_heads_that_do_not_fit_stay_fresh(source_run, caplog):
    source, saved = source_run
    config = tiny_config('clubyol')
    config.model.num_clusters = 5    # the source has 8: the assigner cannot load
    trainer = trainer_for(config, source)
    fresh = online(trainer.init_state())
    with caplog.at_level(logging.INFO, logger='clusiam_jax'):
        state, report = init_from.initial_state(trainer)
    assert report.fresh == ('params/cluster_head/assigner/bias',
                            'params/cluster_head/assigner/kernel')
    assert len(report.misshapen) == 2
    state = online(state)
    np.testing.assert_array_equal(state['params']['cluster_head']['assigner']['kernel'],
                                  fresh['params']['cluster_head']['assigner']['kernel'])
    assert_trees_equal(state['params']['encoder'], saved.params['encoder'])
    assert_trees_equal(state['params']['predictor'], saved.params['predictor'])
    assert 'freshly initialised 2: cluster_head/assigner (2)' in caplog.text
    assert 'shapes differ' in caplog.text


def test_a_run_with_another_backbone_is_refused(source_run):
    source, _ = source_run
    config = tiny_config('clubyol')
    config.model.backbone = 'resnet18'
    trainer = trainer_for(config, source)
    with pytest.raises(ConfigError, match='resnet_tiny backbone; this run trains a resnet18'):
        init_from.initial_state(trainer)


def test_the_loop_applies_it_at_a_fresh_start_only(source_run, tmp_path, caplog, monkeypatch):
    source, saved = source_run
    config = tiny_config('clubyol', num_epochs=1)
    config.train.init_from = source
    workdir = str(tmp_path / 'run')
    calls = []

    def reader(path, cfg):
        calls.append(path)
        return torch_init.read_weights(path, cfg)

    monkeypatch.setattr(init_from, 'read_weights', reader)
    with caplog.at_level(logging.INFO, logger='clusiam_jax'):
        first = train(config, workdir, SyntheticLoader(**SIZES), mesh_of(1))
    assert calls == [source] and int(first.step) == 2
    assert 'train.init_from: loaded' in caplog.text
    caplog.clear()

    def never(path, cfg):
        raise AssertionError('init_from applied to a resumed run')

    config.train.num_epochs = 2
    loader = SyntheticLoader(**dict(SIZES, num_epochs=2))
    monkeypatch.setattr(init_from, 'read_weights', never)
    with caplog.at_level(logging.INFO, logger='clusiam_jax'):
        resumed = train(config, workdir, loader, mesh_of(1))
    assert int(resumed.step) == 4
    assert 'is not applied: this run resumes' in caplog.text
    assert 'train.init_from: loaded' not in caplog.text


# ------------------------------------------------------------- safetensors, no torch

def test_safetensors_from_to_torch_loads_the_backbone(source_run, tmp_path, caplog):
    """`convert to-torch` output (torchvision keys, .safetensors) read back without torch."""
    source, saved = source_run
    path = str(tmp_path / 'backbone.safetensors')
    to_torch.write_torch_weights(source, path)
    trainer = trainer_for(tiny_config('clusiam'), path)
    with caplog.at_level(logging.INFO, logger='clusiam_jax'):
        state, report = init_from.initial_state(trainer)
    state = online(state)
    assert_trees_equal(state['params']['encoder']['backbone'],
                       saved.params['encoder']['backbone'])
    assert_trees_equal(state['batch_stats']['encoder']['backbone'],
                       saved.batch_stats['encoder']['backbone'])
    assert all(name.split('/')[1:3] == ['encoder', 'backbone'] for name in report.loaded)
    assert {name.split('/')[1] for name in report.fresh} == {'encoder', 'predictor',
                                                             'cluster_head'}
    assert report.source.kind == torch_init.TORCHVISION
    assert 'encoder/backbone (' in caplog.text
    assert 'encoder/projector (' in caplog.text and 'cluster_head (' in caplog.text


def test_bad_files_are_one_line_errors(source_run, tmp_path):
    source, saved = source_run
    trainer = trainer_for(tiny_config('clusiam'))
    weights = to_torch.backbone_state_dict(saved.params['encoder'],
                                           saved.batch_stats['encoder'])

    def refused(path, error, match):
        trainer.config.train.init_from = path
        with pytest.raises(error, match=match) as raised:
            init_from.initial_state(trainer)
        assert '\n' not in str(raised.value)

    garbage = tmp_path / 'garbage.safetensors'
    garbage.write_bytes(b'not a checkpoint at all')
    refused(str(garbage), ConversionError, 'not a safetensors file')
    other = str(tmp_path / 'other.safetensors')
    save_file({'head.weight': np.zeros((2, 2), np.float32)}, other)
    refused(other, ConversionError, 'neither a torchvision')
    misshapen = dict(weights)
    misshapen['layer1.0.conv1.weight'] = np.zeros((8, 8, 1, 1), np.float32)
    bad = str(tmp_path / 'misshapen.safetensors')
    save_file(misshapen, bad)
    refused(bad, ConfigError, r'does not fit .*layer1\.0\.conv1\.weight')


def test_config_checks():
    config = tiny_config()
    config.train.init_from = '/no/such/weights.pth'
    with pytest.raises(ConfigError, match='train.init_from does not exist'):
        validate(config, check_data_path=False)
    config.train.init_from = config.train.resume_from = os.path.dirname(__file__)
    with pytest.raises(ConfigError, match='not both'):
        validate(config, check_data_path=False)


# ------------------------------------------------------------------ with torch

def _torch_images(x):
    import torch
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _max_diff(ours, theirs):
    return float(np.max(np.abs(np.asarray(ours) - theirs.detach().numpy())))


def _apply(trainer, state, x):
    with jax.default_matmul_precision('highest'):
        return trainer.network.apply({'params': state.params, 'batch_stats': state.batch_stats},
                                     jnp.asarray(x), train=False)


def test_torchvision_weights_give_torchvision_features(tmp_path, caplog):
    torch = pytest.importorskip('torch')
    torchvision = pytest.importorskip('torchvision')
    from safetensors.torch import save_file as save_torch_file

    from tests import torch_reference as ref
    torch.manual_seed(0)
    net = ref.randomize_(torchvision.models.resnet18(weights=None), 0).eval()
    pth, safetensors = str(tmp_path / 'resnet18.pth'), str(tmp_path / 'resnet18.safetensors')
    torch.save(net.state_dict(), pth)
    save_torch_file(net.state_dict(), safetensors)
    config = tiny_config('clusiam')
    config.model.backbone = 'resnet18'
    trainer = trainer_for(config)
    x = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
    with torch.no_grad():
        want = ref.resnet_features(net, _torch_images(x))
    trainer.config.train.init_from = pth
    with caplog.at_level(logging.INFO, logger='clusiam_jax'):
        state, report = init_from.initial_state(trainer)
    assert int(state.step) == 0
    assert _max_diff(_apply(trainer, state, x)['features'], want) < ATOL
    backbone = {n for n in names(online(state)) if n.split('/')[1:3] == ['encoder', 'backbone']}
    assert set(report.loaded) == backbone
    assert set(report.fresh) == names(online(state)) - backbone
    assert report.unused == ('fc.bias', 'fc.weight')
    assert f'loaded {len(backbone)} of' in caplog.text
    assert f'encoder/backbone ({len(backbone)})' in caplog.text
    assert ('freshly initialised' in caplog.text and 'encoder/projector (' in caplog.text
            and 'predictor (' in caplog.text and 'cluster_head (' in caplog.text)
    assert 'not used from the source (2): fc.bias, fc.weight' in caplog.text
    # The same weights as .safetensors (read without torch) give the same arrays.
    from_safetensors = torch_init.read_weights(safetensors, config)
    assert from_safetensors.arrays.keys() == report.source.arrays.keys()
    for name, value in report.source.arrays.items():
        np.testing.assert_array_equal(from_safetensors.arrays[name], value, err_msg=name)
    assert from_safetensors.unused == report.unused


def test_original_checkpoint_loads_backbone_and_heads(tmp_path, caplog):
    torch = pytest.importorskip('torch')
    pytest.importorskip('torchvision')
    from tests import torch_reference as ref
    sizes = dict(feat_size=24, pred_hidden=48, num_clusters=6)
    torch.manual_seed(0)
    model = ref.ReferenceNetwork('clubyol', 'resnet18', **sizes)
    ref.randomize_(model, 0)
    ref.randomize_(model.target_encoder, 1)
    model.eval()
    path = str(tmp_path / 'checkpoint_0049.pth.tar')
    torch.save({'epoch': 50,
                'state_dict': {'module.' + k: v for k, v in model.state_dict().items()},
                'optimizer': ref.make_sgd(model, 0.1).state_dict()}, path)
    config = tiny_config('clubyol')
    config.model.backbone = 'resnet18'
    config.model.update(sizes)
    trainer = trainer_for(config, path)
    with caplog.at_level(logging.INFO, logger='clusiam_jax'):
        state, report = init_from.initial_state(trainer)
    assert report.fresh == () and report.misshapen == ()
    assert report.source.kind == torch_init.ORIGINAL
    assert all(name.startswith('target_encoder.') for name in report.unused)
    x = np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32)
    ours = _apply(trainer, state, x)
    with torch.no_grad():
        theirs = model.view(_torch_images(x))
    for key in ('features', 'z', 'p', 'logits'):
        assert _max_diff(ours[key], theirs[key]) < ATOL, key
    assert_trees_equal(state.target_params, state.params['encoder'])
    assert 'not used from the source' in caplog.text and 'target_encoder.* (' in caplog.text


def test_a_resnet50_state_dict_into_a_resnet18_is_refused(tmp_path):
    torch = pytest.importorskip('torch')
    torchvision = pytest.importorskip('torchvision')
    path = str(tmp_path / 'resnet50.pth')
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'not a checkpoint')
    config = tiny_config('clusiam')
    config.model.backbone = 'resnet18'
    for file, match in ((path, 'holds a resnet50 backbone; this run trains a resnet18'),
                        (str(garbage), 'not a PyTorch checkpoint')):
        with pytest.raises(ConversionError, match=match) as raised:
            torch_init.read_weights(file, config)
        assert '\n' not in str(raised.value)
