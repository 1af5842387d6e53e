"""The command line: one surface for every action, one-line errors, no value silently
ignored, and a clean stop on SIGTERM or Ctrl-C at any moment of a run."""
import os
import signal
import subprocess
import sys
import time

import pytest

from clusiam_jax import cli
from tests.helpers import REPO, as_from_a_terminal, subprocess_env

# The demo at the tiny model's size: compiles in seconds.
TINY = ['--config.model.backbone=resnet_tiny', '--config.data.image_size=32']


def one_error(capsys, code, expected=2):
    """The single `error:` line of a command that failed with exit status `expected`."""
    assert code == expected
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'Traceback' not in err, err
    return errors[0]


def test_help_lists_every_action(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(['--help'])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for mode in ('train', 'export', 'build_dataset', 'eval', 'convert'):
        assert f'  {mode} ' in out
    with pytest.raises(SystemExit):
        cli.main(['--mode', 'eval', 'dsmil', '--help'])
    assert '--seeds' in capsys.readouterr().out


@pytest.mark.parametrize('argv, message', [
    # The defect: export used the run's image size and said nothing.
    (['--mode', 'export', '--workdir', 'RUN', '--config.data.image_size=64'],
     "--config.data.image_size=64 is not used by --mode export: the run's config.json"),
    (['--mode', 'export', '--workdir', 'RUN', '--config.train.batch_size=64'],
     'not used by --mode export'),
    (['--config', 'configs/clusiam.py', '--workdir', 'RUN', '--config.data.path=RUN',
      '--config.export.format=npz'], 'used only with export.after_training=True'),
    (['--mode', 'build_dataset', '--out', 'RUN/ds', '--config.train.seed=3'],
     'is not used by --mode build_dataset'),
    (['--mode', 'eval', 'dsmil', '--export', 'RUN', '--splits', 'x.csv', '--ks', '1'],
     'unrecognized arguments: --ks 1'),
    (['--mode', 'eval', 'maps', '--export', 'RUN', '--config.model.name=byol'],
     '--mode eval takes no config'),
    (['--mode', 'convert', 'to-torch', '--workdir', 'RUN', '--out', 'x.safetensors',
      '--mean', '1', '2', '3'], 'unrecognized arguments: --mean'),
    # One way to pick a checkpoint: the retired --step names its replacement.
    (['--mode', 'export', '--workdir', 'RUN', '--step', '5'],
     'give --config.export.checkpoint=5 instead'),
    (['--mode', 'convert', 'to-torch', '--workdir', 'RUN', '--out', 'x.pt', '--step', '5'],
     'give --checkpoint 5 instead'),
])
def test_values_an_action_does_not_use_are_refused(tmp_path, capsys, argv, message):
    argv = [a.replace('RUN', str(tmp_path)).replace('configs/', f'{REPO}/configs/')
            for a in argv]
    assert message in one_error(capsys, cli.main(argv))


def test_export_takes_the_hed_strength_of_its_augmented_copies(tmp_path, capsys):
    """--config.augment.hed reaches --mode export (export.augment_copies jitters with it):
    the run check, not the unused-value refusal, answers."""
    argv = ['--mode', 'export', '--workdir', str(tmp_path), '--config.augment.hed=0.05',
            '--config.export.augment_copies=2']
    assert 'no config.json: not a run directory' in one_error(capsys, cli.main(argv))


@pytest.mark.parametrize('argv, message', [
    (['--config', 'configs/nope.py', '--workdir', 'RUN', '--config.train.batch_size=8'],
     'configs/nope.py: no such file'),
    (['--config', 'configs/demo.py', '--workdir', 'FILE/run', '--config.data.path=RUN'],
     'cannot write there'),
    (['--config', 'configs/demo.py', '--workdir', 'FILE', '--config.data.path=RUN'],
     'is a file, not a folder'),
    (['--mode', 'export', '--workdir', 'RUN'], 'no config.json: not a run directory'),
    (['--mode', 'eval', 'knn', '--export', 'RUN', '--splits', 'RUN/s.csv'],
     'splits file not found'),
    (['--mode', 'convert', 'to-torch', '--workdir', 'RUN', '--out', 'x.safetensors'],
     'no config.json'),
])
def test_bad_paths_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / 'file').write_text('not a folder')
    argv = [a.replace('FILE', str(tmp_path / 'file')).replace('RUN', str(tmp_path))
            .replace('configs/', f'{REPO}/configs/') for a in argv]
    assert message in one_error(capsys, cli.main(argv))


def test_a_run_config_of_an_unknown_model_is_one_line(tmp_path, capsys):
    (tmp_path / 'config.json').write_text('{"model": {"backbone": "resnet99"}}')
    message = one_error(capsys, cli.main(['--mode', 'export', '--workdir', str(tmp_path)]))
    assert 'config.json: model.backbone must be one of' in message


