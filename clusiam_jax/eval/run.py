r"""`python -m clusiam_jax.eval.run TASK ...` (knn, linear, dsmil, abmil, clusters, meanpool,
maps): an alias of `python launch.py --mode eval ...` (clusiam_jax/cli.py), kept for
existing scripts."""
import sys

from clusiam_jax import cli


def main(argv=None) -> int:
    return cli.main(['--mode', 'eval'] + list(sys.argv[1:] if argv is None else argv))


if __name__ == '__main__':
    sys.exit(main())
