"""Export: a run's weights over a patch source, and everything written from it."""
