"""`python -m clusiam_jax.convert ...` is `launch.py --mode convert ...`, for existing scripts."""
import sys

from clusiam_jax import cli


def main(argv=None) -> int:
    return cli.main(['--mode', 'convert'] + list(sys.argv[1:] if argv is None else argv))


if __name__ == '__main__':
    sys.exit(main())
