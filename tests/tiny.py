"""Tiny configs: every code path of the real recipes at a fraction of the compute."""
from configs import clubyol, clusiam


def tiny_config(method='clusiam', batch_size=8, image_size=32, num_epochs=2):
    recipe = clubyol if method in ('clubyol', 'byol') else clusiam
    c = recipe.get_config()
    c.model.name = method
    c.model.backbone = 'resnet_tiny'
    c.model.feat_size = 16
    c.model.pred_hidden = 32
    c.model.num_clusters = 8
    if method in ('simsiam', 'byol'):
        c.loss.alpha = 0.0
    c.data.image_size = image_size
    c.train.batch_size = batch_size
    c.train.num_epochs = num_epochs
    c.train.log_every_steps = 1
    c.train.checkpoint_every_epochs = 1
    return c
