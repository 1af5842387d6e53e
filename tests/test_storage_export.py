"""Export to a bucket (gs://, s3://) against loopback servers: the same files as on local disk,
a rerun resumes there, another run's export there is refused, and eval reads it back."""
import json
import os

import h5py
import jax
import numpy as np
import pytest

from clusiam_jax import cli, run_dir, storage
from clusiam_jax.export import embed
from clusiam_jax.export import format as fmt
from clusiam_jax.export import run as export_run
from clusiam_jax.interop.from_torch import weights_of
from clusiam_jax.models import build_network
from tests.helpers import SyntheticLoader, tiny_config
from tests.test_export import _write_patches

EVERYTHING = {'pt_files': True, 'qupath': True, 'cluster_maps': True, 'atlas': True}


def _write_run(workdir, config):
    """A weights-only run of random weights (no training: nothing to compile), as
    tests/test_torch_preprocessing.py makes one; export treats it like any run."""
    network = build_network(config.model)
    shapes = jax.eval_shape(lambda: network.init(
        jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32), train=False))
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda leaf: rng.normal(0, 0.3, leaf.shape).astype(np.float32),
                          shapes['params'])
    stats = jax.tree.map(lambda leaf: rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32),
                         shapes['batch_stats'])
    run_dir.write_run(workdir, config, weights_of(params, stats, step=2),
                      run_dir.Normalization(SyntheticLoader.mean, SyntheticLoader.std, 'test'))


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """A tiny run (local work directory), its patch folder, and its export on disk."""
    base = tmp_path_factory.mktemp('storage_export')
    patches = base / 'patches'
    _write_patches(patches)
    config = tiny_config('clusiam', batch_size=8, image_size=32, num_epochs=1)
    config.export.batch_size, config.export.data_path = 8, str(patches)
    workdir = str(base / 'run')
    _write_run(workdir, config)
    local = str(base / 'local_export')
    _export(config, workdir, local)
    splits = base / 'splits.csv'
    splits.write_text('slide_id,split,label\nslide_a,train,x\nslide_b,train,y\n'
                      'slide_c,test,x\n')
    return config, workdir, local, str(splits)


def _export(config, workdir, out_dir, **overrides):
    config = config.copy_and_resolve_references()
    config.export.out_dir = out_dir
    for key, value in {**EVERYTHING, **overrides}.items():
        config.export[key] = value
    return export_run.export(workdir, config.export)


def _files(root):
    """{relative name: bytes} of every file of an export, read through storage."""
    if storage.is_url(root):
        names, todo = [], ['']
        while todo:   # a walk through storage's own listing
            prefix = todo.pop()
            for name in storage.listdir(storage.join(root, prefix) if prefix else root):
                rel = f'{prefix}/{name}' if prefix else name
                (todo if storage.isdir(storage.join(root, rel)) else names).append(rel)
    else:
        names = [os.path.relpath(os.path.join(folder, name), root)
                 for folder, _, files in os.walk(root) for name in files]
    return {name: storage.read_bytes(storage.join(root, name)) for name in sorted(names)}


def _info(data: bytes) -> dict:
    """export_info.json without what differs by nature: when it finished and where it went."""
    info = json.loads(data)
    info.pop('finished')
    info['export'].pop('out_dir')
    return info


def _count_embedded_slides(monkeypatch):
    """Per embedding pass of an export, the set of slides embedded (test_slides_export.py)."""
    embedded, original = [], embed._embed_stream
    monkeypatch.setattr(embed, '_embed_stream', lambda embedder, source, writer, options: (
        embedded.append(set(writer.groups)), original(embedder, source, writer, options)))
    return embedded


def _same_export(a, b):
    here, there = fmt.read_export(a), fmt.read_export(b)
    assert sorted(there) == sorted(here)
    for slide, arrays in here.items():
        assert sorted(there[slide]) == sorted(arrays)
        for name, value in arrays.items():
            np.testing.assert_array_equal(there[slide][name], value, err_msg=name)


