r"""`python -m clusiam_jax.convert from-torch|to-torch ...`: an alias of
`python launch.py --mode convert ...` (clusiam_jax/cli.py), kept for existing scripts."""
import sys

from clusiam_jax import cli


def main(argv=None) -> int:
    return cli.main(['--mode', 'convert'] + list(sys.argv[1:] if argv is None else argv))


if __name__ == '__main__':
    sys.exit(main())
