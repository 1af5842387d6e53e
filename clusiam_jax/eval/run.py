"""`python -m clusiam_jax.eval.run TASK ...`, the older spelling of `--mode eval TASK ...`."""
import importlib
import sys

if __name__ == '__main__':  # a script entry, never imported: the CLI is a layer above, named here
    sys.exit(importlib.import_module('clusiam_jax.cli').main(['--mode', 'eval'] + sys.argv[1:]))
