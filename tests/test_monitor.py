"""Monitoring without labels: the scores against NumPy references, the held-out set, the
same embedding on 1 and 8 devices, collapse flags, the best checkpoint and export of it,
resume across a monitor epoch, stop on collapse."""
import csv
import itertools
import json
import os
import signal

import jax
import numpy as np
import pytest

from clusiam_jax import data, interrupts, run_dir
from clusiam_jax.export import run as export_run
from clusiam_jax.train import monitor as monitor_lib
from clusiam_jax.train.loop import train
from tests.helpers import (
    MEAN,
    STD,
    PreemptedLoader,
    SyntheticLoader,
    assert_trees_equal,
    data_config,
    mesh_of,
    tiny_config,
    write_patches,
)

SIZES = dict(steps_per_epoch=2, num_epochs=3, batch_size=8, image_size=32)


# ----------------------------------------------------------------------- scores

def test_rankme_against_eigenvalues():
    rng = np.random.default_rng(0)
    for z in (rng.normal(size=(256, 16)),                       # isotropic: ~16
              np.outer(rng.normal(size=256), rng.normal(size=16)),  # rank 1: ~1
              rng.normal(size=(256, 4)) @ rng.normal(size=(4, 16))):  # rank 4: <= 4
        eig = np.clip(np.linalg.eigvalsh(z.T @ z), 0, None)
        sigma = np.sqrt(eig)
        p = sigma / sigma.sum() + 1e-7
        assert monitor_lib.rankme(z) == pytest.approx(np.exp(-(p * np.log(p)).sum()),
                                                      rel=1e-6)
    assert monitor_lib.rankme(rng.normal(size=(256, 16))) > 14
    assert monitor_lib.rankme(np.outer(rng.normal(size=256), rng.normal(size=16))) < 1.01


def test_alignment_and_uniformity_against_loops():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(12, 5)), rng.normal(size=(12, 5))
    na = a / np.linalg.norm(a, axis=1, keepdims=True)
    nb = b / np.linalg.norm(b, axis=1, keepdims=True)
    align = np.mean([np.sum((x - y) ** 2) for x, y in zip(na, nb)])
    assert monitor_lib.alignment(a, b) == pytest.approx(align)
    pairs = [np.exp(-2 * np.sum((na[i] - na[j]) ** 2))
             for i, j in itertools.permutations(range(12), 2)]
    assert monitor_lib.uniformity(a) == pytest.approx(np.log(np.mean(pairs)))
    # Identical views align perfectly; one point repeated is as un-uniform as it gets.
    assert monitor_lib.alignment(a, a) == pytest.approx(0, abs=1e-12)
    assert monitor_lib.uniformity(np.ones((6, 5))) == pytest.approx(0, abs=1e-9)


def test_knn_scores_split_by_slide():
    slides = np.array(['a', 'a', 'b', 'b', 'c', 'c', 'd', 'd'], dtype=object)
    labels = np.array(['x', 'y'] * 4, dtype=object)
    features = np.array([[1, 0], [0, 1]] * 4, float)
    out = monitor_lib.knn_scores(features, labels, slides)
    assert out == {'knn_top1': 1.0, 'knn_balanced': 1.0}
    shuffled = np.array(['y', 'x'] * 2 + ['x', 'y'] * 2, dtype=object)
    assert monitor_lib.knn_scores(features, shuffled, slides)['knn_top1'] == 0.0


# ------------------------------------------------------------------ monitor set

@pytest.fixture(scope='module')
def patches(tmp_path_factory):
    root = tmp_path_factory.mktemp('monitor_patches')
    write_patches(str(root), 36)
    return root


def test_held_out_slides_never_train(patches):
    cfg = data_config(patches, mean=MEAN, std=STD, batch=4)
    cfg.monitor = tiny_config().monitor
    cfg.monitor.every_epochs, cfg.monitor.holdout = 1, 0.34
    loader = data.create_train_loader(cfg)
    held = loader.held_out
    trained = {loader.source.path(i) for i in range(len(loader.source))}
    held_paths = {held.path(i) for i in range(len(held))}
    assert held_paths and not trained & held_paths
    assert len(trained) + len(held_paths) == 36
    slide_of = os.path.dirname
    assert not {slide_of(p) for p in trained} & {slide_of(p) for p in held_paths}


def _monitor(config, patches, mesh, min_rankme=2.0):
    from clusiam_jax.data import sources as sources_lib
    from clusiam_jax.train.trainer import build_trainer
    trainer = build_trainer(config, mesh, 2, SyntheticLoader.mean, SyntheticLoader.std)
    source = sources_lib.open_source(str(patches))
    chosen = monitor_lib.sample_indices(len(source), 16, 0)
    mset = monitor_lib.build_monitor_set(source, chosen, config, 0)
    mon = monitor_lib.Monitor(trainer.network, trainer.mean, trainer.std, mset, mesh,
                              config.model.num_clusters, min_rankme, 0)
    return trainer, mon


def test_monitor_embedding_is_the_same_on_1_and_8_devices(patches):
    config = tiny_config('clusiam')
    trainer1, mon1 = _monitor(config, patches, mesh_of(1))
    trainer8, mon8 = _monitor(config, patches, mesh_of(8))
    state = trainer1.init_state()
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    one, eight = mon1.embed_all(variables), mon8.embed_all(variables)
    assert one['features'].shape[0] == 48   # 16 patches and two views of each
    for key in one:
        np.testing.assert_allclose(one[key], eight[key], rtol=1e-5, atol=1e-5)
    scores = mon1.scores(variables)
    assert {'rankme', 'alignment', 'uniformity', 'active_clusters', 'gumbel_agreement',
            'knn_top1', 'collapse'} <= set(scores)


