"""Train state, optimizer and schedules, the pure train step (step.py) and the loop (loop.py)."""
