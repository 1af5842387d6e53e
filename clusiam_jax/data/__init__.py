"""The input pipeline: patch sources, the two-view augmentation, the grain loader.

    loader = data.create_train_loader(config, workdir=workdir, process_index=...,
                                      process_count=...)
    batch = next(loader.iterator())   # dict(view1, view2): uint8 [B_local, H, W, 3]

Importing it imports no JAX, TensorFlow or tensorflow-datasets: grain worker processes
import it to unpickle their transforms (train/prefetch.py puts batches on the devices).
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
