r"""The one entry point.

  python launch.py --config configs/<recipe>.py --workdir DIR [--config.key=value ...] [--mode train]
  python launch.py --mode build_dataset --config configs/<recipe>.py \
      --config.data.path=PATCHES --out DATASET_DIR

Modes: train (default; resumes from DIR's latest checkpoint), build_dataset (packs a patch
folder or manifest CSV into TFDS ArrayRecord shards that training reads faster), export
(per-patch embeddings and cluster assignments from DIR's latest checkpoint).
"""
import logging
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Path to a configs/<recipe>.py file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Work directory of the run (checkpoints, logs).')
flags.DEFINE_enum('mode', 'train', ['train', 'build_dataset', 'export'], 'What to do.')
flags.DEFINE_string('out', None, 'build_dataset: output directory of the dataset.')
FLAGS = flags.FLAGS


def fail(message: str):
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        fail(f'unexpected arguments: {" ".join(argv[1:])}')
    logging.getLogger('clusiam_jax').setLevel(logging.INFO)
    # orbax reports every save at INFO through absl: keep the console for the run's own log.
    logging.getLogger('absl').setLevel(logging.WARNING)
    # Imported here so that `--help` and flag errors answer without loading JAX.
    from clusiam_jax.config import ConfigError, validate
    from clusiam_jax.data.records import DataError
    config = FLAGS.config
    if config is None:
        fail('--config is required, e.g. --config configs/demo.py')
    try:
        config.keys()  # the config file loads lazily: surface its errors here, in one line
    except Exception as e:  # noqa: BLE001 - any failure to load the file ends the run
        cause = e.__cause__ or e
        fail(f'cannot load --config {FLAGS["config"].config_filename}: '
             + ' '.join(str(cause).split()))
    if config.train.distributed or os.environ.get('CLUSIAM_DISTRIBUTED') == '1':
        # Before anything touches a device: one process per host joins the run.
        from clusiam_jax.parallel import initialize_distributed
        initialize_distributed()
    try:
        if FLAGS.mode == 'build_dataset':
            if not FLAGS.out:
                fail('--out DATASET_DIR is required with --mode build_dataset')
            if os.path.isfile(FLAGS.out):
                fail(f'--out {FLAGS.out} is a file, not a folder')
            validate(config)
            from clusiam_jax import data
            path = data.build_dataset(config.data.path, FLAGS.out)
            print(f'dataset written to {path}; train on it with --config.data.path={path}')
            return
        if not FLAGS.workdir:
            fail('--workdir DIR is required')
        if os.path.isfile(FLAGS.workdir):
            fail(f'--workdir {FLAGS.workdir} is a file, not a folder')
        if FLAGS.mode == 'export':
            from clusiam_jax.export import export_run
            export_run(config, FLAGS.workdir)
            return
        from clusiam_jax.train.loop import train
        train(config, FLAGS.workdir)
        if config.export.after_training:
            from clusiam_jax.export import export_run
            export_run(config, FLAGS.workdir)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError,
            NotADirectoryError) as e:  # bad input, told in one line
        fail(str(e))


def parse_flags(argv):
    """absl's parser, with one-line errors instead of tracebacks (unknown config keys,
    values of the wrong type, a missing config file)."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        fail(' '.join(line.strip() for line in str(e).splitlines()))
    except (AttributeError, KeyError) as e:
        # ml_collections words it as a nested repr: "'key'\nDid you mean "other"?".
        text = str(e).replace('\\', '')
        key = re.search(r"'([A-Za-z_][\w]*)", text)
        key = key.group(1) if key else text
        culprits = [a for a in argv[1:] if a.startswith('--config.') and key in a]
        hint = re.search(r'Did you mean "([\w]+)"', text)
        fail(f'unknown config key {key!r} in {" ".join(culprits) or "the overrides"}'
             + (f'; did you mean {hint.group(1)!r}?' if hint else ''))
    except (TypeError, ValueError) as e:
        fail(f'bad config override: {e}')


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
