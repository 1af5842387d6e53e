"""Built datasets (ArrayRecord shards) in a bucket: built locally and uploaded (metadata last),
read back by training from gs:// (array_record itself) and s3:// (staged once per host), each
checked against the same dataset built on local disk (tests/objstore.py's loopback servers)."""
import concurrent.futures
import os

import numpy as np
import pytest

from clusiam_jax import cli, data, storage
from clusiam_jax.data import sources
from clusiam_jax.errors import ConfigError, DataError
from tests.helpers import data_config, take, write_patches

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
VERSION = 'clusiam_patches/1.0.0'


@pytest.fixture
def patches(tmp_path, monkeypatch):
    """9 patch files and the dataset built from them on local disk; caches in the test's own
    folder ($XDG_CACHE_HOME: normalization statistics, staged s3:// datasets)."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    src = str(tmp_path / 'src')
    write_patches(src, 9)
    return src, data.build_dataset(src, str(tmp_path / 'local'))


def _records(path):
    from array_record.python import array_record_module
    reader = array_record_module.ArrayRecordReader(path)
    assert reader.ok()
    try:
        return reader.read_all()
    finally:
        reader.close()


def _shards(folder):
    return sorted(n for n in os.listdir(folder) if '.array_record-' in n)


def _built_in_bucket(src, bucket, monkeypatch):
    uploaded = []
    real = storage.upload
    monkeypatch.setattr(storage, 'upload', lambda local, url, recursive=False: (
        uploaded.append(storage.split(url)[1]), real(local, url, recursive))[1])
    url = data.build_dataset(src, bucket + '/ds')
    monkeypatch.setattr(storage, 'upload', real)
    return url, uploaded


def test_a_dataset_built_into_a_bucket_holds_the_local_build(objstore, bucket, patches,
                                                              tmp_path, monkeypatch):
    src, local = patches
    url, uploaded = _built_in_bucket(src, bucket, monkeypatch)
    assert url == f'{bucket}/ds/{VERSION}'
    # Each file one upload, shards first and dataset_info.json (what makes it a dataset) last.
    assert sorted(uploaded) == sorted(os.listdir(local))
    assert uploaded[-1] == 'dataset_info.json' and set(uploaded[:len(_shards(local))]) == set(
        _shards(local))
    remote = objstore.objects(url)
    for name in _shards(local) + ['records.csv', 'skipped_files.txt', 'features.json']:
        with open(os.path.join(local, name), 'rb') as f:
            assert remote[name] == f.read(), name
    for name in _shards(local):   # the records themselves, read back from the bucket's bytes
        copy = tmp_path / name
        copy.write_bytes(remote[name])
        assert _records(str(copy)) == _records(os.path.join(local, name))
    assert data.discover(bucket + '/ds') == data.discover(local)
    with pytest.raises(DataError, match='already built'):
        data.build_dataset(src, bucket + '/ds')


@pytest.mark.parametrize('workers', [0, 2])
def test_training_from_a_bucket_dataset_gives_the_local_batches(bucket, patches, monkeypatch,
                                                                 workers):
    src, local = patches
    url, _ = _built_in_bucket(src, bucket, monkeypatch)
    loader = data.create_train_loader(data_config(bucket + '/ds', mean=MEAN, std=STD,
                                                  workers=workers))
    expected = data.create_train_loader(data_config(local, mean=MEAN, std=STD))
    got, want = take(loader.iterator(), 3), take(expected.iterator(), 3)
    for a, b in zip(got, want):
        for key in ('view1', 'view2'):
            np.testing.assert_array_equal(a[key], b[key])


def test_a_half_uploaded_dataset_is_refused_then_rebuilt(objstore, bucket, patches,
                                                         monkeypatch):
    src, local = patches
    url, _ = _built_in_bucket(src, bucket, monkeypatch)
    storage.remove(storage.join(url, 'dataset_info.json'))
    for read in (data.discover, sources.open_source):
        with pytest.raises(DataError, match='no dataset_info.json: its build stopped') as e:
            read(bucket + '/ds')
        assert '\n' not in str(e.value)
    # Building again replaces the leftovers: the bucket then holds the local build's files.
    assert data.build_dataset(src, bucket + '/ds') == url
    assert sorted(objstore.objects(url)) == sorted(os.listdir(local))
    with pytest.raises(DataError, match='no built dataset'):
        sources.open_source(bucket + '/nothing')


def test_an_s3_dataset_is_staged_once(objstore, patches, monkeypatch, tmp_path):
    src, local = patches
    url, _ = _built_in_bucket(src, objstore.new_bucket('s3'), monkeypatch)
    downloads = []
    real = storage.download
    monkeypatch.setattr(storage, 'download', lambda u, p: (downloads.append(u), real(u, p)))
    # Two openers at once (processes of a host; threads here, flock excludes them alike).
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first, _ = pool.map(sources.open_source, [url, url])
    assert len(downloads) == len(os.listdir(local))
    assert downloads[-1].endswith('/dataset_info.json')
    staged = first.dataset_dir
    assert staged.startswith(str(tmp_path / 'cache' / 'clusiam_jax' / 'datasets'))
    for name in os.listdir(local):
        with open(os.path.join(local, name), 'rb') as a, open(os.path.join(staged, name),
                                                               'rb') as b:
            assert a.read() == b.read(), name
    second = sources.open_source(url)
    assert len(downloads) == len(os.listdir(local)) and second.dataset_dir == staged
    np.testing.assert_array_equal(second.load(4), data.open_source(local).load(4))
    # Rebuilt from other patches: staged again, and only the new build's files are there.
    storage.remove(url, recursive=True)
    os.remove(os.path.join(src, os.listdir(src)[0], 'slide_0', '0_0.png'))
    data.build_dataset(src, url.split('/clusiam_patches')[0])
    third = sources.open_source(url)
    assert third.dataset_dir == staged and len(third) == len(first) - 1
    assert sorted(os.listdir(staged)) == sorted(os.listdir(local) + [sources.STAGED_MARKER])
    # Training stages into data.cache_dir when it is set.
    data.create_train_loader(data_config(url, mean=MEAN, std=STD,
                                         cache_dir=str(tmp_path / 'mine')))
    assert os.listdir(tmp_path / 'mine' / 'datasets')


def test_a_gs_shard_array_record_cannot_open_is_one_line(objstore, patches, monkeypatch):
    src, local = patches
    url, _ = _built_in_bucket(src, objstore.new_bucket('gs'), monkeypatch)
    from clusiam_jax.data import tfds_builder
    assert len(tfds_builder.open_data_source(url)) == 9
    with monkeypatch.context() as m, pytest.raises(ConfigError, match='CLOUD_STORAGE_EMU'):
        m.delenv('CLOUD_STORAGE_EMULATOR_ENDPOINT')
        tfds_builder.open_data_source(url)   # refused before array_record waits on real GCS
    storage.remove(storage.join(url, _shards(local)[0]))
    with pytest.raises(DataError, match='cannot read .*array_record cannot open it'):
        tfds_builder.open_data_source(url)


def test_cli_build_dataset_into_a_bucket(objstore, patches, capsys):
    src, local = patches
    out = objstore.new_bucket('s3') + '/cli'
    assert cli.main(['--mode', 'build_dataset', f'--config.data.path={src}', '--out', out]) == 0
    assert f'dataset written to {out}/{VERSION}' in capsys.readouterr().out
    assert data.discover(out) == data.discover(local)


def test_a_tiling_is_packed_with_slide_ids_and_coords(objstore, demo_tiles, tmp_path,
                                                      monkeypatch):
    """Patches read from the slides once: each example holds the pixels the tiling gives,
    its slide id and level-0 coordinates; the bucket build equals the local one."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    tiles = data.open_source(demo_tiles)
    keep = np.arange(0, len(tiles), max(1, len(tiles) // 12))   # a dozen patches: fast
    from clusiam_jax.data import slide_source
    real_open = slide_source.open_slide_source
    monkeypatch.setattr(slide_source, 'open_slide_source',
                        lambda *a, **k: real_open(*a, **k).subset(keep))
    local = data.build_dataset(demo_tiles, str(tmp_path / 'local'))
    url = data.build_dataset(demo_tiles, objstore.new_bucket('gs') + '/ds')
    monkeypatch.undo()
    packed = data.open_source(url)
    assert len(packed) == len(keep)
    for i, index in enumerate(keep):
        want = tiles.record(int(index))
        got = packed.record(i)
        assert (got.slide_id, got.x, got.y, got.label) == (want.slide_id, want.x, want.y,
                                                           want.label)
        assert got.path == want.path
        np.testing.assert_array_equal(packed.load(i), tiles.load(int(index)))
    assert data.discover(url) == data.discover(local)
    with pytest.raises(DataError, match='data.slide_dir is set but'):
        data.build_dataset(str(tmp_path / 'local'), str(tmp_path / 'x'), slide_dir=demo_tiles)


def test_export_reads_a_bucket_dataset_as_the_local_one(bucket, tmp_path, monkeypatch):
    from tests.helpers import tiny_config
    from tests.test_export import _write_patches
    from tests.test_storage_export import _export, _same_export, _write_run
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    patches = tmp_path / 'patches'
    _write_patches(patches)
    local = data.build_dataset(str(patches), str(tmp_path / 'ds'))
    url = data.build_dataset(str(patches), bucket + '/ds')
    config = tiny_config('clusiam', batch_size=8, image_size=32, num_epochs=1)
    config.export.batch_size = 8
    workdir = str(tmp_path / 'run')
    _write_run(workdir, config)
    light = {'pt_files': False, 'qupath': False, 'cluster_maps': False, 'atlas': False}
    for data_path, out in ((local, 'from_disk'), (url, 'from_bucket')):
        _export(config, workdir, str(tmp_path / out), data_path=data_path, **light)
    _same_export(str(tmp_path / 'from_disk'), str(tmp_path / 'from_bucket'))


def test_the_config_takes_a_dataset_url_as_data_path(objstore, patches):
    from clusiam_jax.config import validate
    from configs import demo
    src, _ = patches
    url = objstore.new_bucket('gs') + '/ds'
    config = demo.get_config()
    config.data.path = url
    with pytest.raises(ConfigError, match='data.path does not exist'):
        validate(config)
    data.build_dataset(src, url)
    validate(config)


class _Counting:
    """A data source that records each read: ('one', key) or ('many', keys)."""

    def __init__(self, inner):
        self.inner, self.reads = inner, []

    def __getitem__(self, key):
        self.reads.append(('one', key))
        return self.inner[key]

    def __getitems__(self, keys):
        self.reads.append(('many', list(keys)))
        return self.inner.__getitems__(keys)


def test_prefetched_records_of_a_gs_dataset_come_in_one_read(objstore, patches, monkeypatch):
    import pickle
    src, local = patches
    url, _ = _built_in_bucket(src, objstore.new_bucket('gs'), monkeypatch)
    source, reference = sources.open_source(url), data.open_source(local)
    np.testing.assert_array_equal(source.load(0), reference.load(0))
    counting = source._reader = _Counting(source._reader)
    source.prefetch(range(1, 9))
    for i in range(1, 9):
        np.testing.assert_array_equal(source.load(i), reference.load(i))
    assert counting.reads == [('many', list(range(1, 9)))]
    # A miss takes the named ones along; with none named it is read alone.
    source.prefetch([5])
    source.load(0)
    source.load(5)
    source.load(0)
    assert counting.reads[1:] == [('many', [0, 5]), ('one', 0)]
    # A copy for a worker carries nothing read ahead.
    copy = pickle.loads(pickle.dumps(source))
    assert copy._reader is None and not copy._ahead and not copy._wanted
    reference.prefetch(range(3))   # local: nothing to hide
    assert not reference._wanted
