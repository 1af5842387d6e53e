"""The demo config end to end through launch.py, at a reduced size: tiles the shipped
slide, trains on its patches read from the slide, writes checkpoints, a CSV, TensorBoard
events and its log, resumes when started again (naming what changed), and exports without
--config."""
import csv
import json
import os
import shlex
import subprocess
import sys

from tests.helpers import REPO, subprocess_env

# 42 tiles / batch 16 = 2 steps per epoch; the tiny backbone keeps compiles short.
REDUCED = ['--config.model.backbone=resnet_tiny', '--config.data.image_size=32',
           '--config.train.batch_size=16', '--config.train.checkpoint_every_epochs=1']


def launch(workdir, *args, recipe=('--config', 'configs/demo.py'), reduced=REDUCED):
    cmd = [sys.executable, 'launch.py', *recipe] + (['--workdir', str(workdir)] if workdir
                                                    else []) + reduced + list(args)
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                         env=subprocess_env())
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr + out.stdout


def csv_rows(workdir):
    with open(workdir / 'metrics.csv') as f:
        return list(csv.DictReader(f))


def test_demo_tiles_trains_checkpoints_and_resumes(tmp_path):
    tiles = tmp_path / 'my tiles'  # paths with spaces, as users have them
    log = launch(None, '--mode', 'tile', f'--config.tile.out_dir={tiles}', reduced=[])
    # The next command is printed ready to paste: the shell gives back the path whole.
    hint, = [line for line in log.splitlines() if 'tiled into' in line]
    assert f'--config.data.path={tiles}' in shlex.split(hint.split('train on them: ')[1])
    with open(tiles / 'slides.csv') as f:
        row, = list(csv.DictReader(f))
    assert row['status'] == 'tiled' and int(row['n_patches']) > 32
    assert (tiles / 'masks' / 'cmu-1-small-region.png').exists()
    workdir = tmp_path / 'demo run'
    log = launch(workdir, '--config.train.num_epochs=2', f'--config.data.path={tiles}')
    rows = csv_rows(workdir)
    assert [r['epoch'] for r in rows] == ['1', '2']
    assert all(float(r['loss']) == float(r['loss']) for r in rows)  # no NaN
    # Collapse diagnostics are logged: at least one cluster in use, at most K (10).
    assert all(1 <= float(r['active_clusters']) <= 10 for r in rows)
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
    assert any(name.startswith('events') for name in os.listdir(workdir / 'tb'))
    assert 'resuming' not in log
    # The demo's own export (export.after_training) ran, with its cluster map.
    assert (workdir / 'export' / 'cluster_maps' / 'cmu-1-small-region.png').exists()
    # What a newcomer sees first: no backend probing, no collapse warning, no traceback.
    for noise in ("backend 'tpu'", 'collapse mode', 'Traceback'):
        assert noise not in log, noise
    logged = (workdir / 'log.txt').read_text()
    assert 'compiling the train step' in logged and 'compiled in' in logged
    assert 'epoch 2/2:' in logged and 'tensorboard --logdir' in logged
    # The closing line: the run is complete, and what to run next, ready to paste.
    closing, = [line for line in logged.splitlines() if 'run complete:' in line]
    next_command = shlex.split(closing.split('next: ')[1])
    assert next_command[:4] == ['python', 'launch.py', '--mode', 'eval']
    assert next_command[5:7] == ['--export', str(workdir / 'export')]
    normalization = json.loads((workdir / 'normalization.json').read_text())
    assert len(normalization['mean']) == 3 and 'computed over the training list' in \
        normalization['origin']

    # Started again with more epochs: continues from step 4, epoch 3 only.
    log = launch(workdir, '--config.train.num_epochs=3', f'--config.data.path={tiles}')
    assert 'resuming from the checkpoint at step 4 of 6 (epoch 3 of 3, 0 steps in)' in log
    assert 'train.num_epochs: 2 -> 3' in log
    assert [r['epoch'] for r in csv_rows(workdir)] == ['1', '2', '3']
    assert '6' in os.listdir(workdir / 'checkpoints')

    # A finished run says so and exits 0 without training.
    log = launch(workdir, '--config.train.num_epochs=3', f'--config.data.path={tiles}')
    assert 'is complete (step 6 of 6)' in log
    assert len(csv_rows(workdir)) == 3


def test_export_needs_no_config(tmp_path, demo_tiles):
    """A finished run exports with only --workdir: model, size and normalization are the
    run's; export-section overrides apply."""
    workdir = tmp_path / 'demo'
    launch(workdir, '--config.train.num_epochs=1', '--config.export.after_training=False',
           f'--config.data.path={demo_tiles}')
    launch(workdir, '--mode', 'export', f'--config.export.out_dir={tmp_path / "out"}',
           '--config.export.with_projection=True', recipe=(), reduced=[])
    info = json.loads((tmp_path / 'out' / 'export_info.json').read_text())
    with open(os.path.join(demo_tiles, 'slides.csv')) as f:
        n_patches = int(next(csv.DictReader(f))['n_patches'])
    assert info['with_projection'] and info['n_patches'] == n_patches
    assert info['format'] == 'h5' and info['image_size'] == 32
