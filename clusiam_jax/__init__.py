"""clusiam_jax: CluSiam / CluBYOL self-supervised learning for histopathology in JAX/Flax."""

__version__ = '0.1.0'
