r"""BYOL baseline of the paper's tables: CluBYOL's networks without the cluster term.

  python launch.py --config configs/byol.py --workdir runs/byol \
      --config.data.path=/data/camelyon16_patches
"""
from clusiam_jax.config import method_config


def get_config():
    return method_config('byol')
