r"""The command line: every action of the project behind one entry point.

  python launch.py --mode tile [--config configs/<recipe>.py] --config.tile.slides=DIR_OR_CSV \
      --config.tile.out_dir=TILES
  python launch.py [--mode train] --config configs/<recipe>.py --workdir RUN [--config.KEY=V ...]
  python launch.py --mode export --workdir RUN [--config.export.KEY=VALUE ...]
  python launch.py --mode build_dataset --config.data.path=PATCHES --out DATASET_DIR
  python launch.py --mode eval knn|linear|dsmil|abmil|clusters|meanpool|maps --export DIR \
      [--splits CSV] ...
  python launch.py --mode convert from-torch CHECKPOINT --out RUN
  python launch.py --mode convert to-torch --workdir RUN --out FILE

`python launch.py --help` lists the modes; `python launch.py --mode MODE --help` their
flags. The console script `clusiam` (installed with the package) is the same command.
Conventions: long flags (`--flag VALUE` or `--flag=VALUE`), config keys as
`--config.section.key=VALUE`; a flag or config key that the action does not use is an
error, never silently dropped. Bad input ends in one `error:` line and exit status 2; a
disk or folder that fails under a command (full, read-only, deleted while it runs) in one
`error:` line naming the file and exit status 1. One command at a time per work
directory, tiling output and export folder: a second one is refused (exit 2) with the
first one's pid, host, start time and command line (clusiam_jax/workdir_lock.py).
A training run stopped by SIGTERM exits 0 (a scheduler's notice: the run is resumable,
with a checkpoint when training had started); by Ctrl-C, 130. Other actions stopped by a
signal exit 128 + the signal number, as a killed command does.
"""
import argparse
import ast
import contextlib
import difflib
import importlib.util
import logging
import os
import shlex
import signal
import sys

from clusiam_jax import errors, fileio, interrupts

log = logging.getLogger('clusiam_jax')

LOG_NAME = 'log.txt'
MODES = {
    'tile': 'find the tissue of whole slides and write their patch coordinates (TRIDENT '
            'layout) into tile.out_dir',
    'train': 'train per --config in --workdir (the default); started again, it resumes',
    'export': 'embeddings and cluster assignments of a run, per slide (CLAM-style HDF5)',
    'build_dataset': 'pack a patch folder or manifest CSV into ArrayRecord shards (--out)',
    'eval': 'evaluate an export: knn, linear, dsmil, abmil, clusters, meanpool (need '
            '--splits) or maps',
    'convert': 'from-torch: an original PyTorch checkpoint -> a run; to-torch: a run -> '
               'torchvision weights',
}
EVAL_TASKS = ('knn', 'linear', 'dsmil', 'abmil', 'clusters', 'meanpool', 'maps')
EXIT_BAD_INPUT = 2
# The disk or a folder failed under the command (full, read-only, deleted): not the
# command's input, so not 2; starting it again once that is fixed resumes the work.
EXIT_ENVIRONMENT = 1


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised as ConfigError, printed once by main)."""

    def error(self, message):
        raise errors.ConfigError(f'{message} (see {self.prog} --help)')


# ---------------------------------------------------------------------- the config

def load_config_file(path: str):
    """`get_config()` of a recipe file (configs/<recipe>.py)."""
    if not os.path.isfile(path):
        raise errors.ConfigError(f'--config {path}: no such file')
    try:
        spec = importlib.util.spec_from_file_location('_clusiam_recipe', path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
    except errors.ClusiamError:
        raise
    except Exception as e:  # any failure to load the recipe ends the command
        raise errors.ConfigError(f'cannot load --config {path}: {type(e).__name__}: '
                                 + ' '.join(str(e).split())) from None
    import ml_collections
    if not isinstance(config, ml_collections.ConfigDict):
        # A recipe that forgot its `return config` would fail later, far from its cause.
        raise errors.ConfigError(f'--config {path}: get_config() returned '
                                 f'{type(config).__name__}, not a ConfigDict (does it end '
                                 f'with `return config`?)')
    return config


def split_overrides(argv):
    """(argv without them, [(key, text)]) for `--config.KEY=VALUE` / `--config.KEY VALUE`."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith('--config.'):
            key, eq, text = arg[len('--config.'):].partition('=')
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith('--'):
                    raise errors.ConfigError(f'{arg} needs a value ({arg}=VALUE)')
                i += 1
                text = argv[i]
            overrides.append((key, text))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _parse_value(text: str, kind, flag: str):
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ('true', 't', '1', 'yes'):
                return True
            if lowered in ('false', 'f', '0', 'no'):
                return False
            raise ValueError(f'expected true or false, got {text!r}')
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
        value = ast.literal_eval(text)
        return tuple(value) if kind is tuple and isinstance(value, list) else value
    except (ValueError, SyntaxError) as e:
        raise errors.ConfigError(f'bad config override {flag}: {e}') from None


