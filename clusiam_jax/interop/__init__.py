"""PyTorch in and out: layout.py (names and array layouts), read_weights.py (PyTorch,
safetensors and our runs -> our variables), from_torch.py and to_torch.py (`convert`)."""
