"""PyTorch interoperability: import the original's checkpoints, export torchvision weights.

  layout.py           torch key <-> our variable path, and the array layouts
  from_torch.py       original CluSiam/CluBYOL checkpoint -> TrainState / work directory
  to_torch.py         our weights -> torchvision / original state_dicts in safetensors
  run_io.py           a full TrainState around converted weights (I/O: ../run_dir.py)
  torch_reference.py  a PyTorch reference from SPEC.md for the parity tests (needs torch)

The command line is `python -m clusiam_jax.convert` (convert.py). Only reading a .pth
file and the reference need torch; exporting writes safetensors without it.
"""
