"""Slide-level ABMIL, clusters and meanpool: references, planted signal, chance, errors."""
import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import balanced_accuracy_score, log_loss, roc_auc_score

from clusiam_jax import cli
from clusiam_jax.errors import DataError
from clusiam_jax.eval import slide_models as sm
from clusiam_jax.eval import tasks
from clusiam_jax.eval.metrics import slide_metrics
from clusiam_jax.eval.mil import pad_bag, read_slides
from clusiam_jax.export import format as fmt

DIM, K = 16, 6
TUMOUR = K - 1          # the cluster only positive slides have
COUNTS = {'train': 40, 'val': 20, 'test': 40}
# Every bag has 20-60 patches: one bucket (64), one compile per step function.
FAST = sm.ABMILConfig(epochs=8, lr=2e-3)


def _slide(rng, centres, positive):
    """(features, cluster logits, planted mask): patches of a random mix of the normal
    clusters; positive slides also hold 15-35% patches of the tumour cluster."""
    n = int(rng.integers(20, 61))
    n_tumour = int(round(rng.uniform(0.15, 0.35) * n)) if positive else 0
    normal = rng.choice(K - 1, size=n - n_tumour, p=rng.dirichlet(np.ones(K - 1)))
    ids = rng.permutation(np.concatenate([np.full(n_tumour, TUMOUR), normal]))
    x = (centres[ids] + rng.normal(size=(n, DIM))).astype(np.float32)
    logits = -0.25 * ((x[:, None, :] - centres[None]) ** 2).sum(-1)
    return x, logits.astype(np.float32), ids == TUMOUR


def _write_slide(path, x, logits=None):
    arrays = {'features': x, 'coords': np.zeros((len(x), 2), np.int64)}
    if logits is not None:
        arrays['cluster_logits'] = logits
        arrays['cluster_ids'] = np.argmax(logits, axis=1).astype(np.int32)
    fmt.write_slide_h5(str(path), arrays, {}, {'patch_size': 256})


def _write_splits(path, rows):
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['slide_id', 'split', 'label'])
        writer.writerows(rows)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """An export of ours (with cluster arrays), a CLAM folder of the same features
    without them, the splits file, and the planted masks."""
    root = tmp_path_factory.mktemp('slides')
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1.5, (K, DIM))
    export, clam = root / 'export', root / 'clam'
    fmt.prepare_out_dir(str(export), 'h5')
    clam.mkdir()
    rows, manifest, slides = [], [], {}
    for split, count in COUNTS.items():
        for i in range(count):
            slide, label = f'{split}_{i:02d}', i % 2
            x, logits, planted = _slide(rng, centres, label == 1)
            slides[slide] = (x, planted, label)
            _write_slide(export / fmt.slide_file('h5', slide), x, logits)
            _write_slide(clam / f'{slide}.h5', x)
            rows.append((slide, split, ['normal', 'tumour'][label]))
            manifest.append({'slide_id': slide, 'n_patches': len(x), 'label': '',
                             'file': fmt.slide_file('h5', slide)})
    fmt.write_manifest(str(export), manifest)
    _write_splits(root / 'splits.csv', rows)
    return {'root': root, 'export': export, 'clam': clam, 'splits': root / 'splits.csv',
            'rows': rows, 'slides': slides}


def _shuffled_splits(data, seed):
    """The splits with the labels permuted within each split (class counts kept)."""
    rng = np.random.default_rng(100 + seed)
    rows = []
    for split in COUNTS:
        part = [r for r in data['rows'] if r[1] == split]
        labels = rng.permutation([r[2] for r in part])
        rows += [(slide, split, label) for (slide, split, _), label in zip(part, labels)]
    path = data['root'] / f'shuffled_{seed}.csv'
    _write_splits(path, rows)
    return path


def _bags(data, flip_test=False):
    splits, names = sm.labelled_splits(data['splits'], 'abmil')
    sets = read_slides(data['export'], data['splits'], splits)
    bags = {s: [(x, (1 - y) if flip_test and s == 'test' else y) for x, y in zip(*sets[s])]
            for s in sets}
    return bags, splits, names


