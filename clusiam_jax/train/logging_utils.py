"""Per-epoch CSV, TensorBoard scalars and the collapse warnings (process 0 only)."""
import csv
import logging
import os

log = logging.getLogger('clusiam_jax')

CSV_FIELDS = ('epoch', 'step', 'time_s', 'pairs_per_s', 'lr', 'loss', 'invariance', 'cluster',
              'active_clusters', 'active_clusters_gumbel', 'gumbel_agreement',
              'cluster_entropy')


class MetricWriter:
    """Appends one CSV row per epoch to <workdir>/metrics.csv and writes TensorBoard events."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.csv_path = os.path.join(workdir, 'metrics.csv')
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter  # no TensorFlow needed
            self._tb = SummaryWriter(os.path.join(workdir, 'tb'))

    def scalars(self, step: int, values: dict, prefix: str = 'train/'):
        if not self.enabled:
            return
        for name, value in values.items():
            self._tb.add_scalar(prefix + name, value, step)

    def epoch_row(self, row: dict):
        if not self.enabled:
            return
        new = not os.path.exists(self.csv_path)
        with open(self.csv_path, 'a', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction='ignore')
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k, '') for k in CSV_FIELDS})
        self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()


def collapse_warnings(means: dict, num_clusters: int):
    """The two collapse modes the original's README names (SPEC s6), from epoch means.

    Mode 1: one logit dimension dominates, so even with Gumbel noise nearly every sample
    lands in the same one or two clusters. Mode 2: the logits are nearly uniform, so the
    Gumbel draw decides the assignment at random: the noisy argmax agrees with the clean
    one about 1/K of the time.
    """
    found = []
    gumbel_active = means.get('active_clusters_gumbel')
    if gumbel_active is not None and gumbel_active <= max(2.0, num_clusters / 50):
        found.append(f'collapse mode 1 (one cluster dimension dominates): only '
                     f'{gumbel_active:.1f} clusters used even after Gumbel noise; the cluster '
                     f'weight loss.alpha may be too large')
    agreement = means.get('gumbel_agreement')
    if agreement is not None and agreement < 1.5 / num_clusters:
        found.append(f'collapse mode 2 (near-uniform logits): Gumbel assignments agree with '
                     f'the argmax only {agreement:.3f} of the time (random: {1 / num_clusters:.3f}); '
                     f'loss.alpha may be too small')
    return found
