"""Whole-slide images: reading at a µm/px, tissue, tiling, coordinate files, annotations.
Nothing here imports JAX: grain worker processes read slides through this package.
"""
