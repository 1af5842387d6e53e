"""Config checks: clear one-line errors before anything compiles; recipes as the paper."""
import os
import subprocess
import sys

import ml_collections
import pytest

from clusiam_jax.config import default_config, validate, validate_tile
from clusiam_jax.errors import ConfigError
from configs import byol, clubyol, clubyol_pod, clusiam, demo, simsiam

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_path(c, path):
    c.data.path = path
    return c


def test_recipes_are_the_papers(tmp_path):
    cs, cb = clusiam.get_config(), clubyol.get_config()
    assert (cs.model.name, cs.model.feat_size, cs.model.pred_hidden, cs.loss.alpha,
            cs.optim.fix_pred_lr) == ('clusiam', 2048, 512, 0.5, True)
    assert (cb.model.name, cb.model.feat_size, cb.model.pred_hidden, cb.loss.alpha,
            cb.optim.fix_pred_lr, cb.ema.momentum) == ('clubyol', 256, 4096, 0.9, False, 0.99)
    for c in (cs, cb):
        assert (c.model.backbone, c.model.num_clusters, c.train.batch_size, c.train.num_epochs,
                c.optim.base_lr, c.optim.weight_decay, c.optim.momentum) == \
            ('resnet18', 100, 512, 50, 0.05, 1e-4, 0.9)
    assert simsiam.get_config().loss.alpha == 0 and byol.get_config().loss.alpha == 0
    for recipe in (clusiam, clubyol, simsiam, byol, clubyol_pod):
        validate(with_path(recipe.get_config(), str(tmp_path)), num_devices=8)
    validate(with_path(demo.get_config(), str(tmp_path)))
    validate_tile(demo.get_config().tile)   # the demo's slide ships with the package


@pytest.mark.parametrize('mutate, message', [
    (lambda c: c.train.__setattr__('batch_size', 12), 'not divisible by the 8 devices'),
    (lambda c: c.data.__setattr__('path', ''), 'data.path is not set'),
    (lambda c: c.data.__setattr__('path', '/no/such/dir'), 'data.path does not exist'),
    (lambda c: c.model.__setattr__('name', 'simclr'), 'model.name must be one of'),
    (lambda c: c.loss.__setattr__('alpha', 1.5), 'loss.alpha must be in [0, 1]'),
    (lambda c: c.data.__setattr__('mean', (0.5, 0.5)), 'data.mean must have 3 values'),
    (lambda c: c.train.__setattr__('on_nonfinite', 'ignore'),
     "train.on_nonfinite must be 'stop' or 'skip'"),
    (lambda c: c.train.__setattr__('max_consecutive_skips', 0),
     'train.max_consecutive_skips must be positive'),
    (lambda c: c.train.__setattr__('keep_checkpoints', 0), 'train.keep_checkpoints must be'),
    (lambda c: c.data.__setattr__('image_size', 0), 'data.image_size must be at least 1'),
    (lambda c: c.data.__setattr__('num_workers', -1), 'data.num_workers must be at least 0'),
    (lambda c: c.data.__setattr__('mean', (0.5, 0.5, 0.5)), 'set both data.mean and data.std'),
    (lambda c: (c.data.__setattr__('mean', (0.5,) * 3), c.data.__setattr__('std', (0.2, 0, 0.2))),
     'data.std must be positive'),
])
def test_bad_values_are_one_line_errors(tmp_path, mutate, message):
    c = with_path(clusiam.get_config(), str(tmp_path))
    mutate(c)
    with pytest.raises(ConfigError) as err:
        validate(c, num_devices=8)
    assert message in str(err.value) and '\n' not in str(err.value)


def test_unknown_keys_and_wrong_types(tmp_path):
    c = with_path(default_config(), str(tmp_path))
    c.unlock()
    c.train.batchsize = 32  # a typo must not be silently ignored
    with pytest.raises(ConfigError, match="unknown config key 'train.batchsize'"):
        validate(c)
    c = with_path(default_config(), str(tmp_path))
    with pytest.raises(TypeError):  # ConfigDict's own check on assignment
        c.model.num_clusters = 'many'
    # A recipe that rebuilds a whole section escapes that check; validate catches it.
    c.unlock()
    c.model = ml_collections.ConfigDict(dict(c.model.to_dict(), num_clusters='many'))
    with pytest.raises(ConfigError, match="'model.num_clusters' must be int"):
        validate(c)


