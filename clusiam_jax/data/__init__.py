"""The input pipeline: patch sources, the two-view augmentation, the grain loader. It imports
no JAX, TensorFlow or tensorflow-datasets: grain workers import it to unpickle their work."""
from clusiam_jax.data.image_io import BadImageError, decode_rgb, load_rgb
from clusiam_jax.data.pipeline import create_train_loader
from clusiam_jax.data.records import (
    PatchRecord,
    discover,
    read_patch_manifest,
    write_patch_manifest,
)
from clusiam_jax.data.sources import open_source

__all__ = ['BadImageError', 'PatchRecord', 'build_dataset', 'create_train_loader', 'decode_rgb',
           'discover', 'load_rgb', 'open_source', 'read_patch_manifest', 'write_patch_manifest']


def build_dataset(source: str, out_dir: str, slide_dir: str = '') -> str:
    from clusiam_jax.data import tfds_builder  # tensorflow-datasets only when building
    return tfds_builder.build_dataset(source, out_dir, slide_dir)
