"""PyTorch in and out: names and layouts, reading foreign weights, `convert` both ways."""
