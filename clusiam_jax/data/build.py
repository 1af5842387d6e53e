"""CLI: pack a patch folder or manifest CSV into a TFDS ArrayRecord dataset.

    python -m clusiam_jax.data.build --source DIR_OR_CSV --out DIR

Prints the dataset folder to give as ``--config.data.path``.
"""
import argparse
import logging
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--source', required=True, help='patch folder or manifest CSV')
    parser.add_argument('--out', required=True, help='output folder for the dataset')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    from clusiam_jax.data import build_dataset  # pylint: disable=g-import-not-at-top
    try:
        dataset_dir = build_dataset(args.source, args.out)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(dataset_dir)
    return 0


if __name__ == '__main__':
    sys.exit(main())
