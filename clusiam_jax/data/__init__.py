"""The input pipeline: patch sources, the two-view augmentation, the grain loader. It imports
no JAX, TensorFlow or tensorflow-datasets: grain workers import it to unpickle their work.
"""
from clusiam_jax.data.augment import AugmentConfig, two_views
from clusiam_jax.data.image_io import BadImageError, decode_rgb, load_rgb
from clusiam_jax.data.pipeline import EpochPlan, TrainLoader, create_train_loader
from clusiam_jax.data.records import (
    PatchRecord,
    PatchSource,
    discover,
    read_patch_manifest,
    write_patch_manifest,
)
from clusiam_jax.data.sources import open_source
from clusiam_jax.data.stats import compute_stats

__all__ = ['AugmentConfig', 'BadImageError', 'EpochPlan', 'PatchRecord', 'PatchSource',
           'TrainLoader', 'build_dataset', 'compute_stats', 'create_train_loader',
           'decode_rgb', 'discover', 'load_rgb', 'open_source', 'read_patch_manifest',
           'two_views', 'write_patch_manifest']


def build_dataset(source: str, out_dir: str) -> str:
    """Packs a patch folder or manifest into a TFDS ArrayRecord dataset; returns its dir."""
    from clusiam_jax.data import tfds_builder  # tensorflow-datasets only when building
    return tfds_builder.build_dataset(source, out_dir)