def test_a_recipe_typo_is_one_line(tmp_path, capsys):
    """The config is locked: a recipe setting an unknown key fails where it does so."""
    from clusiam_jax import cli
    recipe = tmp_path / 'recipe.py'
    recipe.write_text('from configs.clusiam import get_config as base\n\n\n'
                      'def get_config():\n    c = base()\n    c.train.batchsize = 3\n'
                      '    return c\n')
    assert cli.main(['--config', str(recipe), '--workdir', str(tmp_path / 'run')]) == 2
    error, = [line for line in capsys.readouterr().err.splitlines() if 'error:' in line]
    assert 'Key "batchsize" does not exist' in error and 'Did you mean "batch_size"' in error
    assert 'Other fields present' not in error


def test_baselines_reject_a_cluster_weight(tmp_path):
    c = with_path(simsiam.get_config(), str(tmp_path))
    c.loss.alpha = 0.5
    with pytest.raises(ConfigError, match='simsiam has no cluster term'):
        validate(c)


@pytest.mark.parametrize('args, message', [
    (['--config.train.batchsize=32'], "unknown config key 'batchsize'"),
    (['--config.train.batchsize=32'], "did you mean 'batch_size'?"),
    (['--config.train.batch_size=many'], 'invalid literal for int'),
    (['--config.data.path=/no/such/dir'], 'data.path does not exist'),
    (['--config.train.batch_size=12', '--config.data.path=DEMO_TILES'],
     'not divisible by the 8 devices'),
    (['--config.data.path=EMPTY_DIR'], 'no image files'),             # a DataError
    (['--config.data.path=A_FILE'], 'is a file but not a manifest CSV'),
    (['--mode', 'export', '--config.export.out_dir=A_FILE'], 'is a file, not a folder'),
])
def test_cli_errors_are_one_line_before_compiling(tmp_path, demo_tiles, args, message):
    os.makedirs(tmp_path / 'empty')
    (tmp_path / 'a_file').write_text('not a folder')
    paths = {'EMPTY_DIR': str(tmp_path / 'empty'), 'A_FILE': str(tmp_path / 'a_file'),
             'DEMO_TILES': demo_tiles}
    args = [a.split('=')[0] + '=' + paths[a.split('=')[1]]
            if '=' in a and a.split('=')[1] in paths else a for a in args]
    cmd = [sys.executable, 'launch.py', '--config', 'configs/demo.py',
           '--workdir', str(tmp_path / 'run')] + args
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and message in errors[0], out.stderr[-2000:]
    assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_an_explicit_onednn_where_it_cannot_run_is_one_line_at_start(tmp_path, capsys,
                                                                    monkeypatch):
    from clusiam_jax import cli
    from clusiam_jax.models import onednn
    monkeypatch.setattr(onednn, '_onednn_prefix', lambda: None)   # oneDNN not installed
    reason = onednn.unavailable_reason()
    assert cli.main(['--config', os.path.join(REPO, 'configs', 'demo.py'), '--workdir',
                     str(tmp_path / 'run'), f'--config.data.path={tmp_path}',
                     '--config.model.conv_impl=onednn']) == 2
    assert [line for line in capsys.readouterr().err.splitlines()
            if line.startswith('error:')] == [f'error: {reason}']
    assert not (tmp_path / 'run').exists()
    c = with_path(clusiam.get_config(), str(tmp_path))
    c.model.conv_impl = 'auto'   # falls back to im2col (conv.py): nothing to refuse
    validate(c)
    # A distributed run's processes must join before the check starts JAX's backend: the
    # loop validates again after joining (train/loop.py).
    c.model.conv_impl, c.train.distributed = 'onednn', True
    validate(c)
    c.train.distributed = False
    with pytest.raises(ConfigError, match='pip install onednn-cpu-gomp'):
        validate(c)


@pytest.mark.parametrize('conv_impl,dtype,refused', [('onednn', 'float32', True),
                                                     ('auto', 'bfloat16', True),
                                                     ('auto', 'float32', False),
                                                     ('im2col', 'bfloat16', False)])
def test_a_bad_onednn_thread_count_is_refused_at_start_where_onednn_may_run(
        tmp_path, monkeypatch, conv_impl, dtype, refused):
    from clusiam_jax.models import onednn
    monkeypatch.setenv(onednn.THREADS_ENV, 'two')
    c = with_path(clusiam.get_config(), str(tmp_path))
    c.model.conv_impl, c.model.dtype = conv_impl, dtype
    if refused:   # a non-ASCII digit is one line too, not int()'s ValueError
        monkeypatch.setenv(onednn.THREADS_ENV, '\u00b2')
        with pytest.raises(ConfigError, match=onednn.THREADS_ENV):
            validate(c)
        monkeypatch.setenv(onednn.THREADS_ENV, 'two')
    if refused:
        with pytest.raises(ConfigError, match=f"{onednn.THREADS_ENV}='two'"):
            validate(c)
    else:
        validate(c)