def apply_overrides(config, overrides):
    """Sets each (dotted key, text) on `config`, parsed as the key's type; an unknown key
    is an error that suggests the closest known one."""
    for key, text in overrides:
        flag = f'--config.{key}={text}'
        node, parts = config, key.split('.')
        for depth, part in enumerate(parts):
            known = list(node.keys()) if hasattr(node, 'keys') else []
            if part not in known:
                close = difflib.get_close_matches(part, known, n=1)
                raise errors.ConfigError(
                    f'unknown config key {part!r} in {flag}'
                    + (f'; did you mean {close[0]!r}?' if close else
                       f'; known here: {", ".join(sorted(known))}'))
            if depth < len(parts) - 1:
                node = node[part]
        field = parts[-1]
        if hasattr(node[field], 'keys'):
            raise errors.ConfigError(f'{flag}: {key} is a section; set one of its keys')
        value = _parse_value(text, node.get_type(field), flag)
        try:
            node[field] = value
        except TypeError as e:
            raise errors.ConfigError(f'bad config override {flag}: {e}') from None
    return config


def refuse_unused(overrides, used, mode, why):
    """ConfigError for an override whose key `used(key)` says the action ignores."""
    for key, text in overrides:
        if not used(key):
            raise errors.ConfigError(f'--config.{key}={text} is not used by --mode {mode}: '
                                     f'{why}')


# --------------------------------------------------------------------- logging

class _ConsoleHandler(logging.Handler):
    """Log lines through tqdm, so they do not tear a progress bar."""

    def emit(self, record):
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


