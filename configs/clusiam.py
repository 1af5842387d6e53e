r"""CluSiam, the paper's recipe (SPEC s2, s5): ResNet-18, D=2048, alpha 0.5, fix_pred_lr.

  python launch.py --config configs/clusiam.py --workdir runs/clusiam \
      --config.data.path=/data/camelyon16_patches
"""
from clusiam_jax.config import default_config


def get_config():
    c = default_config()
    c.model.name = 'clusiam'
    c.model.feat_size = 2048
    c.model.pred_hidden = 512
    c.loss.alpha = 0.5
    c.optim.fix_pred_lr = True
    return c
