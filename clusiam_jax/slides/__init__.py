"""Whole-slide images: reading at a physical resolution, tissue detection, tiling, the
coordinate files of CLAM and TRIDENT, and annotations.

Nothing here imports JAX: grain worker processes read slides through this package.
"""
