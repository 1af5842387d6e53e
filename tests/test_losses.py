"""The losses against independent NumPy references (docs/method.md §4), edge cases included."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusiam_jax import losses as eager_losses


class _Jitted:
    """The losses module with each function jitted: one compile instead of op-by-op dispatch."""

    def __getattr__(self, name):
        return jax.jit(getattr(eager_losses, name))


losses = _Jitted()


def np_cosine(a, b, eps=1e-8):
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(norms, eps)


def np_cluster_similarity(reps, logits, gumbel, eps=1e-8):
    """docs/method.md §4 step by step in float64: hard assignments, centroids, mean
    non-zero cosine."""
    reps, logits, gumbel = (np.asarray(a, np.float64) for a in (reps, logits, gumbel))
    r = reps / np.maximum(np.linalg.norm(reps, axis=1, keepdims=True), eps)
    y = logits + gumbel
    assign = np.zeros_like(y)
    assign[np.arange(len(y)), y.argmax(1)] = 1.0
    counts = assign.sum(0)
    centroids = assign.T @ r / np.maximum(counts, 1.0)[:, None]
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), eps)
    sims = centroids @ centroids.T
    k = len(sims)
    values = [sims[i, j] for i in range(k) for j in range(i + 1, k) if sims[i, j] != 0]
    return float(np.mean(values)) if values else 1.0


def random_inputs(seed, n=32, d=16, k=10, logit_scale=1.0):
    rng = np.random.default_rng(seed)
    reps = rng.normal(size=(n, d)).astype(np.float32)
    logits = (logit_scale * rng.normal(size=(n, k))).astype(np.float32)
    gumbel = rng.gumbel(size=(n, k)).astype(np.float32)
    return reps, logits, gumbel


@pytest.mark.parametrize('seed', range(5))
def test_cluster_similarity_matches_numpy(seed):
    reps, logits, gumbel = random_inputs(seed)
    got = float(losses.cluster_similarity(reps, logits, gumbel))
    np.testing.assert_allclose(got, np_cluster_similarity(reps, logits, gumbel), atol=1e-5)


def test_empty_clusters_drop_out():
    # 100 clusters, 12 rows: most clusters are empty, their zero centroids must not count.
    reps, logits, gumbel = random_inputs(7, n=12, k=100)
    counts = np.bincount((logits + gumbel).argmax(1), minlength=100)
    assert (counts == 0).sum() > 80
    got = float(losses.cluster_similarity(reps, logits, gumbel))
    np.testing.assert_allclose(got, np_cluster_similarity(reps, logits, gumbel), atol=1e-5)


def test_ties_take_the_first_index_and_exact_zero_cosines_are_excluded():
    # Rows 0-1 tie between clusters 1 and 2 (argmax picks 1, as torch.max does); the
    # centroids of clusters 0, 1 and 3 are orthogonal, whose exact-zero cosines the
    # original's non-zero mean skips.
    reps = np.eye(4, dtype=np.float32)[[0, 0, 1, 2]]
    logits = np.zeros((4, 4), np.float32)
    gumbel = np.array([[0, 3, 3, 0], [0, 3, 3, 0], [5, 0, 0, 0], [0, 0, 0, 4]], np.float32)
    hard = np.asarray(losses.straight_through_assignment(logits, gumbel))
    np.testing.assert_allclose(hard, np.eye(4)[[1, 1, 0, 3]], atol=1e-6)
    got = float(losses.cluster_similarity(reps, logits, gumbel))
    want = np_cluster_similarity(reps, logits, gumbel)
    assert want == 1.0  # every pair of centroids is orthogonal: no non-zero entry
    assert got == want
    reps[3] = [0.6, 0.8, 0, 0]  # cluster 3 now overlaps clusters 0 and 1
    np.testing.assert_allclose(float(losses.cluster_similarity(reps, logits, gumbel)),
                               np_cluster_similarity(reps, logits, gumbel), atol=1e-6)


def test_single_cluster_is_one_with_zero_finite_gradients():
    reps, _, gumbel = random_inputs(3, n=16, k=6)
    logits = np.zeros((16, 6), np.float32)
    logits[:, 2] = 50.0  # every row in cluster 2
    value, grads = jax.jit(jax.value_and_grad(eager_losses.cluster_similarity, argnums=(0, 1)))(
        jnp.asarray(reps), jnp.asarray(logits), jnp.asarray(gumbel))
    assert float(value) == 1.0
    for g in grads:
        assert np.all(np.isfinite(g)) and np.all(np.asarray(g) == 0)


def test_gradient_flows_only_through_the_assignment():
    reps, logits, gumbel = random_inputs(11, n=24, k=5)
    grad = jax.jit(jax.grad(eager_losses.cluster_similarity, argnums=(0, 1)))
    g_reps, g_logits = grad(reps, logits, gumbel)
    assert np.all(np.asarray(g_reps) == 0)
    assert np.all(np.isfinite(g_logits)) and np.abs(g_logits).max() > 1e-4


def test_gradients_finite_with_many_empty_clusters():
    reps, logits, gumbel = random_inputs(5, n=8, k=64)
    g = jax.jit(jax.grad(eager_losses.cluster_similarity, argnums=1))(reps, logits, gumbel)
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


def test_sampled_wrapper_uses_gumbel_noise_from_the_key():
    reps, logits, _ = random_inputs(2)
    key = jax.random.PRNGKey(4)
    noise = jax.random.gumbel(key, logits.shape)
    sampled = losses.cluster_similarity(reps, logits, eager_losses.sample_gumbel(key, logits.shape))
    np.testing.assert_allclose(float(sampled),
                               np_cluster_similarity(reps, logits, np.asarray(noise)), atol=1e-5)


def test_invariance_losses_match_numpy_and_stop_gradients():
    rng = np.random.default_rng(0)
    p1, p2, z1, z2 = (rng.normal(size=(8, 6)).astype(np.float32) for _ in range(4))
    want_simsiam = -(np_cosine(p1, z2).mean() + np_cosine(p2, z1).mean())
    want_byol = (1 - np_cosine(p1, z2)).mean() + (1 - np_cosine(p2, z1)).mean()
    np.testing.assert_allclose(float(losses.simsiam_invariance(p1, p2, z1, z2)), want_simsiam,
                               rtol=1e-5)
    np.testing.assert_allclose(float(losses.byol_invariance(p1, p2, z1, z2)), want_byol,
                               rtol=1e-5)
    for fn in (eager_losses.simsiam_invariance, eager_losses.byol_invariance):
        grads = jax.jit(jax.grad(fn, argnums=(0, 2, 3)))(p1, p2, z1, z2)
        assert np.abs(grads[0]).max() > 0
        assert np.all(np.asarray(grads[1]) == 0) and np.all(np.asarray(grads[2]) == 0)


def test_cosine_eps_guards_zero_vectors():
    zero = np.zeros((1, 4), np.float32)
    assert float(losses.cosine_similarity(zero, zero)[0]) == 0.0
    grad = jax.jit(jax.grad(lambda a: eager_losses.cosine_similarity(a, a).sum()))
    assert np.all(np.isfinite(grad(zero)))