def setup_logging():
    """The project's INFO lines on the console; other libraries' WARNING and above only
    (JAX's backend probing and orbax's per-save lines are INFO)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _ConsoleHandler):
            root.removeHandler(handler)
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s',
                                           '%H:%M:%S'))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    for noisy in ('absl', 'jax', 'orbax'):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _RunLogFile(logging.FileHandler):
    """log.txt of a run: a write that fails (a full disk, a deleted folder) drops this
    file with one warning on the console, instead of a traceback per log line."""

    def handleError(self, record):
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            return super().handleError(record)
        logging.getLogger().removeHandler(self)
        with contextlib.suppress(OSError):
            self.close()
        log.warning('cannot write %s (%s); logging to the console only from here',
                    self.baseFilename, error.strerror or error)


def log_to_workdir(workdir: str, argv):
    """Appends this command's log to <workdir>/log.txt (process 0 of a run), starting with
    the command itself."""
    path = os.path.abspath(os.path.join(workdir, LOG_NAME))
    root = logging.getLogger()
    if any(getattr(h, 'baseFilename', None) == path for h in root.handlers):
        return
    try:
        handler = _RunLogFile(path)
    except OSError as e:  # another user's run, read-only: the console still has it all
        log.warning('cannot write %s (%s); logging to the console only', path, e.strerror)
        return
    handler.clusiam_owned = True  # removed when the command ends (main)
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s %(message)s'))
    root.addHandler(handler)
    log.info('%s', ' '.join(['launch.py'] + list(argv)))


# ----------------------------------------------------------------------- actions

def is_distributed(config) -> bool:
    return bool(config.train.distributed) or os.environ.get('CLUSIAM_DISTRIBUTED') == '1'


def run_train(args, config, overrides):
    from clusiam_jax.config import validate
    if not config.export.after_training:
        refuse_unused(overrides,
                      lambda k: not k.startswith('export.') or k == 'export.after_training',
                      'train',
                      'the export section is used only with export.after_training=True '
                      '(or by --mode export)')
    validate(config)  # before anything is created (train() checks the device count too)
    fileio.writable_folder(args.workdir, '--workdir')
    if is_distributed(config):
        # Before anything touches a device: one process per host joins the run.
        from clusiam_jax.parallel import initialize_distributed
        initialize_distributed()
    import jax

    from clusiam_jax import workdir_lock
    main_process = jax.process_index() == 0
    # One run per work directory (process 0 holds it for the run's processes), export
    # after training included; before log.txt, which a refused start must not touch.
    with workdir_lock.hold(args.workdir, '--workdir', args.argv, enabled=main_process), \
            fileio.quiet_environment_tracebacks():
        if main_process:
            log_to_workdir(args.workdir, args.argv)
        from clusiam_jax.train.loop import train
        state = train(config, args.workdir)
        stopped_by = interrupts.received()
        if stopped_by is not None:  # the loop saved a checkpoint and said so
            return stop_status('train', stopped_by)
        if not main_process:
            return 0
        step = int(jax.device_get(state.step))
        if config.export.after_training:
            from clusiam_jax.eval.atlas import write_atlas
            from clusiam_jax.export.run import export
            out_dir = export(args.workdir, config.export, argv=args.argv, atlas=write_atlas)
            log.info('run complete: %s at step %d, exported to %s; next: %s',
                     args.workdir, step, out_dir,
                     command_hint('--mode', 'eval', 'knn', '--export', out_dir, '--splits',
                                  'SPLITS.csv'))
        else:
            log.info('run complete: %s at step %d; next: %s', args.workdir, step,
                     command_hint('--mode', 'export', '--workdir', args.workdir))
    return 0


def run_export(args, config, overrides):
    from clusiam_jax import run_dir
    from clusiam_jax.config import validate

    def used(key):
        return ((key.startswith('export.') and key != 'export.after_training')
                or key in ('data.mean', 'data.std'))
    refuse_unused(overrides, used, 'export', "the run's config.json fixes the model, the "
                  'image size and the data; export takes --config.export.* (e.g. '
                  'export.data_path, export.image_size) and, for runs that record no '
                  'normalization, --config.data.mean/std')
    validate(config, check_data_path=False)
    run_dir.read_run_config(args.workdir)  # one line if it is not a run
    given = {k for k, _ in overrides}
    normalization = None
    if {'data.mean', 'data.std'} & given:
        if not {'data.mean', 'data.std'} <= given or config.data.mean is None:
            raise errors.ConfigError('give --config.data.mean=(R,G,B) and '
                                     '--config.data.std=(R,G,B) together')
        normalization = run_dir.Normalization(tuple(config.data.mean), tuple(config.data.std),
                                              'given on the command line')
    if args.step is not None and 'export.checkpoint' in given:
        raise errors.ConfigError('give --step or --config.export.checkpoint, not both')
    # Before the run's log.txt, which a refused export must not write to.
    from clusiam_jax.eval.atlas import write_atlas
    from clusiam_jax.export import run as export_run
    with export_run.folder_lock(args.workdir, config.export, args.argv):
        log_to_workdir(args.workdir, args.argv)
        if args.config:
            log.info('export: the export section of %s; the model, image size and data '
                     "are the run's (config.json)", args.config)
        export_run.export(args.workdir, config.export, normalization, args.step, args.argv,
                          atlas=write_atlas)
    return 0


def run_tile(args, config, overrides):
    from clusiam_jax.config import validate_tile
    refuse_unused(overrides, lambda k: k.startswith('tile.'), 'tile',
                  'tiling takes --config.tile.* only')
    validate_tile(config.tile)
    fileio.writable_folder(config.tile.out_dir, '--config.tile.out_dir')
    from clusiam_jax import workdir_lock
    from clusiam_jax.slides import tiling
    with workdir_lock.hold(config.tile.out_dir, '--config.tile.out_dir', args.argv):
        log_to_workdir(config.tile.out_dir, args.argv)
        entries = tiling.list_slides(config.tile.slides)
        params = tiling.TileParams.from_config(config.tile)
        rows = tiling.tile_slides(entries, params, config.tile.out_dir,
                                  num_workers=int(config.tile.num_workers))
    n_ok = sum(r['status'] == tiling.TILED for r in rows)
    print(f'{n_ok} of {len(rows)} slides tiled into {config.tile.out_dir}; train on them: '
          + command_hint('--config', 'configs/clubyol.py', '--workdir', 'RUN',
                         f'--config.data.path={config.tile.out_dir}'))
    return 0


def run_build_dataset(args, config, overrides):
    from clusiam_jax.config import validate
    refuse_unused(overrides, lambda k: k == 'data.path', 'build_dataset',
                  'it packs --config.data.path into --out')
    validate(config)
    fileio.writable_folder(args.out, '--out')
    from clusiam_jax import data
    path = data.build_dataset(config.data.path, args.out)
    print(f'dataset written to {path}; train on it: '
          + command_hint('--config', 'configs/clubyol.py', '--workdir', 'RUN',
                         f'--config.data.path={path}'))
    return 0


def _ints(text):
    try:
        return tuple(int(v) for v in text.split(',') if v)
    except ValueError:
        raise errors.ConfigError(f'expected comma-separated integers, got {text!r}') from None


def run_eval(args, config, overrides):
    import json

    from clusiam_jax.eval import tasks
    if args.task == 'knn':
        result = tasks.run_knn(args.export, args.splits, _ints(args.ks), args.positive,
                               args.key, annotations=args.annotations)
    elif args.task == 'linear':
        result = tasks.run_linear(args.export, args.splits, args.positive, args.key,
                                  annotations=args.annotations)
    elif args.task == 'dsmil':
        result = tasks.run_dsmil(args.export, args.splits, _ints(args.seeds), args.epochs)
    elif args.task == 'abmil':
        result = tasks.run_abmil(args.export, args.splits, _ints(args.seeds), args.epochs)
    elif args.task == 'clusters':
        result = tasks.run_clusters(args.export, args.splits, args.seed)
    elif args.task == 'meanpool':
        result = tasks.run_meanpool(args.export, args.splits, args.seed)
    else:
        result = tasks.run_maps(args.export, args.thumbnail, args.downsample, args.alpha,
                                args.annotations)
    text = json.dumps(result, default=lambda o: o.tolist() if hasattr(o, 'tolist') else str(o))
    print(text)
    if args.out:
        try:
            with open(args.out, 'w') as f:
                f.write(text + '\n')
        except OSError as e:
            raise errors.ConfigError(f'--out {args.out}: cannot write it ({e.strerror})') \
                from None
    return 0


def run_convert(args, config, overrides):
    import json
    if args.direction == 'from-torch':
        if (args.mean is None) != (args.std is None):
            raise errors.ConfigError('give --mean and --std together')
        from clusiam_jax.interop.from_torch import import_checkpoint
        config, weights = import_checkpoint(args.checkpoint, args.out, args.model, args.seed,
                                            args.mean, args.std)
        m = config.model
        print(f'imported {m.name} ({m.backbone}, D={m.feat_size}, K={m.num_clusters}) '
              f'into {args.out} at step {int(weights.step)} (weights only: train from it '
              f'with train.init_from={args.out})')
    else:
        from clusiam_jax.config import parse_checkpoint_choice
        from clusiam_jax.interop.to_torch import write_torch_weights
        if args.step is not None and args.checkpoint is not None:
            raise errors.ConfigError('give --step or --checkpoint, not both')
        choice = args.step if args.step is not None else parse_checkpoint_choice(
            args.checkpoint or 'latest')
        metadata = write_torch_weights(args.workdir, args.out, args.with_projector,
                                       args.target, choice)
        print(f'wrote {args.out}: ' + json.dumps(metadata))
    return 0


# ------------------------------------------------------------------- the parsers

def program_name() -> str:
    """How the user called us: `clusiam` (the installed script) or `launch.py`."""
    return 'clusiam' if os.path.basename(sys.argv[0] or '') == 'clusiam' else 'launch.py'


def command_hint(*words) -> str:
    """A command line the user can paste: our program and shell-quoted words (paths
    with spaces, quotes or brackets included)."""
    program = 'clusiam' if program_name() == 'clusiam' else 'python launch.py'
    return ' '.join([program] + [shlex.quote(str(w)) for w in words])


def _flags_of(parser) -> set:
    """Every option string of `parser` and of its subcommands."""
    flags = set()
    for action in parser._actions:
        flags.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _flags_of(sub)
    return flags


def _refuse_unknown_flags(parser, argv):
    """A misspelt flag is named, with the closest one (argparse would first complain
    about the required flag it hides, e.g. --workdir behind --workdri)."""
    known = _flags_of(parser)
    for arg in argv:
        if not arg.startswith('--') or arg == '--':
            continue
        flag = arg.split('=', 1)[0]
        if flag not in known and len([k for k in known if k.startswith(flag)]) != 1:
            close = difflib.get_close_matches(flag, sorted(known), n=1)
            raise errors.ConfigError(f'unknown flag {flag}'
                                     + (f'; did you mean {close[0]}?' if close else '')
                                     + f' (see {parser.prog} --help)')


def _mode_parser(mode: str) -> argparse.ArgumentParser:
    prog = f'{program_name()} --mode {mode}'
    parser = _Parser(prog=prog, description=MODES[mode])
    if mode in ('train', 'export', 'build_dataset', 'tile'):
        parser.add_argument('--config', required=mode == 'train',
                            help='recipe file, configs/<recipe>.py'
                                 + ('' if mode == 'train' else ' (optional: defaults)'))
    if mode == 'train':
        parser.add_argument('--workdir', required=True, help='work directory of the run')
        parser.epilog = ('Every config key can be set with --config.<section>.<key>=VALUE '
                         '(clusiam_jax/config.py lists them).')
    elif mode == 'export':
        parser.add_argument('--workdir', required=True, help='the run to export')
        parser.add_argument('--step', type=int, default=None,
                            help='checkpoint step (default: the latest)')
        parser.epilog = ('Set what to embed with --config.export.<key>=VALUE: data_path, '
                         'out_dir, format (h5|npz), checkpoint (latest|best|STEP), '
                         'image_size, batch_size, with_projection, cluster_maps, thumbnail, '
                         'thumbnail_downsample, pt_files, qupath, annotations, map_alpha, '
                         'slide_dir.')
    elif mode == 'build_dataset':
        parser.add_argument('--out', required=True, help='output folder of the dataset')
    elif mode == 'tile':
        parser.epilog = ('Set the slides and the output with --config.tile.slides=DIR_OR_CSV '
                         '--config.tile.out_dir=DIR; the other tile.* keys (target_mpp, '
                         'patch_size, overlap, min_tissue, mpp, masks, num_workers and the '
                         'detection parameters) are listed in clusiam_jax/config.py.')
    elif mode == 'eval':
        tasks = parser.add_subparsers(dest='task', required=True, metavar='TASK',
                                      parser_class=_Parser)
        for task in EVAL_TASKS:
            sub = tasks.add_parser(task, prog=f'{prog} {task}')
            sub.add_argument('--export', required=True,
                             help='export directory (has manifest.csv)')
            if task != 'maps':
                sub.add_argument('--splits', required=True, help='CSV slide_id,split[,label]')
            if task in ('knn', 'linear'):
                sub.add_argument('--positive', help='the positive class, for its F1')
                sub.add_argument('--key', default='features',
                                 help='which embedding: features (default) or projections')
            if task in ('knn', 'linear', 'maps'):
                sub.add_argument('--annotations',
                                 help='folder of <slide_id>.geojson/.xml (QuPath GeoJSON, '
                                      'ASAP XML): ' + ('contours drawn on the maps'
                                                       if task == 'maps' else
                                                       'patch labels = the class of the '
                                                       'polygon holding the patch centre, '
                                                       'else normal'))
            if task == 'knn':
                sub.add_argument('--ks', default='1,5,20', help='neighbour counts')
            if task in ('dsmil', 'abmil'):
                sub.add_argument('--seeds', default='0,1,2,3,4', help='seeds (mean and std '
                                                                      'over them)')
                default_epochs = 200 if task == 'dsmil' else 100
                sub.add_argument('--epochs', type=int, default=default_epochs,
                                 help=f'epochs (default {default_epochs}; the best on val '
                                      f'is kept)')
            if task in ('clusters', 'meanpool'):
                sub.add_argument('--seed', type=int, default=0,
                                 help='picks the validation slides (20%% of train) when the '
                                      'splits file has none')
            if task == 'maps':
                sub.add_argument('--thumbnail', help='thumbnail file or folder')
                sub.add_argument('--downsample', type=float,
                                 help='level-0 px per thumbnail px')
                sub.add_argument('--alpha', type=float, default=0.5,
                                 help='opacity of the cluster colours (default 0.5)')
            sub.add_argument('--out', help='also write the JSON line here')
    elif mode == 'convert':
        directions = parser.add_subparsers(dest='direction', required=True,
                                           metavar='DIRECTION', parser_class=_Parser)
        imp = directions.add_parser('from-torch', prog=f'{prog} from-torch',
                                    help='original checkpoint -> work directory')
        imp.add_argument('checkpoint', help='.pth/.pth.tar of the original (or a state_dict)')
        imp.add_argument('--out', required=True, help='work directory to create')
        imp.add_argument('--model', choices=('clusiam', 'clubyol'), default=None,
                         help='expected method (default: detected from target_encoder.* keys)')
        imp.add_argument('--seed', type=int, default=0, help='train.seed of the new run')
        imp.add_argument('--mean', type=float, nargs=3, default=None,
                         help="the training normalization's per-channel mean")
        imp.add_argument('--std', type=float, nargs=3, default=None, help='... and std')
        exp = directions.add_parser('to-torch', prog=f'{prog} to-torch',
                                    help="a run's encoder -> torchvision weights")
        exp.add_argument('--workdir', required=True, help='run (or imported) work directory')
        exp.add_argument('--out', required=True,
                         help='file to write: .safetensors (no torch needed) or .pth/.pt')
        exp.add_argument('--with-projector', action='store_true',
                         help="include the projector as the original's encoder.fc")
        exp.add_argument('--target', action='store_true',
                         help='BYOL-type runs: the EMA target encoder instead')
        exp.add_argument('--step', type=int, default=None,
                         help='checkpoint step (default: the latest)')
        exp.add_argument('--checkpoint', default=None,
                         help="latest (default), best (the run's train.best_metric) or a "
                              'step')
    return parser


ACTIONS = {'tile': run_tile, 'train': run_train, 'export': run_export,
           'build_dataset': run_build_dataset, 'eval': run_eval, 'convert': run_convert}


def _usage() -> str:
    lines = [__doc__.split('\n\n')[1].rstrip(), '', 'modes:']
    lines += [f'  {mode:<14} {text}' for mode, text in MODES.items()]
    lines += ['', f'{program_name()} --mode MODE --help: the flags of a mode.']
    return '\n'.join(lines)


def parse(argv):
    """(mode, args, config or None, overrides)."""
    mode_parser = _Parser(prog=program_name(), add_help=False)
    mode_parser.add_argument('--mode', choices=list(MODES), default=None)
    mode_parser.add_argument('-h', '--help', action='store_true')
    known, rest = mode_parser.parse_known_args(argv)
    if known.help and known.mode is None:
        print(_usage())
        raise SystemExit(0)
    mode = known.mode or 'train'
    rest, overrides = split_overrides(rest + (['--help'] if known.help else []))
    parser = _mode_parser(mode)
    _refuse_unknown_flags(parser, rest)
    args = parser.parse_args(rest)
    args.argv = list(argv)  # for the run's log
    config = None
    if mode in ('train', 'export', 'build_dataset', 'tile'):
        from clusiam_jax.config import default_config
        config = load_config_file(args.config) if args.config else default_config()
        apply_overrides(config, overrides)
    elif overrides:
        raise errors.ConfigError(f'--mode {mode} takes no config '
                                 f'(--config.{overrides[0][0]}=...)')
    return mode, args, config, overrides


def _mode_of(argv):
    """The --mode of `argv` as far as it can be told before parsing (train by default)."""
    for i, arg in enumerate(argv):
        if arg.startswith('--mode='):
            return arg.split('=', 1)[1]
        if arg == '--mode' and i + 1 < len(argv):
            return argv[i + 1]
    return 'train'


def stop_status(mode, signum) -> int:
    """The exit status of a command stopped by `signum` (see the module docstring)."""
    return 0 if mode == 'train' and signum == signal.SIGTERM else 128 + signum


def console() -> int:
    """launch.py and the `clusiam` script: `main`, then, after a signal, an exit that
    does not tear down native threads mid-flight (interrupts.exit_now)."""
    status = main()
    if interrupts.received() is not None:
        interrupts.exit_now(status)
    return status


def _log_error_to_files(message):
    """The `error:` line also in the run's log.txt, so an unattended run says why it
    ended (the console already printed it)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if getattr(handler, 'clusiam_owned', False):
            handler.handle(record)


