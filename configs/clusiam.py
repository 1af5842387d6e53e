r"""CluSiam, the paper's recipe: ResNet-18, D=2048, alpha 0.5, fix_pred_lr (docs/method.md).

  python launch.py --config configs/clusiam.py --workdir runs/clusiam \
      --config.data.path=/data/camelyon16_patches
"""
from clusiam_jax.config import method_config


def get_config():
    return method_config('clusiam')
