"""Losses of docs/method.md §4, pure and in float32. `cluster_similarity` takes the Gumbel
noise as an argument (parity tests feed fixed noise)."""
import jax
import jax.numpy as jnp


def safe_norm(x, keepdims=True):
    """Row-wise L2 norm whose gradient at an all-zero row is 0, as PyTorch's, not NaN."""
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=keepdims)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def l2_normalize(x, eps=1e-8):
    """F.normalize (the original's eps): x / max(|x|, eps) row-wise."""
    return x / jnp.maximum(safe_norm(x), eps)


def cosine_similarity(a, b, eps=1e-8):
    """Row-wise a.b / max(|a||b|, eps) in float32 (F.cosine_similarity's eps)."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    dot = jnp.sum(a * b, axis=-1)
    return dot / jnp.maximum(safe_norm(a, keepdims=False) * safe_norm(b, keepdims=False), eps)


def simsiam_invariance(p1, p2, z1, z2):
    """-(mean cos(p1, sg z2) + mean cos(p2, sg z1)); in [-2, 2], -2 is perfect."""
    sg = jax.lax.stop_gradient
    return -(jnp.mean(cosine_similarity(p1, sg(z2))) + jnp.mean(cosine_similarity(p2, sg(z1))))


def byol_invariance(p1, p2, t1, t2):
    """mean(1 - cos(p1, sg t2)) + mean(1 - cos(p2, sg t1)); in [0, 4], 0 is perfect."""
    sg = jax.lax.stop_gradient
    return (jnp.mean(1.0 - cosine_similarity(p1, sg(t2)))
            + jnp.mean(1.0 - cosine_similarity(p2, sg(t1))))


def straight_through_assignment(logits, gumbel):
    """Y = softmax(A + G) and H = onehot(argmax Y) - sg(Y) + Y (temperature 1)."""
    soft = jax.nn.softmax(logits + gumbel, axis=-1)
    hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1], dtype=soft.dtype)
    return hard - jax.lax.stop_gradient(soft) + soft


def cluster_similarity(reps, logits, gumbel):
    """S: the mean pairwise cosine between the centroids of the non-empty clusters of
    [N, D] `reps` (no gradient) by [N, K] `logits` + noise; 1 with at most one cluster."""
    reps = l2_normalize(jax.lax.stop_gradient(reps.astype(jnp.float32)))
    assign = straight_through_assignment(logits.astype(jnp.float32), gumbel.astype(jnp.float32))
    counts = jnp.sum(assign, axis=0)
    centroids = l2_normalize((assign.T @ reps) / jnp.maximum(counts, 1.0)[:, None])
    sims = centroids @ centroids.T
    # The original's mean of the non-zero upper triangle: empty clusters drop out.
    mask = jnp.triu(jnp.ones(sims.shape, dtype=bool), k=1) & (sims != 0)
    num = jnp.sum(mask)
    mean = jnp.sum(jnp.where(mask, sims, 0.0)) / jnp.maximum(num, 1)
    return jnp.where(num > 0, mean, jnp.ones_like(mean))


def sample_gumbel(key, shape, dtype=jnp.float32):
    return jax.random.gumbel(key, shape, dtype)
