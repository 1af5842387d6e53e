r"""BYOL baseline of the paper's tables: CluBYOL's networks without the cluster term.

  python launch.py --config configs/byol.py --workdir runs/byol \
      --config.data.path=/data/camelyon16_patches
"""
from configs import clubyol


def get_config():
    c = clubyol.get_config()
    c.model.name = 'byol'
    c.loss.alpha = 0.0
    return c
