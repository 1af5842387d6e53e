"""Metrics fetched at log steps, metrics.csv, TensorBoard, skipped steps (files: process 0 only).
In a bucket (objects cannot be appended) each file is rewritten whole: metrics.csv at each epoch
row; TensorBoard's events are written to a local folder and uploaded at each epoch row and at the
end (tensorboardX's own s3/gs writers hold the file in memory and upload it unretried from a
thread, with their own endpoint variables)."""
import collections
import logging
import math
import shutil
import tempfile

import jax
import numpy as np

from clusiam_jax import storage
from clusiam_jax.errors import NonFiniteError
from clusiam_jax.fileio import read_csv_rows, write_csv

log = logging.getLogger('clusiam_jax')

_CLUSTERS = ('active_clusters', 'active_clusters_gumbel', 'gumbel_agreement', 'cluster_entropy')
CSV_FIELDS = ('epoch', 'step', 'time_s', 'pairs_per_s', 'lr', 'loss', 'invariance', 'cluster',
              *_CLUSTERS, *(f'monitor_{k}' for k in ('rankme', 'alignment', 'uniformity',
                                                      *_CLUSTERS, 'knn_top1', 'knn_balanced',
                                                      'collapse', 'seconds')))
# Only a run that reads a bucket has these columns (a local run's metrics.csv is unchanged).
INPUT_FIELDS = ('input_requests', 'input_bytes', 'input_read_ms_mean', 'input_read_ms_p99',
                'input_retries', 'input_read_errors', 'input_slides_opened',
                'input_cache_hit_rate')
_INPUT_NAMES = {'requests': 'requests', 'bytes': 'bytes', 'latency_mean_ms': 'read_ms_mean',
                'latency_p99_ms': 'read_ms_p99', 'retries': 'retries', 'errors': 'read_errors',
                'slides_opened': 'slides_opened', 'cache_hit_rate': 'cache_hit_rate'}


class InputTelemetry:
    """The bucket reads behind the batches drawn (data/pipeline.py IO_KEY), per log window
    (TensorBoard input/...) and per epoch (metrics.csv input_..., the epoch's log line)."""

    def __init__(self, iterator, loader):
        self._take = getattr(iterator, 'take_input_counts', None)
        self.slides = getattr(getattr(loader, 'source', None), 'from_slides', False)
        self.epoch_counts = None

    def window(self):
        """This window's values named as in TensorBoard (None: the input reads no bucket)."""
        counts = self._take() if self._take is not None else None
        if counts is None:
            return None
        self.epoch_counts = counts if self.epoch_counts is None else self.epoch_counts + counts
        return self._named(counts)

    def epoch(self):
        """The epoch's values (metrics.csv's input_ columns; {} without bucket reads)."""
        counts, self.epoch_counts = self.epoch_counts, None
        if counts is None:
            return {}
        return {f'input_{k}': v for k, v in self._named(counts).items()}

    def _named(self, counts):
        summary = storage.Telemetry.summary(np.asarray(counts), slides=self.slides)
        return {_INPUT_NAMES[k]: (round(v, 3) if isinstance(v, float) else v)
                for k, v in summary.items() if v is not None}


def input_line(row: dict) -> str:
    """The epoch's bucket reads for the log ('' without them)."""
    if 'input_requests' not in row:
        return ''
    line = (f"; input: {row['input_requests']} requests, {row['input_bytes'] / 1e6:.1f} MB, "
            f"read {row['input_read_ms_mean']:.1f} ms mean / {row['input_read_ms_p99']:.1f} ms "
            f"p99, {row['input_retries']} retries, {row['input_read_errors']} read errors")
    if 'input_slides_opened' in row:
        line += f", {row['input_slides_opened']} slides opened"
    if 'input_cache_hit_rate' in row:
        line += f", slide cache hit rate {row['input_cache_hit_rate']:.2f}"
    return line


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled, self.rows, self._tb, self._staged = enabled, None, None, None
        self.csv_path = storage.join(workdir, 'metrics.csv')
        self.tb_dir = storage.join(workdir, 'tb')
        if enabled:
            from tensorboardX import SummaryWriter  # no TensorFlow needed
            if storage.is_url(workdir):
                self._staged = tempfile.mkdtemp(prefix='clusiam-tb-')
            self._tb = SummaryWriter(self._staged or self.tb_dir)

    def scalars(self, step: int, values: dict, prefix: str = 'train/'):
        if not self.enabled:
            return
        for name, value in values.items():
            self._tb.add_scalar(prefix + name, value, step)

    def epoch_row(self, row: dict):
        """A resumed run replays the epochs after its checkpoint: one row per epoch is kept."""
        if not self.enabled:
            return
        if self.rows is None:
            old = (read_csv_rows(self.csv_path, 'metrics file')[1]
                   if storage.exists(self.csv_path) else [])
            # A row damaged by hand (no epoch number) is kept, not judged.
            self.rows = [r for r in old if not (r.get('epoch') or '').isdigit() or
                         int(r['epoch']) < int(row['epoch'])]
        self.rows.append(row)
        fields = CSV_FIELDS + (INPUT_FIELDS if any(r.get('input_requests') not in (None, '')
                                                   for r in self.rows) else ())
        write_csv(self.csv_path, fields, ({k: r.get(k, '') for k in fields} for r in self.rows))
        self._tb.flush()
        self._upload_tb()

    def _upload_tb(self):
        """This run's events files, each uploaded whole (earlier runs' stay as they are)."""
        if self._staged is not None:
            storage.upload(self._staged, self.tb_dir, recursive=True)

    def close(self):
        if self._tb is not None:
            self._tb.close()
            try:
                self._upload_tb()
            finally:
                if self._staged is not None:
                    shutil.rmtree(self._staged, ignore_errors=True)


