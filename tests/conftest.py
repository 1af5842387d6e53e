"""Test setup: 8 simulated CPU devices, set before JAX is imported."""
import os

# Sharding tests compare 1 device with 8; XLA reads this once, at backend start.
# XLA's backend optimisation level 0 cuts compile times (what dominates these tiny
# tests) by 2-4x on CPU; numerics stay float32 and every test compares within tolerance.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      '--xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
