"""What may be checkpointed: every float finite and not exploded. A run can diverge through
steps with a finite loss and gradients; saving then would rotate out the last good checkpoint."""
import jax
import jax.numpy as jnp
import numpy as np

from clusiam_jax.checkpoint import leaf_name
from clusiam_jax.errors import NonFiniteError

# Far above trained weights, BatchNorm variances and optimizer moments; below float32's overflow.
EXPLODED = 1e10


def _float_leaves(tree):
    return [(path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if jnp.issubdtype(leaf.dtype, jnp.inexact) and leaf.size]


@jax.jit
def _largest_magnitudes(tree):
    return [jnp.max(jnp.abs(leaf)) for _, leaf in _float_leaves(tree)]


def check_saveable(state, step: int, ckpt=None):
    """NonFiniteError when a float of `state` is NaN, Inf or beyond EXPLODED; `ckpt`: the run's."""
    magnitudes = np.asarray(jax.device_get(_largest_magnitudes(state)), np.float64)
    bad = ~(np.isfinite(magnitudes) & (magnitudes <= EXPLODED))
    if not bad.any():
        return
    paths = [leaf_name(path) for path, _ in _float_leaves(state)]
    first = int(np.argmax(bad))
    steps = ckpt.all_steps() if ckpt is not None else []
    kept = (f'the checkpoint at step {steps[-1]} is kept and a restart resumes from it'
            if steps else 'there is no earlier checkpoint')
    raise NonFiniteError(
        f'the model diverged by step {step}: {paths[first]} reaches |x| = '
        f'{magnitudes[first]:.3g} ({int(bad.sum())} of {len(paths)} arrays non-finite or '
        f'above {EXPLODED:.0e}); this state was not saved, {kept}; lower optim.lr (or '
        f'check the data) before starting again')
