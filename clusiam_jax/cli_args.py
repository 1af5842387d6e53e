r"""The command line's words: the modes, their flags and the config overrides.

  python launch.py --mode tile [--config configs/<recipe>.py] --config.tile.slides=DIR_OR_CSV \
      --config.tile.out_dir=TILES
  python launch.py [--mode train] --config configs/<recipe>.py --workdir RUN [--config.KEY=V ...]
  python launch.py --mode export --workdir RUN [--config.export.KEY=VALUE ...]
  python launch.py --mode build_dataset --config.data.path=PATCHES --out DATASET_DIR
  python launch.py --mode eval knn|linear|dsmil|abmil|clusters|meanpool|maps --export DIR \
      [--splits CSV] ...
  python launch.py --mode convert from-torch CHECKPOINT --out RUN
  python launch.py --mode convert to-torch --workdir RUN --out FILE

The actions that make or use a run (tile, train, export, build_dataset) take its config:
a recipe and `--config.section.key=VALUE`, typed and checked by config.py. eval and
convert take flags: they read an export or translate weights, and own no config key.
A flag or config key that the action does not use is an error, never silently dropped.
"""
import argparse
import difflib
import os
import re
import runpy
import shlex
import sys

from clusiam_jax import errors

MODES = {
    'tile': 'find the tissue of whole slides and write their patch coordinates (TRIDENT '
            'layout) into tile.out_dir',
    'train': 'train per --config in --workdir (the default); started again, it resumes',
    'export': 'embeddings and cluster assignments of a run, per slide (CLAM-style HDF5)',
    'build_dataset': 'pack a patch folder, manifest CSV or tiling into ArrayRecord shards '
                     '(--out, a folder or a gs:// / s3:// URL)',
    'eval': 'evaluate an export: knn, linear, dsmil, abmil, clusters, meanpool (need '
            '--splits) or maps',
    'convert': 'from-torch: an original PyTorch checkpoint -> a run; to-torch: a run -> '
               'torchvision weights',
}
EVAL_TASKS = ('knn', 'linear', 'dsmil', 'abmil', 'clusters', 'meanpool', 'maps')
# The actions that take a config: the keys each reads (its --help), and why it refuses others.
CONFIG_MODES = {
    'tile': 'tiling reads --config.tile.* only',
    'build_dataset': 'it reads --config.data.path (and data.slide_dir), packed into --out',
    'export': "the run's config.json fixes the model, the image size and the data; export "
              'reads --config.export.* (e.g. export.data_path, export.image_size) and, for '
              'runs that record no normalization, --config.data.mean/std',
    'train': 'training reads every key but export.*, used only with '
             'export.after_training=True (or by --mode export)',
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised as ConfigError, printed once by main)."""

    def error(self, message):
        raise errors.ConfigError(f'{message} (see {self.prog} --help)')


def program_name() -> str:
    return 'clusiam' if os.path.basename(sys.argv[0] or '') == 'clusiam' else 'launch.py'


def command_hint(*words) -> str:
    program = 'clusiam' if program_name() == 'clusiam' else 'python launch.py'
    return ' '.join([program] + [shlex.quote(str(w)) for w in words])


def load_config_file(path: str):
    if not os.path.isfile(path):
        raise errors.ConfigError(f'--config {path}: no such file')
    try:
        config = runpy.run_path(path, run_name='_clusiam_recipe')['get_config']()
    except errors.ClusiamError:
        raise
    except Exception as e:  # any failure to load the recipe ends the command
        while len(e.args) == 1 and isinstance(e.args[0], Exception):
            e = e.args[0]  # a locked config's refusal: a KeyError inside an AttributeError
        text = str(e.args[0]) if len(e.args) == 1 else str(e)
        # ... which lists every other field: its key and hint say enough.
        text = re.sub(r'Other fields present: ".*"\n', '', text, flags=re.S)
        raise errors.ConfigError(f'cannot load --config {path}: {type(e).__name__}: '
                                 + ' '.join(text.split())) from None
    import ml_collections
    if not isinstance(config, ml_collections.ConfigDict):
        raise errors.ConfigError(f'--config {path}: get_config() returned {type(config).__name__}'
                                 ', not a ConfigDict (does it end with `return config`?)')
    return config.lock()


def split_overrides(argv):
    """(argv without them, [(key, text)]) for `--config.KEY=VALUE` / `--config.KEY VALUE`."""
    rest, overrides, args = [], [], iter(argv)
    for arg in args:
        if not arg.startswith('--config.'):
            rest.append(arg)
            continue
        key, eq, text = arg.removeprefix('--config.').partition('=')
        if not eq:
            text = next(args, '--')  # the next word is its value
            if text.startswith('--'):
                raise errors.ConfigError(f'{arg} needs a value ({arg}=VALUE)')
        overrides.append((key, text))
    return rest, overrides


def _used(mode: str, key: str, config) -> bool:
    if mode == 'tile':
        return key.startswith('tile.')
    if mode == 'build_dataset':
        return key in ('data.path', 'data.slide_dir')
    exporting = key.startswith('export.') and key != 'export.after_training'
    if mode == 'export':
        return exporting or key in ('data.mean', 'data.std', 'augment.hed')
    return not exporting or config.export.after_training


def _refuse_unknown_flags(parser, argv):
    """A misspelt flag, named with the closest one (before argparse's required-flag error)."""
    parsers = [parser] + [sub for action in parser._actions
                          if isinstance(action, argparse._SubParsersAction)
                          for sub in action.choices.values()]
    known = {flag for p in parsers for action in p._actions for flag in action.option_strings}
    for flag in [arg.split('=', 1)[0] for arg in argv if arg.startswith('--') and arg != '--']:
        if flag not in known and len([k for k in known if k.startswith(flag)]) != 1:
            close = difflib.get_close_matches(flag, sorted(known), n=1)
            raise errors.ConfigError(f'unknown flag {flag}'
                                     + (f'; did you mean {close[0]}?' if close else '')
                                     + f' (see {parser.prog} --help)')


def _step_flag(parser, instead: str):
    def refuse(text):  # `--step N`, retired: one way to pick a checkpoint
        raise argparse.ArgumentTypeError(f'give {instead}{text} instead')
    parser.add_argument('--step', type=refuse, help=argparse.SUPPRESS)


def _ints(text):
    try:
        return tuple(int(v) for v in text.split(',') if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f'not comma-separated integers: {text!r}') from None


def _eval_parser(sub, task: str):
    sub.add_argument('--export', required=True, dest='export_dir', metavar='DIR',
                     help='export directory (has manifest.csv)')
    if task != 'maps':
        sub.add_argument('--splits', required=True, dest='splits_path', metavar='CSV',
                         help='CSV slide_id,split[,label]')
    if task in ('knn', 'linear'):
        sub.add_argument('--positive', dest='positive_label', help='the positive class, for its F1')
        sub.add_argument('--key', default='features',
                         help='which embedding: features (default) or projections')
    if task in ('knn', 'linear', 'maps'):
        sub.add_argument('--annotations', help=(
            'folder of <slide_id>.geojson/.xml (QuPath GeoJSON, ASAP XML): '
            + ('contours drawn on the maps' if task == 'maps' else 'patch labels = the class '
               'of the polygon holding the patch centre, else normal')))
    if task == 'knn':
        sub.add_argument('--ks', type=_ints, default='1,5,20', help='neighbour counts')
    if task in ('dsmil', 'abmil'):
        sub.add_argument('--seeds', type=_ints, default='0,1,2,3,4',
                         help='seeds (mean and std over them)')
        epochs = 200 if task == 'dsmil' else 100
        sub.add_argument('--epochs', type=int, default=epochs,
                         help=f'epochs (default {epochs}; the best on val is kept)')
    if task == 'dsmil':
        sub.add_argument('--bags', choices=('auto', 'features', 'cat'), default='auto',
                         help="a slide's bag: auto (a multi-scale export's cat, else features)")
        sub.add_argument('--augmented', action='store_true',
                         help="also train on the export's stain-augmented copies "
                              '(export.augment_copies)')
    if task in ('clusters', 'meanpool'):
        sub.add_argument('--seed', type=int, default=0, help='picks the validation slides '
                         '(20%% of train) when the splits file has none')
    if task == 'maps':
        sub.add_argument('--thumbnail', help='thumbnail file or folder')
        sub.add_argument('--downsample', type=float, help='level-0 px per thumbnail px')
        sub.add_argument('--alpha', type=float, default=0.5, help='cluster colour opacity (0.5)')
    sub.add_argument('--out', help='also write the JSON line here')


def _convert_parsers(directions, prog: str):
    imp = directions.add_parser('from-torch', prog=f'{prog} from-torch',
                                help='original checkpoint -> work directory')
    imp.add_argument('checkpoint', help='.pth/.pth.tar of the original (or a state_dict)')
    imp.add_argument('--out', required=True, help='work directory to create')
    imp.add_argument('--model', choices=('clusiam', 'clubyol'),
                     help='expected method (default: detected from target_encoder.* keys)')
    imp.add_argument('--seed', type=int, default=0, help='train.seed of the new run')
    imp.add_argument('--mean', type=float, nargs=3, help="the training's normalization mean (RGB)")
    imp.add_argument('--std', type=float, nargs=3, help='... and std')
    exp = directions.add_parser('to-torch', prog=f'{prog} to-torch',
                                help="a run's encoder -> torchvision weights")
    exp.add_argument('--workdir', required=True, help='run (or imported) work directory')
    exp.add_argument('--out', required=True,
                     help='file to write: .safetensors (no torch needed) or .pth/.pt')
    exp.add_argument('--with-projector', action='store_true',
                     help="include the projector as the original's encoder.fc")
    exp.add_argument('--target', action='store_true',
                     help='BYOL-type runs: the EMA target encoder instead')
    exp.add_argument('--checkpoint',
                     help="latest (default), best (the run's train.best_metric) or a step")
    _step_flag(exp, '--checkpoint ')


def _mode_parser(mode: str) -> argparse.ArgumentParser:
    prog = f'{program_name()} --mode {mode}'
    parser = _Parser(prog=prog, description=MODES[mode])
    if mode in CONFIG_MODES:
        parser.add_argument('--config', required=mode == 'train',
                            help='recipe file, configs/<recipe>.py'
                                 + ('' if mode == 'train' else ' (optional: defaults)'))
        parser.epilog = ('Config keys: --config.<section>.<key>=VALUE (clusiam_jax/config.py '
                         f'lists them); {CONFIG_MODES[mode]}.')
    if mode in ('train', 'export'):
        parser.add_argument('--workdir', required=True, help='work directory of the run'
                            if mode == 'train' else 'the run to export')
    if mode == 'export':
        _step_flag(parser, '--config.export.checkpoint=')
    elif mode == 'build_dataset':
        parser.add_argument('--out', required=True, help='output folder of the dataset')
    elif mode == 'eval':
        tasks = parser.add_subparsers(dest='task', required=True, metavar='TASK',
                                      parser_class=_Parser)
        for task in EVAL_TASKS:
            _eval_parser(tasks.add_parser(task, prog=f'{prog} {task}'), task)
    elif mode == 'convert':
        _convert_parsers(parser.add_subparsers(dest='direction', required=True,
                                               metavar='DIRECTION', parser_class=_Parser), prog)
    return parser


def mode_of(argv) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith('--mode='):
            return arg.split('=', 1)[1]
        if arg == '--mode' and i + 1 < len(argv):
            return argv[i + 1]
    return 'train'


def parse(argv):
    """(mode, args, config or None, overrides): the config overridden and validated."""
    mode_parser = _Parser(prog=program_name(), add_help=False)
    mode_parser.add_argument('--mode', choices=list(MODES), default=None)
    mode_parser.add_argument('-h', '--help', action='store_true')
    known, rest = mode_parser.parse_known_args(argv)
    if known.help and known.mode is None:
        print(__doc__.split('\n\n')[1].rstrip(), '', 'modes:',
              *(f'  {mode:<14} {text}' for mode, text in MODES.items()), '',
              f'{program_name()} --mode MODE --help: the flags of a mode.', sep='\n')
        raise SystemExit(0)
    mode = known.mode or 'train'
    rest, overrides = split_overrides(rest + (['--help'] if known.help else []))
    parser = _mode_parser(mode)
    _refuse_unknown_flags(parser, rest)
    args = parser.parse_args(rest)
    args.argv = list(argv)  # for the run's log
    if mode not in CONFIG_MODES:
        if overrides:
            raise errors.ConfigError(f'--mode {mode} takes no config '
                                     f'(--config.{overrides[0][0]}=...)')
        return mode, args, None, overrides
    from clusiam_jax.config import default_config, override, validate, validate_tile
    config = load_config_file(args.config) if args.config else default_config()
    for key, text in overrides:
        override(config, key, text)
    for key, text in overrides:
        if not _used(mode, key, config):
            raise errors.ConfigError(f'--config.{key}={text} is not used by --mode {mode}: '
                                     f'{CONFIG_MODES[mode]}')
    if mode == 'tile':
        validate_tile(config.tile)
    else:  # before anything is created; an export's data is its run's
        validate(config, check_data_path=mode != 'export')
    return mode, args, config, overrides
