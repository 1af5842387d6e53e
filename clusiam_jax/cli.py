"""The command line: one action per command (modes and flags: cli_args.py). Exit statuses:
2 and one `error:` line for bad input or a folder in use (workdir_lock); 1 for a disk or folder
failing under it; SIGTERM ends training with 0 (resumable), Ctrl-C with 130, other actions
stopped by a signal 128 + its number, as a killed one does."""
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading

from clusiam_jax import errors, fileio, interrupts, storage, workdir_lock
from clusiam_jax.cli_args import command_hint, mode_of, parse

log = logging.getLogger('clusiam_jax')

LOG_NAME = 'log.txt'
# A bucket's log.txt is rewritten whole this often (objects cannot be appended): a host killed
# loses at most this much of it, and a long run pays one small upload per half minute.
LOG_UPLOAD_EVERY_S = 30.0
_TRAIN_ON = ('--config', 'configs/clubyol.py', '--workdir', 'RUN')  # the next step's command


class _ConsoleHandler(logging.Handler):
    """Log lines through tqdm, so they do not tear a progress bar."""

    def emit(self, record):
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


def setup_logging():
    root = logging.getLogger()  # the project's INFO lines; other libraries' from WARNING up
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s', '%H:%M:%S'))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    for noisy in ('absl', 'jax', 'orbax'):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _RunLogFile(logging.FileHandler):
    """log.txt of a run: a failed write drops the file with one warning, not a traceback a line."""

    def handleError(self, record):
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            return super().handleError(record)
        logging.getLogger().removeHandler(self)
        with contextlib.suppress(OSError):
            self.close()
        log.warning('cannot write %s (%s); logging to the console only from here',
                    self.baseFilename, error.strerror or error)


class _StagedRunLog(_RunLogFile):
    """log.txt of a run in a bucket: lines go to a local copy (the object's lines first); a
    thread uploads the whole object every LOG_UPLOAD_EVERY_S (one try each), close() the last
    time: emit() never waits on the bucket (a failing one stalled every logging thread)."""

    def __init__(self, url: str):
        self.url, self._folder = url, tempfile.mkdtemp(prefix='clusiam-log-')
        local = os.path.join(self._folder, LOG_NAME)
        if storage.isfile(url):  # a resumed run's log goes on
            storage.download(url, local)
        super().__init__(local)
        self._written = self._sent = 0  # lines written locally / in the last upload
        self._stop = threading.Event()
        self._uploader = threading.Thread(target=self._upload_every, daemon=True,
                                          name='clusiam-log-upload')
        self._uploader.start()

    def emit(self, record):
        super().emit(record)
        self._written += 1

    def _upload_every(self):
        while not self._stop.wait(min(max(LOG_UPLOAD_EVERY_S, 0.05), threading.TIMEOUT_MAX)):
            if self._written != self._sent:
                self.upload()

    def upload(self):
        """The local copy as it is now, in one upload (outside the handler's lock)."""
        self.acquire()
        try:
            written = self._written
            if self.stream is None:
                return
            self.flush()
            with open(self.baseFilename, 'rb') as f:
                data = f.read()
        finally:
            self.release()
        try:
            storage.write_bytes(self.url, data)
            self._sent = written
        except storage.Fenced:  # another command holds the folder: its log.txt now
            self._sent = written
        except errors.DataError as e:  # the next upload tries again; the console has it all
            log.warning('%s; trying again in %.0f s', e, LOG_UPLOAD_EVERY_S)

    def close(self):
        self._stop.set()
        if self._uploader.is_alive() and self._uploader is not threading.current_thread():
            self._uploader.join()
        if self.stream is not None:
            self.upload()
        super().close()
        shutil.rmtree(self._folder, ignore_errors=True)


def log_to_workdir(workdir: str, argv):
    remote = storage.is_url(workdir)
    path = storage.join(workdir, LOG_NAME) if remote else os.path.abspath(
        os.path.join(workdir, LOG_NAME))
    try:
        handler = _StagedRunLog(path) if remote else _RunLogFile(path)
    except OSError as e:  # another user's run, read-only: the console still has it all
        log.warning('cannot write %s (%s); logging to the console only', path, e.strerror)
        return
    handler.clusiam_owned = True  # removed when the command ends (main)
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s %(message)s'))
    logging.getLogger().addHandler(handler)
    log.info('%s', ' '.join(['launch.py'] + list(argv)))


def is_distributed(config) -> bool:
    return bool(config.train.distributed) or os.environ.get('CLUSIAM_DISTRIBUTED') == '1'


def run_train(args, config, overrides):
    fileio.writable_folder(args.workdir, '--workdir')
    if is_distributed(config):
        # Before anything touches a device: one process per host joins the run.
        from clusiam_jax.parallel import initialize_distributed
        initialize_distributed()
    import jax
    main_process = jax.process_index() == 0
    # One run per work directory (held by process 0), before log.txt: a refused start writes none.
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
            from clusiam_jax.export.run import export
            out_dir = export(args.workdir, config.export, argv=args.argv,
                             hed=config.augment.hed)
            log.info('run complete: %s at step %d, exported to %s; next: %s', args.workdir, step,
                     out_dir, command_hint('--mode', 'eval', 'knn', '--export', out_dir,
                                           '--splits', 'SPLITS.csv'))
        else:
            log.info('run complete: %s at step %d; next: %s', args.workdir, step,
                     command_hint('--mode', 'export', '--workdir', args.workdir))
    return 0


