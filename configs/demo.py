r"""Demo: CluBYOL on the 42 H&E tiles shipped in the package (CMU-1, CC0), a few minutes on CPU.

  python launch.py --config configs/demo.py --workdir runs/demo

Smaller crops (96 px; the recipes' 224 px costs several times more per step on a laptop
CPU) and a small batch, so a newcomer sees the whole flow — training, logs, checkpoints,
then the embedding export and a cluster map of the slide (runs/demo/export/cluster_maps/)
— within minutes.
"""
import os

import clusiam_jax
from clusiam_jax.config import method_config

DEMO_DATA = os.path.join(os.path.dirname(clusiam_jax.__file__), 'demo_data')
DEMO_TILES = os.path.join(DEMO_DATA, 'cmu-1-small-region')


def get_config():
    c = method_config('clubyol')
    c.data.path = DEMO_TILES
    c.data.image_size = 96
    c.model.num_clusters = 10
    c.train.batch_size = 16
    c.train.num_epochs = 20
    c.train.log_every_steps = 1
    c.train.checkpoint_every_epochs = 5
    # Then embed the slide's tiles and paint their clusters over its thumbnail:
    # runs/demo/export/cluster_maps/cmu-1-small-region.png
    c.export.after_training = True
    c.export.cluster_maps = True
    c.export.thumbnail = os.path.join(DEMO_DATA, 'cmu-1-small-region_thumb.jpg')
    c.export.thumbnail_downsample = 8.0  # the thumbnail is level 0 / 8 (demo_data/README.md)
    return c
