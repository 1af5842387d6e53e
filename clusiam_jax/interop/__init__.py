"""PyTorch interoperability: import the original's checkpoints, export torchvision weights.

  layout.py       torch key <-> our variable path, and the array layouts
  from_torch.py   original CluSiam/CluBYOL checkpoint -> TrainState / work directory
  to_torch.py     our weights -> torchvision / original state_dicts (.safetensors or .pth)
  init_from.py    reading weights for train.init_from (torchvision/timm, original, ours);
                  train/init_from.py puts them into a fresh state

The command line is `python launch.py --mode convert from-torch|to-torch` (alias:
`python -m clusiam_jax.convert`). Only reading or writing a .pth file needs torch;
safetensors are written without it.
"""
