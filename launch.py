r"""The one entry point: python launch.py --help lists the modes (clusiam_jax/cli.py).

  python launch.py --config configs/<recipe>.py --workdir DIR [--config.key=value ...]
  python launch.py --mode export --workdir DIR
  python launch.py --mode eval knn --export DIR/export --splits splits.csv
"""
import sys

from clusiam_jax.cli import console

if __name__ == '__main__':
    sys.exit(console())