def test_a_collapsed_encoder_is_flagged(patches):
    config = tiny_config('clusiam')
    trainer, mon = _monitor(config, patches, mesh_of(1))
    state = trainer.init_state()
    zeroed = jax.tree.map(np.zeros_like, state.params)   # every feature the same
    scores = mon.scores({'params': zeroed, 'batch_stats': state.batch_stats})
    assert scores['rankme'] < 1.5 and scores['collapse'] == 1.0
    assert any('RankMe' in w for w in mon.warnings)


# ------------------------------------------------------------------ in training

def _config(patches, **train):
    c = tiny_config('clusiam', num_epochs=SIZES['num_epochs'])
    c.monitor.every_epochs, c.monitor.data_path, c.monitor.num_patches = 1, str(patches), 16
    c.train.checkpoint_every_epochs = 0
    for key, value in train.items():
        c.train[key] = value
    return c


def _rows(workdir):
    with open(os.path.join(workdir, 'metrics.csv')) as f:
        return list(csv.DictReader(f))


def test_best_checkpoint_kept_beside_latest_and_exported(patches, tmp_path):
    config = _config(patches, best_metric='monitor/uniformity', best_mode='min',
                     keep_checkpoints=1)
    workdir = str(tmp_path / 'run')
    train(config, workdir, SyntheticLoader(**SIZES), mesh_of(1))
    rows = _rows(workdir)
    values = [float(r['monitor_uniformity']) for r in rows]
    assert len(values) == 3 and all(r['monitor_rankme'] for r in rows)
    best = run_dir.read_best(workdir)
    assert best['value'] == pytest.approx(min(values), rel=1e-6)
    assert best['step'] == int(rows[int(np.argmin(values))]['step'])
    assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['6']
    assert os.listdir(os.path.join(workdir, 'best_checkpoint')) == [str(best['step'])]
    # Export reads the best one when asked, and says so.
    exp = config.export.copy_and_resolve_references()
    exp.data_path, exp.out_dir, exp.checkpoint = str(patches), str(tmp_path / 'e'), 'best'
    export_run.export(workdir, exp, run_dir.Normalization(SyntheticLoader.mean,
                                                          SyntheticLoader.std, 'test'))
    info = json.loads((tmp_path / 'e' / 'export_info.json').read_text())
    assert info['checkpoint_step'] == best['step']
    assert info['checkpoint'].startswith(f"best: step {best['step']} by monitor/uniformity")
    assert run_dir.load_run(workdir, 'best').step == best['step']


def test_resume_after_a_monitor_epoch_is_exact(patches, tmp_path):
    config = _config(patches, best_metric='monitor/rankme')
    reference = jax.device_get(train(config, str(tmp_path / 'straight'),
                                     SyntheticLoader(**SIZES), mesh_of(1)))
    workdir = str(tmp_path / 'stopped')
    train(config, workdir, PreemptedLoader(at=3, signum=signal.SIGTERM, **SIZES), mesh_of(1))
    assert interrupts.received() == signal.SIGTERM
    resumed = jax.device_get(train(config, workdir, SyntheticLoader(**SIZES), mesh_of(1)))
    assert_trees_equal(resumed, reference)
    straight, stopped = _rows(str(tmp_path / 'straight')), _rows(workdir)
    assert [r['monitor_rankme'] for r in stopped] == [r['monitor_rankme'] for r in straight]


def test_stop_on_collapse_ends_with_a_checkpoint(patches, tmp_path):
    config = _config(patches, stop_on_collapse=True)
    config.monitor.min_rankme = 1e9     # any encoder is "collapsed" by this bar
    workdir = str(tmp_path / 'run')
    state = train(config, workdir, SyntheticLoader(**SIZES), mesh_of(1))
    assert int(state.step) == 2        # stopped after the first epoch
    assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['2']
    assert _rows(workdir)[0]['monitor_collapse'] == '1.0'


def test_a_collapsed_state_is_never_kept_as_best(patches, tmp_path):
    config = tiny_config('clusiam')
    config.train.best_metric = 'monitor/alignment'   # a collapsed encoder aligns perfectly
    config.monitor.data_path, config.monitor.num_patches = str(patches), 8
    trainer, _ = _monitor(config, patches, mesh_of(1))
    best = monitor_lib.MonitorHook(config, str(tmp_path), trainer)
    assert best.mode == 'min'                       # the metric's own direction
    best.offer(3, 1, {'alignment': 0.0, 'collapse': 1.0}, None, None)
    assert best.best_value is None and run_dir.read_best(str(tmp_path)) is None
    best.close()


@pytest.mark.parametrize('keys, message', [
    ({'monitor.holdout': 0.1}, 'set monitor.every_epochs too'),
    ({'monitor.every_epochs': 1, 'monitor.holdout': 0.1, 'train.best_metric':
      'monitor/active_clusters', 'model.name': 'simsiam', 'loss.alpha': 0.0},
     'simsiam has no cluster head'),
    ({'monitor.every_epochs': 1}, 'needs a monitor set'),
    ({'train.best_metric': 'monitor/rankme'}, 'need the monitor'),
    ({'train.best_metric': 'rankme'}, 'must be one of'),
    ({'export.after_training': True, 'export.checkpoint': 'best'},
     'needs train.best_metric'),
    ({'export.checkpoint': 'newest'}, "'latest', 'best' or a step"),
])
def test_monitor_config_errors(tmp_path, keys, message):
    from clusiam_jax.config import validate
    from clusiam_jax.errors import ConfigError
    config = tiny_config('clusiam')
    config.data.path = str(tmp_path)
    for key, value in keys.items():
        section, name = key.split('.')
        config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        validate(config)