class SkippedSteps:
    """train.on_nonfinite='skip': rejected steps logged and listed; too many in a row end a run."""
    FILE_NAME = 'nonfinite_steps.txt'

    def __init__(self, workdir: str, max_in_a_row: int, write: bool):
        self.path = storage.join(workdir, self.FILE_NAME) if write else None
        self.max_in_a_row, self.in_a_row = max_in_a_row, 0

    def skipped(self, step: int, metrics: dict):
        self.in_a_row += 1
        values = f"loss={float(metrics['loss'])} grad_norm={float(metrics['grad_norm'])}"
        log.warning('step %d: %s; skipped (the state is unchanged, the batch is consumed)',
                    step, values)
        if self.path and storage.is_url(self.path):  # rare: the object is rewritten whole
            old = storage.read_bytes(self.path) if storage.isfile(self.path) else b''
            storage.write_bytes(self.path, old + f'{step} {values}\n'.encode('utf-8'))
        elif self.path:
            with open(self.path, 'a') as f:
                f.write(f'{step} {values}\n')
        if self.in_a_row > self.max_in_a_row:
            raise NonFiniteError(f'{self.in_a_row} steps in a row up to step {step} had a '
                                 f'non-finite loss or gradient (train.max_consecutive_skips='
                                 f'{self.max_in_a_row}); the last checkpoint is untouched')


class EpochStats:
    """Host-side means of the per-step metrics; non-finite raises (`skips` take skipped steps)."""

    def __init__(self, skips: SkippedSteps = None):
        self.pending, self.sums, self.count, self.skips, self.skipped = [], {}, 0, skips, 0

    def add(self, step, metrics):
        self.pending.append((step, metrics))

    def flush(self):
        fetched = jax.device_get([m for _, m in self.pending])
        window, n, skipped = collections.defaultdict(float), 0, 0
        for (step, _), metrics in zip(self.pending, fetched):
            if self.skips is not None:
                if metrics.pop('skipped') > 0:
                    skipped += 1
                    self.skips.skipped(step, metrics)
                    continue
                self.skips.in_a_row = 0
            for name, value in metrics.items():
                value = float(value)
                if not math.isfinite(value):
                    raise NonFiniteError(f'non-finite {name}={value} at step {step}; '
                                         f'no checkpoint was written for it')
                window[name] += value
                self.sums[name] = self.sums.get(name, 0.0) + value
            n += 1
        self.count, self.skipped, self.pending = self.count + n, self.skipped + skipped, []
        return self._means(window, n, skipped)

    def means(self):
        self.flush()
        return self._means(self.sums, self.count, self.skipped)

    def _means(self, sums, n, skipped):
        means = {k: v / n for k, v in sums.items()} if n else {}
        if self.skips is not None:
            means['skipped_steps'] = skipped
        return means


def collapse_warnings(means: dict, num_clusters: int, num_samples: int):
    """The original's two collapse modes (docs/method.md §6), from means over `num_samples`
    cluster assignments; mode 2 only when a one-sided 5% test rejects 'agreement >= 1.5/K'."""
    found = []
    gumbel_active = means.get('active_clusters_gumbel')
    if gumbel_active is not None and gumbel_active <= max(2.0, num_clusters / 50):
        found.append(f'collapse mode 1 (one cluster dimension dominates): only '
                     f'{gumbel_active:.1f} clusters used even after Gumbel noise; the cluster '
                     f'weight loss.alpha may be too large')
    agreement = means.get('gumbel_agreement')
    if agreement is not None and num_samples > 0:
        line = 1.5 / num_clusters
        if agreement + 1.645 * math.sqrt(line * (1 - line) / num_samples) < line:
            found.append(f'collapse mode 2 (near-uniform logits): Gumbel assignments agree '
                         f'with the argmax only {agreement:.3f} of the time (random: '
                         f'{1 / num_clusters:.3f}); loss.alpha may be too small')
    return found
