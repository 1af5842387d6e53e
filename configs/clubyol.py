r"""CluBYOL, the paper's recipe (SPEC s2, s5): ResNet-18, D=256, predictor 4096, alpha 0.9,
EMA target 0.99, no fix_pred_lr (the original forces it off).

  python launch.py --config configs/clubyol.py --workdir runs/clubyol \
      --config.data.path=/data/camelyon16_patches
"""
from clusiam_jax.config import default_config


def get_config():
    c = default_config()
    c.model.name = 'clubyol'
    c.model.feat_size = 256
    c.model.pred_hidden = 4096
    c.loss.alpha = 0.9
    c.optim.fix_pred_lr = False
    c.ema.momentum = 0.99
    return c