def test_an_export_to_a_bucket_holds_the_local_files_and_resumes(exported, bucket, monkeypatch,
                                                                 capsys):
    config, workdir, local, splits = exported
    url = bucket + '/exports/run'
    # Stopped while writing the second slide's file: the first is in the bucket, whole, and
    # nothing of the second (it is built locally and uploaded in one piece).
    real_create, files = h5py.Group.create_dataset, set()

    def failing_create(self, name, *args, **kwargs):
        files.add(self.file.filename)
        if len(files) == 2 and name == 'coords':
            raise RuntimeError('simulated crash while writing the second slide')
        return real_create(self, name, *args, **kwargs)
    with monkeypatch.context() as patched:
        patched.setattr(h5py.Group, 'create_dataset', failing_create)
        with pytest.raises(RuntimeError, match='simulated crash'):
            _export(config, workdir, url)
    assert storage.listdir(url + '/h5_files') == ['slide_a.h5']
    assert not storage.exists(url + '/manifest.csv')

    # The rerun embeds only the slides not finished there; then the bucket holds the files
    # of the local export, byte for byte (export_info: but when and where).
    embedded = _count_embedded_slides(monkeypatch)
    assert _export(config, workdir, url) == url
    assert embedded == [{'slide_b', 'slide_c'}]
    here, there = _files(local), _files(url)
    assert sorted(there) == sorted(here)
    assert {'manifest.csv', 'skipped_files.txt', 'h5_files/slide_a.h5', 'pt_files/slide_a.pt',
            'qupath/slide_a.geojson', 'cluster_maps/slide_a.png', 'atlas/index.html'} <= set(there)
    assert _info(there.pop(fmt.INFO_NAME)) == _info(here.pop(fmt.INFO_NAME))
    assert json.loads(storage.read_bytes(url + '/' + fmt.INFO_NAME))['export']['out_dir'] == url
    for name in here:
        assert there[name] == here[name], name

    # Another rerun: every slide is found finished there, none embedded, nothing changed.
    _export(config, workdir, url)
    assert embedded == [{'slide_b', 'slide_c'}]
    again = _files(url)
    again.pop(fmt.INFO_NAME)
    assert again == there

    # eval reads the export from the bucket and prints what it prints for the local copy.
    printed = []
    for where in (local, url):
        capsys.readouterr()
        assert cli.main(['--mode', 'eval', 'knn', '--export', where, '--splits', splits,
                         '--ks', '1,3']) == 0
        printed.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed[1] == printed[0] and json.loads(printed[0])['task'] == 'knn'
    # The slide-level evaluators' reader (eval/mil.py), on the export and on its h5 folder.
    for folder in ('', '/h5_files'):
        files = fmt.slide_feature_files(url + folder)
        assert files == {s: p.replace(local, url) for s, p in
                         fmt.slide_feature_files(local + folder).items()}
        for path in files.values():
            np.testing.assert_array_equal(fmt.read_h5_array(path),
                                          fmt.read_h5_array(path.replace(url, local)))


def test_another_runs_export_in_the_bucket_folder_is_refused(exported, bucket, tmp_path,
                                                            capsys):
    config, workdir, local, _ = exported
    other = str(tmp_path / 'other.h5')
    with open(other, 'wb') as f:
        f.write(storage.read_bytes(os.path.join(local, 'h5_files', 'slide_a.h5')))
    with h5py.File(other, 'r+') as f:   # as exported by another run
        f.attrs['weights_sha256'], f.attrs['workdir'] = '0' * 64, '/runs/another'
    storage.upload(other, bucket + '/exp/h5_files/slide_a.h5')
    capsys.readouterr()
    assert cli.main(['--mode', 'export', '--workdir', workdir,
                     f'--config.export.out_dir={bucket}/exp',
                     f'--config.export.data_path={config.export.data_path}']) == 2
    assert 'holds 1 files of another export' in capsys.readouterr().err
    assert storage.listdir(bucket + '/exp') == ['h5_files']   # the folder's lock is gone
    assert storage.listdir(bucket + '/exp/h5_files') == ['slide_a.h5']


def test_a_run_in_a_bucket_exports_into_its_own_folder_there(exported, bucket):
    config, _, local, _ = exported
    workdir = bucket + '/runs/tiny'
    _write_run(workdir, config)
    out = _export(config, workdir, '', pt_files=False, cluster_maps=False, atlas=False,
                  qupath=False)
    assert out == workdir + '/export'
    info = fmt.read_export_info(out)
    assert info['workdir'] == workdir and info['n_patches'] == 19
    _same_export(local, out)


def test_an_npz_export_in_a_bucket_reads_back_and_resumes(exported, bucket, tmp_path,
                                                          monkeypatch):
    config, workdir, _, _ = exported
    plain = dict(format='npz', pt_files=False, cluster_maps=False, atlas=False, qupath=False)
    local, url = str(tmp_path / 'npz'), bucket + '/npz'
    _export(config, workdir, local, **plain)
    _export(config, workdir, url, **plain)
    _same_export(local, url)
    embedded = _count_embedded_slides(monkeypatch)
    _export(config, workdir, url, **plain)
    assert embedded == []
