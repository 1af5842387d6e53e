"""The demo config end to end through launch.py, at a reduced size: trains on the shipped
tiles, writes checkpoints, a CSV and TensorBoard events, and resumes when started again."""
import csv
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 42 tiles / batch 16 = 2 steps per epoch; the tiny backbone keeps compiles short.
REDUCED = ['--config.model.backbone=resnet_tiny', '--config.data.image_size=32',
           '--config.train.batch_size=16', '--config.train.checkpoint_every_epochs=1']


def launch(workdir, *args):
    cmd = [sys.executable, 'launch.py', '--config', 'configs/demo.py', '--workdir',
           str(workdir)] + REDUCED + list(args)
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr + out.stdout


def csv_rows(workdir):
    with open(workdir / 'metrics.csv') as f:
        return list(csv.DictReader(f))


def test_demo_trains_checkpoints_and_resumes(tmp_path):
    workdir = tmp_path / 'demo'
    log = launch(workdir, '--config.train.num_epochs=2')
    rows = csv_rows(workdir)
    assert [r['epoch'] for r in rows] == ['1', '2']
    assert all(float(r['loss']) == float(r['loss']) for r in rows)  # no NaN
    # Collapse diagnostics are logged: at least one cluster in use, at most K (10).
    assert all(1 <= float(r['active_clusters']) <= 10 for r in rows)
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
    assert any(name.startswith('events') for name in os.listdir(workdir / 'tb'))
    assert 'resuming' not in log

    # Started again with more epochs: continues from step 4, epoch 3 only.
    log = launch(workdir, '--config.train.num_epochs=3')
    assert 'resuming from the checkpoint at step 4 of 6 (epoch 3 of 3, 0 steps in)' in log
    assert [r['epoch'] for r in csv_rows(workdir)] == ['1', '2', '3']
    assert '6' in os.listdir(workdir / 'checkpoints')

    # A finished run says so and exits 0 without training.
    log = launch(workdir, '--config.train.num_epochs=3')
    assert 'is complete (step 6 of 6)' in log
    assert len(csv_rows(workdir)) == 3
