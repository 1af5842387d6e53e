r"""SimSiam baseline of the paper's tables: CluSiam's networks without the cluster term.

  python launch.py --config configs/simsiam.py --workdir runs/simsiam \
      --config.data.path=/data/camelyon16_patches
"""
from configs import clusiam


def get_config():
    c = clusiam.get_config()
    c.model.name = 'simsiam'
    c.loss.alpha = 0.0
    return c
