"""The one entry point: `python launch.py --help` lists the modes (clusiam_jax/cli_args.py)."""
import sys

from clusiam_jax.cli import console

if __name__ == '__main__':
    sys.exit(console())