# ------------------------------------------------------------------ references


def _numpy_gated_attention(p, x, hidden):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    dense = lambda name, h: h @ p[name]['kernel'] + p[name]['bias']
    h = np.maximum(dense('embed', x), 0) if hidden else x.astype(np.float64)
    gate = np.tanh(dense('attention_V', h)) / (1 + np.exp(-dense('attention_U', h)))
    s = dense('attention_w', gate)[:, 0]
    a = np.exp(s - s.max())
    a /= a.sum()
    return dense('classifier', a @ h), a


@pytest.mark.parametrize('hidden', [32, 0])
def test_gated_attention_matches_numpy_and_ignores_padding(hidden):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(11, 12)).astype(np.float32)
    model = sm.GatedAttentionMIL(num_classes=3, hidden_dim=hidden, attention_dim=16)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x, np.ones(11, bool))['params']
    assert ('embed' in params) == bool(hidden)
    apply = jax.jit(model.apply)
    logits, attention = apply({'params': params}, x, np.ones(11, bool))
    ref_logits, ref_attention = _numpy_gated_attention(params, x, hidden)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(attention, ref_attention, rtol=1e-5, atol=1e-7)
    padded, mask = pad_bag(x, min_size=64)
    padded[11:] = 1e3 * rng.normal(size=(53, 12))   # garbage the mask alone must hide
    masked_logits, masked_attention = apply({'params': params}, padded, mask)
    np.testing.assert_allclose(masked_logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(masked_attention)[11:] == 0)
    label = jnp.int32(2)

    @jax.jit
    def grads(feats, m):
        def loss(p):
            out, _ = model.apply({'params': p}, feats, m)
            return optax.softmax_cross_entropy_with_integer_labels(out, label)
        return jax.grad(loss)(params)

    for a, b in zip(jax.tree.leaves(grads(padded, mask)),
                    jax.tree.leaves(grads(x, np.ones(11, bool)))):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_slide_metrics_match_sklearn():
    rng = np.random.default_rng(2)
    for classes in (2, 3):
        labels = np.arange(30) % classes
        logits = rng.normal(size=(30, classes)) + 0.8 * np.eye(classes)[labels]
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        out = slide_metrics(labels, logits)
        ref_auc = (roc_auc_score(labels, probs[:, 1]) if classes == 2 else
                   roc_auc_score(labels, probs, multi_class='ovr', average='macro'))
        assert out['auc'] == pytest.approx(ref_auc, abs=1e-12)
        assert out['balanced_accuracy'] == pytest.approx(
            balanced_accuracy_score(labels, probs.argmax(1)))
        assert out['accuracy'] == pytest.approx(np.mean(labels == probs.argmax(1)))
        assert out['loss'] == pytest.approx(log_loss(labels, probs), rel=1e-9)


def test_cluster_composition_by_hand(tmp_path):
    logits = np.array([[0, 0, 0], [np.log(2), 0, 0], [0, 0, 5], [0, 1, 0]], np.float32)
    arrays = {'features': np.zeros((4, 3), np.float32),
              'coords': np.zeros((4, 2), np.int64),
              'cluster_ids': np.array([0, 2, 2, 1], np.int32), 'cluster_logits': logits}
    fmt.write_slide_h5(str(tmp_path / 's.h5'), arrays, {}, {})
    vector = sm.cluster_composition({'s': str(tmp_path / 's.h5')}, 's')
    e5, e1 = np.exp(5.0), np.e
    soft = (np.array([1 / 3, 1 / 3, 1 / 3]) + np.array([0.5, 0.25, 0.25])
            + np.array([1, 1, e5]) / (2 + e5) + np.array([1, e1, 1]) / (2 + e1)) / 4
    np.testing.assert_allclose(vector, np.r_[[0.25, 0.25, 0.5], soft], rtol=1e-6)


# -------------------------------------------------------------- planted signal


