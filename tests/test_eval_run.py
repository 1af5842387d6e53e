"""The evaluation CLI over an export directory, on constructed embeddings."""
import csv
import json
import os
import runpy
import sys

import h5py
import numpy as np
import pytest

from clusiam_jax import cli


def _eval(argv):
    return cli.main(['--mode', 'eval'] + argv)


def _make_export(root, slides):
    """An export dir in the CLAM layout from {slide: (features, labels)}."""
    os.makedirs(root / 'h5_files')
    rows = []
    for slide, (feats, labels) in slides.items():
        n = feats.shape[0]
        with h5py.File(root / 'h5_files' / f'{slide}.h5', 'w') as f:
            f['features'] = feats.astype(np.float32)
            f['coords'] = np.stack([np.arange(n) * 32, np.zeros(n)], 1).astype(np.int64)
            f['coords'].attrs['patch_size'] = 32
            f['cluster_ids'] = (np.arange(n) % 3).astype(np.int32)
            f.create_dataset('labels', data=np.array(labels, dtype=object),
                             dtype=h5py.string_dtype('utf-8'))
        rows.append({'slide_id': slide, 'n_patches': n, 'label': '',
                     'file': f'h5_files/{slide}.h5'})
    with open(root / 'manifest.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['slide_id', 'n_patches', 'label', 'file'])
        writer.writeheader()
        writer.writerows(rows)


def _write_splits(path, splits):
    with open(path, 'w', newline='') as f:
        f.write('slide_id,split\n')
        for slide, split in splits.items():
            f.write(f'{slide},{split}\n')


def test_knn_and_linear_cli_on_separable_embeddings(tmp_path, capsys):
    rng = np.random.default_rng(0)
    centers = {'epi': np.eye(8)[0] * 5, 'fib': np.eye(8)[1] * 5}

    def slide(n_each):
        labels = ['epi'] * n_each + ['fib'] * n_each
        feats = np.stack([centers[c] for c in labels]) + rng.normal(0, 0.3, (2 * n_each, 8))
        return feats, labels

    slides = {f'img{i}': slide(6) for i in range(6)}
    _make_export(tmp_path / 'exp', slides)
    _write_splits(tmp_path / 'splits.csv',
                  {'img0': 'train', 'img1': 'train', 'img2': 'train', 'img3': 'validation',
                   'img4': 'test', 'img5': 'test'})
    # A slide of the export that the split does not list is left out.
    code = _eval(['knn', '--export', str(tmp_path / 'exp'), '--splits',
                          str(tmp_path / 'splits.csv'), '--ks', '1,3', '--positive', 'epi'])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result['n_reference'] == 36 and result['n_query'] == 24
    assert result['k=1']['accuracy'] == 1.0 and result['k=3']['positive_f1'] == 1.0

    code = _eval(['linear', '--export', str(tmp_path / 'exp'), '--splits',
                          str(tmp_path / 'splits.csv'), '--out', str(tmp_path / 'lin.json')])
    assert code == 0
    result = json.loads((tmp_path / 'lin.json').read_text())
    assert result['test']['accuracy'] == 1.0 and result['n_train'] == 36


def test_knn_known_neighbours_and_slide_labels(tmp_path, capsys):
    # Without patch labels, the slide label from the split CSV labels every patch.
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    query = np.array([[0.9, 0.1], [0.2, 0.8], [10.0, 1.0]])
    _make_export(tmp_path / 'exp', {'a': (ref[:1], ['x']), 'b': (ref[1:], ['y']),
                                    'q': (query, ['x', 'y', 'x'])})
    for name in ('a', 'b', 'q'):
        with h5py.File(tmp_path / 'exp' / 'h5_files' / f'{name}.h5', 'a') as f:
            del f['labels']
    with open(tmp_path / 'splits.csv', 'w') as f:
        f.write('slide_id,split,label\na,train,x\nb,train,y\nq,test,x\n')
    assert _eval(['knn', '--export', str(tmp_path / 'exp'), '--splits',
                          str(tmp_path / 'splits.csv'), '--ks', '1']) == 0
    result = json.loads(capsys.readouterr().out)
    # Neighbours by cosine: x, y, x; all queries are labelled x -> 2 of 3 right.
    assert abs(result['k=1']['accuracy'] - 2 / 3) < 1e-9


def test_cli_errors_are_one_line(tmp_path, capsys):
    _make_export(tmp_path / 'exp', {'a': (np.ones((2, 4)), ['x', 'x'])})
    _write_splits(tmp_path / 'splits.csv', {'a': 'train', 'missing': 'test'})
    assert _eval(['knn', '--export', str(tmp_path / 'exp'), '--splits',
                          str(tmp_path / 'splits.csv')]) == 2
    assert 'not in the export' in capsys.readouterr().err


def test_dsmil_reads_files_by_the_manifest(tmp_path, capsys):
    # Slide ids the export writes under other file names (a space becomes '_' there).
    slides = {f'slide {i}': split for i, split in
              enumerate(['train'] * 4 + ['val'] * 2 + ['test'] * 2)}
    _make_export(tmp_path / 'exp', {s: (np.full((3, 4), i, float), ['x'] * 3)
                                    for i, s in enumerate(slides)})
    for slide in slides:
        os.rename(tmp_path / 'exp' / 'h5_files' / f'{slide}.h5',
                  tmp_path / 'exp' / 'h5_files' / f'{slide.replace(" ", "_")}.h5')
    manifest = (tmp_path / 'exp' / 'manifest.csv').read_text()
    (tmp_path / 'exp' / 'manifest.csv').write_text(
        manifest.replace('h5_files/slide ', 'h5_files/slide_'))
    with open(tmp_path / 'splits.csv', 'w') as f:
        f.write('slide_id,split,label\n')
        f.writelines(f'{s},{split},{"ab"[i % 2]}\n' for i, (s, split) in enumerate(slides.items()))
    args = ['dsmil', '--export', str(tmp_path / 'exp'), '--splits', str(tmp_path / 'splits.csv')]
    assert _eval(args + ['--epochs', '2', '--seeds', '0']) == 0
    assert json.loads(capsys.readouterr().out)['seeds'] == [0]
    assert _eval(args + ['--epochs', '0']) == 2
    assert 'at least 1' in capsys.readouterr().err


@pytest.mark.parametrize('args, message', [
    (['knn', '--ks', '1,a'], 'comma-separated integers'),
    (['knn', '--key', 'projections'], "no 'projections'"),
    (['dsmil', '--seeds', ','], 'at least one seed'),
    (['maps', '--thumbnail', 'THUMB', '--downsample', '-8'], 'must be positive'),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, args, message):
    from PIL import Image
    _make_export(tmp_path / 'exp', {'a': (np.ones((2, 4)), ['x', 'x']),
                                    'b': (np.zeros((2, 4)), ['y', 'y'])})
    _write_splits(tmp_path / 'splits.csv', {'a': 'train', 'b': 'test'})
    os.makedirs(tmp_path / 'thumbs')
    for slide in 'ab':
        Image.new('RGB', (8, 8)).save(tmp_path / 'thumbs' / f'{slide}.png')
    args = [str(tmp_path / 'thumbs') if a == 'THUMB' else a for a in args]
    splits = [] if args[0] == 'maps' else ['--splits', str(tmp_path / 'splits.csv')]
    assert _eval(args[:1] + ['--export', str(tmp_path / 'exp')] + splits
                         + args[1:]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and message in err and len(err.splitlines()) == 1


def test_maps_cli(tmp_path, capsys):
    _make_export(tmp_path / 'exp', {'a': (np.ones((4, 4)), ['x'] * 4)})
    assert _eval(['maps', '--export', str(tmp_path / 'exp')]) == 0
    assert os.path.exists(tmp_path / 'exp' / 'cluster_maps' / 'a.png')


def test_the_old_entry_point_runs_the_eval_command(tmp_path, capsys, monkeypatch):
    # `python -m clusiam_jax.eval.run TASK ...` is `--mode eval TASK ...`.
    _make_export(tmp_path / 'exp', {'a': (np.ones((2, 4)), ['x', 'x'])})
    _write_splits(tmp_path / 'splits.csv', {'a': 'train', 'missing': 'test'})
    monkeypatch.setattr(sys, 'argv', ['run', 'knn', '--export', str(tmp_path / 'exp'),
                                      '--splits', str(tmp_path / 'splits.csv')])
    with pytest.raises(SystemExit) as done:
        runpy.run_module('clusiam_jax.eval.run', run_name='__main__')
    assert done.value.code == 2 and 'not in the export' in capsys.readouterr().err
