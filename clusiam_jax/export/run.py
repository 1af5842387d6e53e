r"""Export a run: the weights of its checkpoint over a patch source, to export/format.py's
layout.

  python launch.py --mode export --workdir RUN [--config.export.data_path=DIR]
      [--config.export.out_dir=DIR] [--config.export.format=npz] ...

The model, the image size it trained at and its normalization come from the run
(config.json, normalization.json); the `export` config section says what to embed and
how. `prepare_export` does everything that can fail on bad input before a patch is read
(restore, normalization, listing the source); `ExportJob.run_export()` embeds.
"""
import dataclasses
import functools
import json
import logging
import os
from typing import List, Optional

from clusiam_jax import run_dir
from clusiam_jax.config import parse_checkpoint_choice
from clusiam_jax.data import sources as sources_lib
from clusiam_jax.errors import ConfigError, DataError
from clusiam_jax.export import format as fmt
from clusiam_jax.export.embed import Embedder, EmbedOptions, export_embeddings, group_by_slide

log = logging.getLogger('clusiam_jax')

DEFAULT_DIR = 'export'


def resolve_normalization(run: run_dir.Run, given: Optional[run_dir.Normalization]):
    """The normalization to embed with: the run's; `given` (command line) only for runs
    that recorded none, since embedding with other statistics than training's changes
    every feature."""
    recorded = run.normalization
    if recorded is not None:
        if given is not None and (tuple(given.mean), tuple(given.std)) != (recorded.mean,
                                                                           recorded.std):
            raise ConfigError(f'the run trained with mean {list(recorded.mean)} std '
                              f'{list(recorded.std)} ({recorded.origin}); export uses '
                              f'those: drop --config.data.mean/std')
        return recorded
    if given is not None:
        return given
    raise ConfigError(f'{run.workdir} records no normalization (no {run_dir.NORMALIZATION_NAME}'
                      f' and no data.mean/std in its config): pass the training statistics '
                      f'with --config.data.mean=R,G,B --config.data.std=R,G,B')


@dataclasses.dataclass
class ExportJob:
    run: run_dir.Run
    data_path: str
    out_dir: str
    opened: tuple                  # (records, source) of data_path
    options: EmbedOptions
    normalization: run_dir.Normalization
    choice: object = 'latest'      # export.checkpoint / --step: latest | best | a step

    @functools.cached_property
    def slide_ids(self) -> List[str]:
        return list(group_by_slide(self.opened[0]))

    @property
    def checkpoint_note(self) -> str:
        """Which checkpoint and why, for export_info.json."""
        best = run_dir.read_best(self.run.workdir)
        if best is not None and best['step'] == self.run.step and self.choice == 'best':
            return (f"best: step {best['step']} by {best['metric']} = {best['value']:.6g} "
                    f"({best['mode']})")
        return f'{self.choice}: step {self.run.step}'

    def run_export(self) -> List[dict]:
        """Embeds and writes; returns the manifest rows. DataError if nothing was
        readable."""
        log.info('export: step %d of %s, %s -> %s (%d slides, %d patches at %d px; '
                 'normalization: %s)', self.run.step, self.run.workdir, self.data_path,
                 self.out_dir, len(self.slide_ids), len(self.opened[0]),
                 self.options.image_size, self.normalization.origin)
        embedder = Embedder(self.run.network, self.run.weights.online_variables,
                            self.normalization.mean, self.normalization.std, self.run.step)
        info = {'workdir': self.run.workdir, 'data_path': self.data_path,
                'checkpoint': self.checkpoint_note,
                'normalization': self.normalization.to_json(),
                'config': json.loads(run_dir.config_text(self.run.config))}
        rows = export_embeddings(embedder, self.opened, self.out_dir, self.options, info)
        n_patches = sum(r['n_patches'] for r in rows)
        if not n_patches:
            raise DataError(f'no readable patch in {self.data_path}: nothing was exported '
                            f'(unreadable files: '
                            f'{os.path.join(self.out_dir, fmt.SKIPPED_NAME)})')
        log.info('export: %d slides, %d patches in %s', len(rows), n_patches, self.out_dir)
        return rows


def _open(data_path, exp, trained_on):
    """The source to export: `export.slide_dir`, else the run's `data.slide_dir` when the
    export reads the run's own data; slide sources only as per-slide h5."""
    slide_dir = exp.slide_dir or (trained_on.slide_dir if data_path == trained_on.path
                                  else '')
    opened = sources_lib.open_source(data_path, slide_dir)
    if exp.format == 'npz' and hasattr(opened[1], 'slide_index'):
        raise ConfigError(f'{data_path} is read from whole slides: export it as per-slide '
                          f'h5 files (export.format=h5), which carry each slide\'s tiling '
                          f'attributes and slide path')
    return opened


def prepare_export(workdir: str, exp, normalization: Optional[run_dir.Normalization] = None,
                   step: Optional[int] = None) -> ExportJob:
    """Restores the run's weights and lists what to embed; `exp` is a validated `export`
    config section, `normalization` one given on the command line (see
    resolve_normalization)."""
    choice = step if step is not None else parse_checkpoint_choice(exp.checkpoint)
    run = run_dir.load_run(workdir, choice)
    data_path = exp.data_path or run.config.data.path
    if not data_path:
        raise ConfigError('nothing to export: set --config.export.data_path=DIR')
    if not os.path.exists(data_path):
        raise DataError(f'the patches to export are gone: {data_path} (the run\'s data.path);'
                        f' set --config.export.data_path=DIR')
    trained_at = run.config.data.image_size
    options = EmbedOptions(image_size=exp.image_size or trained_at,
                           batch_size=exp.batch_size, export_format=exp.format,
                           with_projection=exp.with_projection, num_workers=exp.num_workers,
                           pt_files=exp.pt_files)
    if exp.pt_files:
        if exp.format != 'h5':
            raise ConfigError('export.pt_files goes with export.format=h5 (per-slide files)')
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ConfigError('export.pt_files needs torch: pip install -r '
                              'requirements-torch.txt (or clusiam_jax[torch])') from None
    if options.image_size != trained_at:
        log.warning('export: embedding at %d px; the run trained at %d px (data.image_size)',
                    options.image_size, trained_at)
    return ExportJob(run=run, data_path=data_path, choice=choice,
                     out_dir=exp.out_dir or os.path.join(workdir, DEFAULT_DIR),
                     opened=_open(data_path, exp, run.config.data), options=options,
                     normalization=resolve_normalization(run, normalization))