def test_abmil_recovers_planted_signal_attends_to_it_and_is_deterministic(data):
    out = sm.run_abmil(data['export'], data['splits'], seeds=(0, 1), config=FAST)
    assert out['class_names'] == ['normal', 'tumour']
    assert (out['n_train'], out['n_val'], out['n_test']) == (40, 20, 40)
    summary = out['summary']
    assert summary['auc']['mean'] > 0.9 and summary['accuracy']['mean'] > 0.8
    assert summary['balanced_accuracy']['mean'] > 0.8
    values = summary['auc']['values']
    assert values == [r['test']['auc'] for r in out['runs']]
    assert summary['auc']['std'] == pytest.approx(np.std(values))
    # Intervals over test slides of the seed mean: the estimate is the summary's mean.
    assert out['n_test_slides'] == 40 and out['caution'] is None
    assert out['n_test_per_class'] == {'normal': 20, 'tumour': 20}
    assert 'seed mean' in out['bootstrap']
    for name in ('accuracy', 'balanced_accuracy', 'auc'):
        ci = out['confidence_intervals'][name]
        assert ci['estimate'] == pytest.approx(summary[name]['mean'], abs=1e-12)
        assert ci['low'] <= ci['estimate'] <= ci['high'] and ci['n_resamples'] == 1000

    bags, splits, _ = _bags(data)
    first = sm.train_abmil(bags['train'], bags['val'], bags['test'], 2, FAST, seed=0)
    again = sm.train_abmil(bags['train'], bags['val'], bags['test'], 2, FAST, seed=0)
    params = first.pop('params')
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again.pop('params'))):
        np.testing.assert_array_equal(a, b)
    assert first == again
    assert first['test'] == out['runs'][0]['test']
    assert first['best_epoch'] == out['runs'][0]['best_epoch']

    # Attention: on every positive test slide, a planted patch weighs far more than an
    # ordinary one (measured: 170x to 7000x).
    ratios = []
    for slide, label in splits['test']:
        x, planted, _ = data['slides'][slide]
        if label == 1:
            a = sm.abmil_attention(params, x, 2, FAST)
            assert a.shape == (len(x),) and a.sum() == pytest.approx(1, abs=1e-5)
            ratios.append(a[planted].mean() / a[~planted].mean())
    assert min(ratios) > 10, ratios

    # Selection never looks at test labels: flipping them mirrors the AUC only.
    flipped, _, _ = _bags(data, flip_test=True)
    mirror = sm.train_abmil(flipped['train'], flipped['val'], flipped['test'], 2, FAST,
                            seed=0)
    assert mirror['best_epoch'] == first['best_epoch']
    assert mirror['test_probs'] == first['test_probs']
    assert mirror['test']['auc'] == pytest.approx(1 - first['test']['auc'])


def test_abmil_is_near_chance_on_shuffled_labels(data):
    aucs = [sm.run_abmil(data['export'], _shuffled_splits(data, seed), seeds=(seed,),
                         config=FAST)['summary']['auc']['mean'] for seed in range(3)]
    assert abs(np.mean(aucs) - 0.5) < 0.25, aucs


@pytest.mark.parametrize('task', ['meanpool', 'clusters'])
def test_logistic_tasks_recover_planted_signal(data, task):
    run = getattr(sm, f'run_{task}')
    out = run(data['export'], data['splits'])
    # Measured: meanpool AUC 0.95, accuracy 0.875 (the planted patches are diluted in
    # the mean); clusters 0.985, 0.925.
    assert out['test']['auc'] > (0.9 if task == 'meanpool' else 0.95)
    assert out['test']['accuracy'] > 0.8 and out['test']['balanced_accuracy'] > 0.8
    assert out['dim'] == (2 * K if task == 'clusters' else DIM)
    # The chosen weight decay is the best on validation (AUC, then loss; larger on ties).
    scores = {float(wd): s for wd, s in out['val_scores'].items()}
    best = max(scores, key=lambda wd: (scores[wd]['auc'], -scores[wd]['loss'], wd))
    assert out['weight_decay'] == best
    assert out['val']['auc'] == scores[best]['auc']
    # Deterministic, and blind to test labels.
    assert run(data['export'], data['splits']) == out
    rows = [(s, sp, {'normal': 'tumour', 'tumour': 'normal'}[lab] if sp == 'test' else lab)
            for s, sp, lab in data['rows']]
    _write_splits(data['root'] / 'flipped.csv', rows)
    mirror = run(data['export'], data['root'] / 'flipped.csv')
    assert mirror['weight_decay'] == out['weight_decay']
    assert mirror['test']['auc'] == pytest.approx(1 - out['test']['auc'])


