"""`python -m clusiam_jax.eval.run TASK ...`, the old spelling of `clusiam --mode eval TASK
...`: a script, not a module to import, reaching the command line (a layer above) by name."""
import importlib
import sys

if __name__ == '__main__':
    sys.exit(importlib.import_module('clusiam_jax.cli').main(['--mode', 'eval'] + sys.argv[1:]))
