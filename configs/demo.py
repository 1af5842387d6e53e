r"""Demo: CluBYOL straight from a whole slide shipped in the package (the CC0 CMU-1 region),
a few minutes on CPU.

  python launch.py --mode tile --config configs/demo.py
  python launch.py --config configs/demo.py --workdir runs/demo

The first command finds the tissue of the slide and writes its patch grid (224 px at
0.5 µm/px) to runs/demo_tiles (look at runs/demo_tiles/masks/ for the grid); the second
trains on those patches read from the slide, then exports the embeddings and paints the
clusters over the slide (runs/demo/export/cluster_maps/). Smaller crops (96 px; the
recipes' 224 px costs several times more per step on a laptop CPU) and a small batch, so
a newcomer sees the whole flow within minutes.
"""
import os

import clusiam_jax
from clusiam_jax.config import method_config

DEMO_SLIDE = os.path.join(os.path.dirname(clusiam_jax.__file__), 'demo_data',
                          'cmu-1-small-region.svs')
DEMO_TILES = os.path.join('runs', 'demo_tiles')


def get_config():
    c = method_config('clubyol')
    c.tile.slides = DEMO_SLIDE
    c.tile.out_dir = DEMO_TILES
    c.data.path = DEMO_TILES
    c.data.image_size = 96
    c.model.num_clusters = 10
    c.train.batch_size = 16
    c.train.num_epochs = 20
    c.train.log_every_steps = 1
    c.train.checkpoint_every_epochs = 5
    # Then embed the slide's patches and paint their clusters over the slide:
    # runs/demo/export/cluster_maps/cmu-1-small-region.png
    c.export.after_training = True
    c.export.cluster_maps = True
    return c
