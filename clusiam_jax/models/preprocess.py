"""The network's input (ToTensor + Normalize, docs/method.md §1) and inference on images."""
import jax.numpy as jnp


def normalize_input(x, mean, std, dtype=jnp.float32):
    """uint8 [0, 255] or float [0, 1] images (NHWC) -> (x - mean) / std in `dtype`."""
    if jnp.issubdtype(x.dtype, jnp.integer):
        x = x.astype(jnp.float32) / 255.0  # ToTensor divides (as the reference tests do)
    x = x.astype(jnp.float32)
    return ((x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)).astype(dtype)


def embed_images(network, variables, images, mean, std, with_projection=False):
    """{'features', 'logits' (with a cluster head), 'projections' (on request)} of images."""
    out = network.apply(variables, normalize_input(images, mean, std, network.dtype), train=False)
    result = {k: out[k] for k in ('features', 'logits') if k in out}   # float32 already
    if with_projection:
        result['projections'] = out['z']
    return result
