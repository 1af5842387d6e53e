r"""CluBYOL, the paper's recipe: ResNet-18, D=256, predictor 4096, alpha 0.9, EMA target
0.99, no fix_pred_lr (the original forces it off) (docs/method.md).

  python launch.py --config configs/clubyol.py --workdir runs/clubyol \
      --config.data.path=/data/camelyon16_patches
"""
from clusiam_jax.config import method_config


def get_config():
    return method_config('clubyol')