def main(argv=None) -> int:
    """Runs one action; returns the exit status (0; 2 for bad input; 1 for a disk or
    folder that failed under it; after a signal see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    root = logging.getLogger()
    root_state = (root.level, list(root.handlers))
    setup_logging()
    mode = _mode_of(argv)
    # First of all: parsing loads the recipe (and JAX with it), seconds in which a signal
    # must already be recorded rather than kill the command with no word.
    previous = interrupts.install(status=lambda signum: stop_status(mode, signum))
    try:
        mode, args, config, overrides = parse(argv)
        if mode == 'train' and is_distributed(config) and signal.SIGTERM in previous:
            # Several processes leave SIGTERM to JAX's preemption service, which turns it
            # into a step all processes agree on.
            signal.signal(signal.SIGTERM, previous[signal.SIGTERM])
        interrupts.check()
        return ACTIONS[mode](args, config, overrides)
    except interrupts.Interrupted as e:
        print(interrupts.stop_message(e.name), file=sys.stderr)
        return stop_status(mode, e.signum)
    except KeyboardInterrupt:
        print('stopped by Ctrl-C', file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as e:  # bad input anywhere below: one line
        found = errors.find_clusiam_error(e)
        if found is None:
            # A full disk, a folder gone read-only or deleted mid-run: one line as well.
            from clusiam_jax.fileio import environment_failure
            failure = environment_failure(e)
            if failure is None:
                raise
            print(f'error: {failure}', file=sys.stderr)
            _log_error_to_files(f'error: {failure}')
            return EXIT_ENVIRONMENT
        print(f'error: {found}', file=sys.stderr)
        _log_error_to_files(f'error: {found}')
        return EXIT_BAD_INPUT
    finally:
        interrupts.restore(previous)
        for handler in [h for h in root.handlers if getattr(h, 'clusiam_owned', False)]:
            handler.close()
        root.handlers[:] = root_state[1]
        root.setLevel(root_state[0])