def test_logistic_tasks_are_near_chance_on_shuffled_labels(data):
    for run in (sm.run_meanpool, sm.run_clusters):
        aucs = [run(data['export'], _shuffled_splits(data, seed))['test']['auc']
                for seed in range(5)]
        assert abs(np.mean(aucs) - 0.5) < 0.2, (run.__name__, aucs)


def _interval_width(result, name):
    ci = result['confidence_intervals'][name]
    return ci['high'] - ci['low']


def test_slide_results_give_test_size_intervals_and_caution(data, caplog):
    full = sm.run_meanpool(data['export'], data['splits'])
    assert (full['n_test_slides'], full['caution']) == (40, None)
    assert full['n_test_per_class'] == {'normal': 20, 'tumour': 20}
    assert set(full['confidence_intervals']) == {'accuracy', 'balanced_accuracy', 'auc'}
    for name, ci in full['confidence_intervals'].items():
        assert ci['estimate'] == full['test'][name]
        assert ci['low'] <= ci['estimate'] <= ci['high']
    assert full['confidence_intervals']['accuracy']['n_skipped'] == 0

    # Fewer test slides (training and selection do not see them: the same model), two of
    # them misclassified: a wider interval.
    test_rows = [r for r in data['rows'] if r[1] == 'test']
    wrong = np.argmax(full['test_probs'], axis=1) != np.array(
        [['normal', 'tumour'].index(r[2]) for r in test_rows])
    assert 1 <= wrong.sum() <= 10
    few = [r for r, w in zip(test_rows, wrong) if w][:2]
    few += [r for r, w in zip(test_rows, wrong) if not w][:10 - len(few)]
    others = [r for r in data['rows'] if r[1] != 'test']
    _write_splits(data['root'] / 'ten_test.csv', others + few)
    ten = sm.run_meanpool(data['export'], data['root'] / 'ten_test.csv')
    assert ten['n_test_slides'] == 10 and ten['caution'].startswith('10 test slides')
    assert ten['weight_decay'] == full['weight_decay']
    for name in ('accuracy', 'balanced_accuracy'):
        assert _interval_width(ten, name) > _interval_width(full, name)

    # Two test slides: the caution, in the JSON and as a warning, with the intervals.
    two = [next(r for r in test_rows if r[2] == label) for label in ('normal', 'tumour')]
    _write_splits(data['root'] / 'two_test.csv', others + two)
    caplog.set_level('INFO', logger='clusiam_jax')
    for task in ('meanpool', 'clusters'):
        caplog.clear()
        out = getattr(tasks, f'run_{task}')(data['export'], data['root'] / 'two_test.csv')
        assert out['n_test_slides'] == 2
        assert out['n_test_per_class'] == {'normal': 1, 'tumour': 1}
        assert out['caution'].startswith(
            '2 test slides: scores are not measurable at this size')
        auc = out['confidence_intervals']['auc']
        assert 300 < auc['n_skipped'] < 700          # half the resamples hold one class
        warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
        assert any('2 test slides: scores are not measurable' in w for w in warnings)
        info = [r.getMessage() for r in caplog.records if r.levelname == 'INFO']
        assert any(m.startswith(f'{task}: 2 test slides (1 normal, 1 tumour): accuracy ')
                   for m in info), info
    json.dumps(out)


def test_meanpool_reads_a_clam_folder_like_the_export(data):
    ours = sm.run_meanpool(data['export'], data['splits'])
    clam = sm.run_meanpool(data['clam'], data['splits'])
    assert clam == ours


# ---------------------------------------------------------------------- errors


