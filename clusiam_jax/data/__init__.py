"""Patch discovery, TFDS datasets, the two-view augmentation and the grain pipeline.

    from clusiam_jax import data
    loader = data.create_train_loader(config, workdir=workdir,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())
    it = loader.iterator()        # batches over all epochs; get_state/set_state
    batch = next(it)              # dict(view1, view2): uint8 [B_local, H, W, 3]
    x = data.to_device(batch, sharding)  # normalized on the device (models/preprocess.py)

Importing this package does not import JAX, TensorFlow or tensorflow-datasets
(grain worker processes import it to unpickle their transforms).
"""
from clusiam_jax.data.augment import (
    AugmentConfig,
    ViewParams,
    sample_crop,
    sample_view_params,
    two_views,
)
from clusiam_jax.data.device import prefetch_to_device, to_device
from clusiam_jax.data.image_io import BadImageError, decode_rgb, load_rgb
from clusiam_jax.data.pipeline import EpochPlan, TrainLoader, create_train_loader
from clusiam_jax.data.records import (
    PatchRecord,
    discover,
    read_patch_manifest,
    write_patch_manifest,
)
from clusiam_jax.data.stats import compute_stats

__all__ = ['AugmentConfig', 'BadImageError', 'EpochPlan', 'PatchRecord', 'TrainLoader',
           'ViewParams', 'build_dataset', 'compute_stats', 'create_train_loader',
           'decode_rgb', 'discover', 'load_rgb', 'prefetch_to_device',
           'read_patch_manifest', 'sample_crop', 'sample_view_params', 'to_device',
           'two_views', 'write_patch_manifest']

def build_dataset(source: str, out_dir: str) -> str:
    """Packs a patch folder or manifest into a TFDS ArrayRecord dataset; returns its dir."""
    from clusiam_jax.data import tfds_builder  # tfds is imported only when building
    return tfds_builder.build_dataset(source, out_dir)