def test_an_unreadable_checkpoint_is_one_line(tmp_path, capsys):
    """Every file of the only checkpoint truncated: export says so in one line."""
    from clusiam_jax.train.loop import train
    from tests.helpers import SyntheticLoader, mesh_of, tiny_config
    workdir = tmp_path / 'run'
    config = tiny_config('clusiam', num_epochs=1)
    config.train.checkpoint_every_epochs = 0
    train(config, str(workdir), SyntheticLoader(1, 1, 8, 32), mesh_of(1))
    for root, _, names in os.walk(workdir / 'checkpoints' / '1' / 'state'):
        for name in names:
            open(os.path.join(root, name), 'w').close()
    message = one_error(capsys, cli.main(['--mode', 'export', '--workdir', str(workdir)]))
    assert 'the checkpoint at step 1' in message and 'cannot be read' in message


def _launch(args, **kwargs):
    return subprocess.Popen([sys.executable, 'launch.py'] + args, cwd=REPO,
                            preexec_fn=as_from_a_terminal,
                            env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for(proc, text, timeout=300):
    """Reads the child's stderr until a line contains `text`; returns what was read."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return ''.join(seen)
    proc.kill()
    raise AssertionError(f'{text!r} never appeared: {"".join(seen)[-3000:]}')


@pytest.mark.slow
def test_sigterm_during_start_up_and_ctrl_c_during_training(tmp_path, demo_tiles):
    """SIGTERM while the step compiles: exit 0 and one line, nothing to save. Ctrl-C
    while training: a checkpoint at that step, one line, exit 130."""
    workdir = str(tmp_path / 'run')
    args = ['--config', 'configs/demo.py', '--workdir', workdir,
            f'--config.data.path={demo_tiles}'] + TINY
    proc = _launch(args)
    _wait_for(proc, 'compiling the train step')
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=300)
    assert proc.returncode == 0, rest
    assert 'Traceback' not in rest and 'stopped by SIGTERM' in rest
    assert not os.listdir(os.path.join(workdir, 'checkpoints'))

    proc = _launch(args + ['--config.train.num_epochs=100000'])
    _wait_for(proc, 'INFO epoch 1/100000:')  # the log line at the end of epoch 1
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=300)
    assert proc.returncode == 130, rest
    assert 'Traceback' not in rest and 'SIGINT: saved a checkpoint at step' in rest
    steps = [int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))]
    assert len(steps) == 1 and 2 <= steps[0] < 200000
    with open(os.path.join(workdir, cli.LOG_NAME)) as f:  # the log is in the run too
        log = f.read()
    assert 'compiled in' in log and f'saved a checkpoint at step {steps[0]}' in log


@pytest.mark.slow
def test_a_data_error_in_a_worker_process_is_one_line(tmp_path):
    """Every patch unreadable, read by a grain worker process: one `error:` line."""
    garbage = tmp_path / 'garbage' / 'slide'
    os.makedirs(garbage)
    for i in range(20):
        (garbage / f'{i}_0.png').write_bytes(b'not an image')
    proc = _launch(['--config', 'configs/demo.py', '--workdir', str(tmp_path / 'run'),
                    f'--config.data.path={tmp_path / "garbage"}', '--config.data.num_workers=1',
                    '--config.data.mean=(0.5,0.5,0.5)', '--config.data.std=(0.2,0.2,0.2)']
                   + TINY)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and '100 substitutes in a row were unreadable' in errors[0], err
    assert 'Traceback' not in err, err


def test_a_misspelt_flag_is_named_with_the_closest_one(capsys):
    message = one_error(capsys, cli.main(['--config', 'configs/demo.py', '--workdri', 'x']))
    assert 'unknown flag --workdri; did you mean --workdir?' in message
    message = one_error(capsys, cli.main(['--mode', 'eval', 'knn', '--exprot', 'x',
                                          '--splits', 'y']))
    assert 'unknown flag --exprot; did you mean --export?' in message


def test_help_names_the_command_the_user_ran(capsys, monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['/usr/local/bin/clusiam', '--help'])
    with pytest.raises(SystemExit):
        cli.main(['--help'])
    assert 'clusiam --mode MODE --help' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(['--mode', 'export', '--help'])
    assert 'usage: clusiam --mode export' in capsys.readouterr().out
    monkeypatch.setattr(sys, 'argv', ['launch.py'])
    assert cli.command_hint('--workdir', 'my run') == "python launch.py --workdir 'my run'"


def test_a_log_file_on_a_full_disk_is_dropped_with_one_warning(tmp_path, capsys):
    """Every failed write to log.txt printed a 'Logging error' traceback."""
    import errno
    import logging
    root = logging.getLogger()
    before = list(root.handlers)
    cli.setup_logging()
    try:
        cli.log_to_workdir(str(tmp_path), ['--workdir', str(tmp_path)])
        handler, = [h for h in root.handlers if getattr(h, 'clusiam_owned', False)]

        def full(*_):
            raise OSError(errno.ENOSPC, 'No space left on device')
        handler.stream.write = full
        for i in range(3):
            cli.log.info('line %d', i)
        err = capsys.readouterr().err
        assert 'Logging error' not in err and 'Traceback' not in err, err
        assert err.count('cannot write') == 1 and 'line 2' in err
        assert handler not in root.handlers
    finally:
        root.handlers[:] = before
