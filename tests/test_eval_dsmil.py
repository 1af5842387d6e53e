"""DSMIL: forward/loss vs a NumPy reference, masking, optimizer, training, IO."""

import csv
import functools

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusiam_jax.eval import tasks
from clusiam_jax.eval.dsmil import (
    ACCURACIES,
    DSMIL,
    DSMILConfig,
    bag_accuracy,
    dsmil_loss,
    dsmil_score,
    epoch_learning_rate,
    run_dsmil,
    train_dsmil,
)
from clusiam_jax.eval.metrics import youden_threshold
from clusiam_jax.eval.mil import adam_l2, bucket_length, pad_bag


@functools.lru_cache(maxsize=None)
def _init(num_classes, dim, length=8, seed=0):
    model = DSMIL(num_classes=num_classes)
    # Jitted throughout: eager Flax compiles every op separately (slow tests).
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((length, dim)),
                                 jnp.ones((length,), bool))['params']
    return model, jax.device_get(params)


def _numpy_dsmil(p, x, y):
    """Reference from docs/method.md §7, in float64."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    dense = lambda name, h: h @ p[name]['kernel'] + p[name]['bias']
    inst = dense('instance_classifier', x)                        # [N, C]
    q = np.tanh(dense('query_2', np.maximum(dense('query_1', x), 0)))
    crit = inst.argmax(axis=0)
    logits = q @ q[crit].T / np.sqrt(q.shape[1])                  # [N, C]
    att = np.exp(logits - logits.max(axis=0))
    att /= att.sum(axis=0)
    bag = dense('bag_classifier', (att.T @ x).reshape(-1))        # dense over C*D
    mx = inst.max(axis=0)

    def bce(z, t):
        s = 1 / (1 + np.exp(-z))
        return -(t * np.log(s) + (1 - t) * np.log(1 - s)).mean()
    loss = 0.5 * bce(bag, y) + 0.5 * bce(mx, y)
    score = 0.5 * (1 / (1 + np.exp(-bag)) + 1 / (1 + np.exp(-mx)))
    return att, crit, bag, mx, loss, score


def test_forward_and_loss_match_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 12)).astype(np.float32)
    y = np.array([0.0, 1.0], np.float32)
    model, params = _init(2, 12)
    assert params['bag_classifier']['kernel'].shape == (2 * 12, 2)
    bag, mx, extras = jax.jit(model.apply)({'params': params}, x, np.ones(7, bool))
    att, crit, ref_bag, ref_mx, ref_loss, ref_score = _numpy_dsmil(params, x, y)
    np.testing.assert_array_equal(extras['critical'], crit)
    np.testing.assert_allclose(extras['attention'], att, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bag, ref_bag, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mx, ref_mx, rtol=1e-5, atol=1e-6)
    assert float(dsmil_loss((bag, mx), y)) == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(dsmil_score((bag, mx)), ref_score, rtol=1e-5)


def test_padding_and_mask_do_not_change_outputs_or_gradients():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(11, 12)).astype(np.float32)
    y = jnp.array([1.0, 0.0])
    model, params = _init(2, 12)

    @jax.jit
    def run(feats, mask):
        def loss(p):
            bag, mx, _ = model.apply({'params': p}, feats, mask)
            return dsmil_loss((bag, mx), y), (bag, mx)
        (value, outs), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, outs, grads

    plain = run(x, np.ones(11, bool))
    padded, mask = pad_bag(x, min_size=64)
    assert padded.shape == (64, 12) and mask.sum() == 11
    # Garbage (huge values) in the padded rows: the mask alone must hide them.
    padded[11:] = 1e3 * rng.normal(size=(53, 12))
    masked = run(padded, mask)
    np.testing.assert_allclose(masked[0], plain[0], rtol=1e-5)
    for a, b in zip(masked[1], plain[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(masked[2]), jax.tree.leaves(plain[2])):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bucket_ladder_is_short():
    sizes = {bucket_length(n) for n in range(1, 20001)}
    assert len(sizes) <= 20 and min(sizes) == 64 and max(sizes) >= 20000
    assert all(bucket_length(n) >= n for n in (1, 64, 65, 1000, 20000))


def test_optimizer_is_adam_with_coupled_l2_and_epoch_cosine():
    config = DSMILConfig(epochs=4, lr=0.1, weight_decay=0.5, eta_min=0.0)
    opt = adam_l2(config.betas, config.weight_decay)
    w = jnp.array([1.0, -2.0])
    state = opt.init(w)
    m = v = np.zeros(2)
    ref = np.array([1.0, -2.0])
    for step in range(6):   # two steps per epoch
        g = np.array([0.3, 0.1]) * (step + 1)
        upd, state = opt.update(jnp.asarray(g), state, w)
        w = w - epoch_learning_rate(config, step // 2) * upd
        # PyTorch Adam(weight_decay) by hand: L2 added to the gradient.
        d = g + 0.5 * ref
        m = 0.5 * m + 0.5 * d
        v = 0.9 * v + 0.1 * d ** 2
        lr = 0.1 * 0.5 * (1 + np.cos(np.pi * (step // 2) / 4))
        ref = ref - lr * (m / (1 - 0.5 ** (step + 1))) / (
            np.sqrt(v / (1 - 0.9 ** (step + 1))) + 1e-8)
        np.testing.assert_allclose(w, ref, rtol=1e-5)


def _synthetic_bags(rng, count, dim=16):
    """Label 1 iff the bag holds 1-3 'tumour' instances (shifted along one axis)."""
    bags = []
    for i in range(count):
        label = i % 2
        x = rng.normal(size=(rng.integers(10, 60), dim)).astype(np.float32)
        if label:
            x[:rng.integers(1, 4), 0] += 6.0
        bags.append((x, label))
    return bags


# Bags of 10-59 instances all pad to the single 64 bucket: one compile.
FAST = DSMILConfig(epochs=6, lr=2e-3)


def test_learns_bag_labels_decided_by_few_instances():
    rng = np.random.default_rng(0)
    train, val, test = (_synthetic_bags(rng, n) for n in (60, 30, 40))
    result = train_dsmil(train, val, test, num_classes=2, config=FAST, seed=0)
    assert result['test']['auc'][1] > 0.9
    assert result['test']['accuracy_val_thresholds'] > 0.8
    assert result['test']['accuracy_argmax'] > 0.8
    assert 'accuracy' not in result['test'] and 'accuracy' not in result['val']
    # The thresholds are Youden's on the validation scores of the kept model.
    assert 1 <= result['best_epoch'] <= FAST.epochs
    apply = jax.jit(DSMIL(num_classes=2).apply)
    val_scores = []
    for x, _ in val:
        padded, mask = pad_bag(x)
        bag, mx, _ = apply({'params': result['params']}, padded, mask)
        val_scores.append(np.asarray(dsmil_score((bag, mx))))
    val_scores, val_labels = np.array(val_scores), np.array([y for _, y in val])
    np.testing.assert_allclose(
        result['thresholds'],
        [youden_threshold(val_labels == c, val_scores[:, c]) for c in range(2)], rtol=1e-5)
    # Test labels do not influence selection.
    flipped = [(x, 1 - y) for x, y in test]
    again = train_dsmil(train, val, flipped, num_classes=2, config=FAST, seed=0)
    assert again['best_epoch'] == result['best_epoch']
    assert again['thresholds'] == result['thresholds']
    np.testing.assert_allclose(again['test_scores'], result['test_scores'], rtol=1e-6)
    assert again['test']['auc'][1] == pytest.approx(1 - result['test']['auc'][1])


def test_bag_accuracy_needs_the_whole_one_hot_vector():
    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.2, 0.9], [0.3, 0.2]])
    assert bag_accuracy([0, 0, 1, 1], scores, [0.5, 0.5]) == 0.5


def test_run_dsmil_reads_split_csv_and_h5(tmp_path, caplog):
    rng = np.random.default_rng(2)
    rows = []
    for split, n in (('train', 20), ('validation', 10), ('test', 10)):
        for i, (x, label) in enumerate(_synthetic_bags(rng, n)):
            slide = f'{split}_{i}'
            with h5py.File(tmp_path / f'{slide}.h5', 'w') as f:
                f['features'] = x
                f['coords'] = np.zeros((len(x), 2), np.int64)
            rows.append({'slide_id': slide, 'label': ['normal', 'tumor'][label],
                         'split': split})
    with open(tmp_path / 'splits.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, ['slide_id', 'label', 'split'])
        writer.writeheader()
        writer.writerows(rows)
    out = run_dsmil(tmp_path, tmp_path / 'splits.csv', seeds=(0, 1),
                    config=DSMILConfig(epochs=3, lr=2e-3))
    assert out['class_names'] == ['normal', 'tumor']
    assert [r['seed'] for r in out['runs']] == [0, 1]
    summary = out['summary']
    values = summary['auc'][1]['values']
    assert len(values) == 2
    assert summary['auc'][1]['mean'] == pytest.approx(np.mean(values))
    assert summary['auc'][1]['std'] == pytest.approx(np.std(values))

    # The two accuracies, named for what they are; neither is a bare "accuracy".
    assert 'accuracy' not in summary
    assert set(out['accuracies']) == {'accuracy_argmax', 'accuracy_val_thresholds'}
    assert out['accuracies'] == ACCURACIES
    assert 'report this one' in ACCURACIES['accuracy_argmax']
    assert 'validation' in ACCURACIES['accuracy_val_thresholds']
    labels = np.array([['normal', 'tumor'].index(r['label']) for r in rows
                       if r['split'] == 'test'])
    for run in out['runs']:
        scores = np.array(run['test_scores'])
        assert run['test']['accuracy_argmax'] == np.mean(scores.argmax(1) == labels)
        decisions = scores >= np.array(run['thresholds'])
        assert run['test']['accuracy_val_thresholds'] == np.mean(
            (decisions == np.eye(2, dtype=bool)[labels]).all(1))

    # Test-set size, intervals of the seed means, and the caution (10 test slides).
    assert out['n_test_slides'] == 10
    assert out['n_test_per_class'] == {'normal': 5, 'tumor': 5}
    assert out['caution'].startswith('10 test slides: scores are not measurable')
    intervals = out['confidence_intervals']
    assert set(intervals) == {'accuracy_argmax', 'accuracy_val_thresholds', 'mean_auc',
                              'auc_normal', 'auc_tumor'}
    for name, ci in intervals.items():
        mean = (summary['auc'][('normal', 'tumor').index(name[4:])]['mean']
                if name.startswith('auc_') else summary[name]['mean'])
        assert ci['estimate'] == pytest.approx(mean, abs=1e-12)
        assert ci['low'] <= ci['estimate'] <= ci['high']
    caplog.set_level('INFO', logger='clusiam_jax')
    tasks.log_slide_result({'task': 'dsmil', **out})
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith('dsmil: 10 test slides (5 normal, 5 tumor): accuracy_argmax ')
               for m in messages), messages
    assert any(r.levelname == 'WARNING' and '10 test slides' in r.getMessage()
               for r in caplog.records)
