"""Patch discovery, TFDS datasets, the two-view augmentation and the grain pipeline.

    from clusiam_jax import data
    loader = data.create_train_loader(config, workdir=workdir,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())
    it = loader.iterator()        # batches over all epochs; get_state/set_state
    batch = next(it)              # dict(view1, view2): uint8 [B_local, H, W, 3]
    x = data.to_device(batch, sharding)  # then (x / 255 - mean) / std on device

Importing this package does not import JAX, TensorFlow or tensorflow-datasets
(grain worker processes import it to unpickle their transforms).
"""
from clusiam_jax.data.augment import AugmentConfig
from clusiam_jax.data.augment import ViewParams
from clusiam_jax.data.augment import normalize
from clusiam_jax.data.augment import sample_crop
from clusiam_jax.data.augment import sample_view_params
from clusiam_jax.data.augment import two_views
from clusiam_jax.data.device import prefetch_to_device
from clusiam_jax.data.device import to_device
from clusiam_jax.data.image_io import BadImageError
from clusiam_jax.data.image_io import decode_rgb
from clusiam_jax.data.image_io import load_rgb
from clusiam_jax.data.pipeline import EpochPlan
from clusiam_jax.data.pipeline import TrainLoader
from clusiam_jax.data.pipeline import create_train_loader
from clusiam_jax.data.records import DataError
from clusiam_jax.data.records import PatchRecord
from clusiam_jax.data.records import discover
from clusiam_jax.data.records import read_manifest
from clusiam_jax.data.records import write_manifest
from clusiam_jax.data.stats import compute_stats


def build_dataset(source: str, out_dir: str) -> str:
    """Packs a patch folder or manifest into a TFDS ArrayRecord dataset; returns its dir."""
    from clusiam_jax.data import tfds_builder  # tfds is imported only when building
    return tfds_builder.build_dataset(source, out_dir)
