"""Correctness and quality experiments, not speed: PyTorch parity at the paper's sizes
(torch_parity), bfloat16 against float32 training (precision_check) and kNN / linear
probes on labeled nuclei (nuclei_probe_eval).

Run from the repository root as modules, e.g. `python -m bench.experiments.torch_parity`.
"""
