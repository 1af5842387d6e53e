r"""SimSiam baseline of the paper's tables: CluSiam's networks without the cluster term.

  python launch.py --config configs/simsiam.py --workdir runs/simsiam \
      --config.data.path=/data/camelyon16_patches
"""
from clusiam_jax.config import method_config


def get_config():
    return method_config('simsiam')
