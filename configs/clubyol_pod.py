r"""CluBYOL at pod scale: global batch 4096 with LARS and a linear warmup, as BYOL trains at
that batch size (base lr 0.2 x batch/256, weight decay 1.5e-6 on kernels only, 10 warmup
epochs); everything else is the paper's CluBYOL recipe. Runs one process per host:

  # TPU pod slice (every host runs the same command; the work directory on a file system
  # every host mounts, e.g. Filestore):
  python launch.py --config configs/clubyol_pod.py --workdir /shared/runs/clubyol_pod \
      --config.data.path=/data/camelyon16_tfds
  # SLURM, one task per node (jax.distributed finds the coordinator from SLURM):
  srun python launch.py --config configs/clubyol_pod.py --workdir /shared/runs/clubyol_pod \
      --config.data.path=/shared/camelyon16_tfds
"""
from clusiam_jax.config import method_config


def get_config():
    c = method_config('clubyol')
    c.train.batch_size = 4096
    c.train.distributed = True
    c.optim.name = 'lars'
    c.optim.base_lr = 0.2
    c.optim.weight_decay = 1.5e-6
    c.optim.warmup_epochs = 10
    c.data.num_workers = 8
    return c
