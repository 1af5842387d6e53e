"""What may be checkpointed: a state whose every float is finite and not exploded.

The per-step guard (train/metrics.py) watches the loss and gradients; a learning rate
far too large can still drive the parameters to 1e35 through steps whose loss and
gradients are finite, and a checkpoint of that state, rotated in by
`train.keep_checkpoints`, deletes the last good one: every restart then resumes a dead
model. So every save first checks the state it writes — parameters, BatchNorm
statistics, optimizer and target state — in one reduction per save (no cost per step).
"""
import jax
import jax.numpy as jnp
import numpy as np

from clusiam_jax.checkpoint import leaf_name
from clusiam_jax.errors import NonFiniteError

# Magnitude beyond which a value of a normalised network's state means divergence: weights
# of a trained ResNet are O(1), BatchNorm variances of normalised inputs and optimizer
# moments stay many orders of magnitude below this, while a diverging run passes it on its
# way to float32's overflow (3.4e38).
EXPLODED = 1e10


@jax.jit
def _largest_magnitudes(tree):
    """max |x| of every float leaf (NaN when the leaf holds a NaN)."""
    return [jnp.max(jnp.abs(leaf)) for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.inexact) and leaf.size]


def _float_leaf_paths(tree):
    return [leaf_name(path) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if jnp.issubdtype(leaf.dtype, jnp.inexact) and leaf.size]


def check_saveable(state, step: int, last_saved=None):
    """NonFiniteError (nothing is saved) when any float of `state` is NaN, Inf or beyond
    EXPLODED; `last_saved` is the step of the checkpoint a restart would resume from."""
    magnitudes = np.asarray(jax.device_get(_largest_magnitudes(state)), np.float64)
    bad = ~(np.isfinite(magnitudes) & (magnitudes <= EXPLODED))
    if not bad.any():
        return
    paths = _float_leaf_paths(state)
    first = int(np.argmax(bad))
    kept = (f'the checkpoint at step {last_saved} is kept and a restart resumes from it'
            if last_saved is not None else 'there is no earlier checkpoint')
    raise NonFiniteError(
        f'the model diverged by step {step}: {paths[first]} reaches |x| = '
        f'{magnitudes[first]:.3g} ({int(bad.sum())} of {len(paths)} arrays non-finite or '
        f'above {EXPLODED:.0e}); this state was not saved, {kept}; lower optim.lr (or '
        f'check the data) before starting again')