def test_missing_slides_are_named(data):
    path = data['root'] / 'ghosts.csv'
    _write_splits(path, data['rows'] + [('ghost_a', 'test', 'tumour'),
                                        ('ghost_b', 'train', 'normal')])
    for run in (sm.run_meanpool, sm.run_clusters):
        with pytest.raises(DataError, match=r'2 slides .* not in the export.*ghost_a'):
            run(data['export'], path)
    with pytest.raises(DataError, match='ghost_a'):
        sm.run_abmil(data['clam'], path, seeds=(0,), config=FAST)


def test_clusters_needs_cluster_ids(data):
    with pytest.raises(DataError, match='has no cluster_ids') as error:
        sm.run_clusters(data['clam'], data['splits'])
    assert '\n' not in str(error.value) and 'train_00' in str(error.value)


@pytest.mark.parametrize('rows, message', [
    ([('a', 'train', ''), ('b', 'val', 'x'), ('c', 'test', 'y')], 'needs a label column'),
    ([('a', 'train', 'x'), ('b', 'val', 'x'), ('c', 'test', 'x')], 'two classes or more'),
    ([('a', 'train', 'x'), ('b', 'train', 'y'), ('c', 'val', 'x'), ('d', 'val', 'y'),
      ('e', 'test', 'x')], 'no test slide of class y'),
    ([('a', 'train', 'x'), ('b', 'val', 'y'), ('c', 'test', 'x'), ('d', 'test', 'y')],
     'no train slide of class y'),
    ([('a', 'train', 'x'), ('b', 'train', 'y'), ('c', 'val', 'x'), ('d', 'val', 'y')],
     'lists no test slide'),
    ([('a', 'train', '0'), ('b', 'train', '2'), ('c', 'val', '0'), ('d', 'val', '2'),
      ('e', 'test', '0'), ('f', 'test', '2')], 'no train slide of class 1'),
])
def test_splits_that_cannot_be_evaluated(tmp_path, rows, message):
    _write_splits(tmp_path / 's.csv', rows)
    with pytest.raises(DataError, match=message):
        sm.labelled_splits(tmp_path / 's.csv', 'meanpool')


def test_without_val_slides_a_stratified_share_of_train_is_held_out(data):
    path = data['root'] / 'no_val.csv'
    _write_splits(path, [r for r in data['rows'] if r[1] != 'val'])
    held = []
    for seed in (0, 1):
        splits, _ = sm.labelled_splits(path, 'meanpool', holdout_seed=seed)
        assert len(splits['val']) == 8 and len(splits['train']) == 32
        assert sorted(label for _, label in splits['val']) == [0] * 4 + [1] * 4
        held.append({slide for slide, _ in splits['val']})
        assert not held[-1] & {slide for slide, _ in splits['train']}
    assert held[0] != held[1]
    out = sm.run_meanpool(data['export'], path, seed=1)
    assert (out['n_train'], out['n_val'], out['n_test']) == (32, 8, 40)


# ------------------------------------------------------------------------- CLI


def test_cli_prints_one_json_line(data, capsys):
    code = cli.main(['--mode', 'eval', 'meanpool', '--export', str(data['clam']),
                     '--splits', str(data['splits'])])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result['task'] == 'meanpool' and result['test']['auc'] > 0.9
    assert 'test_probs' not in result
    assert result['n_test_slides'] == 40 and result['caution'] is None
    ci = result['confidence_intervals']['auc']
    assert ci['low'] <= result['test']['auc'] <= ci['high']

    code = cli.main(['--mode', 'eval', 'abmil', '--export', str(data['export']),
                     '--splits', str(data['splits']), '--seeds', '0,1', '--epochs', '2'])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result['task'] == 'abmil' and [r['seed'] for r in result['runs']] == [0, 1]
    assert result['config']['epochs'] == 2
    assert result['n_test_slides'] == 40 and 'auc' in result['confidence_intervals']
    assert all(1 <= r['best_epoch'] <= 2 for r in result['runs'])

    code = cli.main(['--mode', 'eval', 'clusters', '--export', str(data['clam']),
                     '--splits', str(data['splits']), '--seed', '3'])
    assert code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'cluster_ids' in errors[0] and 'Traceback' not in err