def run_export(args, config, overrides):
    from clusiam_jax import run_dir
    run_dir.read_run_config(args.workdir)  # one line if it is not a run
    given = {k for k, _ in overrides}
    normalization = None
    if {'data.mean', 'data.std'} & given:
        if not {'data.mean', 'data.std'} <= given or config.data.mean is None:
            raise errors.ConfigError('give --config.data.mean=(R,G,B) and '
                                     '--config.data.std=(R,G,B) together')
        normalization = run_dir.Normalization(tuple(config.data.mean), tuple(config.data.std),
                                              'given on the command line')
    # Before the run's log.txt, which a refused export must not write to.
    from clusiam_jax.export import run as export_run
    with export_run.folder_lock(args.workdir, config.export, args.argv):
        log_to_workdir(args.workdir, args.argv)
        if args.config:
            log.info('export: the export section of %s; the model, image size and data '
                     "are the run's (config.json)", args.config)
        export_run.export(args.workdir, config.export, normalization, argv=args.argv,
                          hed=config.augment.hed)
    return 0


def run_tile(args, config, overrides):
    t = config.tile
    fileio.writable_folder(t.out_dir, '--config.tile.out_dir')
    from clusiam_jax.slides import tiling
    # Hosts splitting the slides share the folder (each writes its own part): no lock then.
    with workdir_lock.hold(t.out_dir, '--config.tile.out_dir', args.argv,
                           enabled=t.host_count == 1):
        if t.host_index == 0:   # one log.txt; the other hosts log to their console
            log_to_workdir(t.out_dir, args.argv)
        rows = tiling.tile_slides(tiling.list_slides(t.slides), tiling.TileParams.from_config(t),
                                  t.out_dir, num_workers=int(t.num_workers),
                                  host_index=t.host_index, host_count=t.host_count)
    n_ok = sum(r['status'] == tiling.TILED for r in rows)
    print(f'{n_ok} of {len(rows)} slides tiled into {t.out_dir}; train on them: '
          + command_hint(*_TRAIN_ON, f'--config.data.path={t.out_dir}'))
    return 0


def run_build_dataset(args, config, overrides):
    fileio.writable_folder(args.out, '--out')
    from clusiam_jax import data
    path = data.build_dataset(config.data.path, args.out, config.data.slide_dir)
    print(f'dataset written to {path}; train on it: '
          + command_hint(*_TRAIN_ON, f'--config.data.path={path}'))
    return 0


def run_eval(args, config, overrides):
    from clusiam_jax.eval import tasks
    # The flags are the evaluator's keyword arguments (cli_args._eval_parser).
    kwargs = {k: v for k, v in vars(args).items() if k not in ('task', 'out', 'argv')}
    result = getattr(tasks, f'run_{args.task}')(**kwargs)
    text = json.dumps(result, default=lambda o: o.tolist() if hasattr(o, 'tolist') else str(o))
    print(text)
    if args.out:
        try:
            fileio.write_text(args.out, text + '\n')
        except OSError as e:
            raise errors.ConfigError(f'--out {args.out}: cannot write it ({e.strerror})') from None
    return 0


def run_convert(args, config, overrides):
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
        metadata = write_torch_weights(args.workdir, args.out, args.with_projector, args.target,
                                       parse_checkpoint_choice(args.checkpoint or 'latest'))
        print(f'wrote {args.out}: ' + json.dumps(metadata))
    return 0


ACTIONS = {'tile': run_tile, 'train': run_train, 'export': run_export,
           'build_dataset': run_build_dataset, 'eval': run_eval, 'convert': run_convert}


def stop_status(mode, signum) -> int:
    return 0 if mode == 'train' and signum == signal.SIGTERM else 128 + signum


def console() -> int:
    """`main`; after a signal, an exit that leaves native threads alone (launch.py, clusiam)."""
    status = main()
    if interrupts.received() is not None:
        interrupts.exit_now(status)
    return status


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    root = logging.getLogger()
    root_state = (root.level, list(root.handlers))
    setup_logging()
    mode = mode_of(argv)
    # First: parsing loads the recipe (and JAX), seconds in which a signal must be recorded.
    previous = interrupts.install(status=lambda signum: stop_status(mode, signum))
    try:
        mode, args, config, overrides = parse(argv)
        if mode == 'train' and is_distributed(config) and signal.SIGTERM in previous:
            # Several processes: JAX's preemption service turns SIGTERM into a step all agree on.
            signal.signal(signal.SIGTERM, previous[signal.SIGTERM])
        interrupts.check()
        return ACTIONS[mode](args, config, overrides)
    except interrupts.Interrupted as e:
        print(interrupts.stop_message(e.name), file=sys.stderr)
        return stop_status(mode, e.signum)
    except KeyboardInterrupt:
        print('stopped by Ctrl-C', file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as e:  # bad input, or a disk or folder failing under it: one line
        found = errors.find_clusiam_error(e)
        failure = fileio.environment_failure(e) if found is None else None
        if found is None and failure is None:
            raise
        message = f'error: {found if found is not None else failure}'
        print(message, file=sys.stderr)
        # Also in the run's log.txt, so an unattended run says why it ended.
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
        for handler in [h for h in root.handlers if getattr(h, 'clusiam_owned', False)]:
            handler.handle(record)
        return 2 if found is not None else 1  # 1: fixing the disk or folder, a rerun resumes
    finally:
        interrupts.restore(previous)
        for handler in [h for h in root.handlers if getattr(h, 'clusiam_owned', False)]:
            handler.close()
        root.handlers[:] = root_state[1]
        root.setLevel(root_state[0])
