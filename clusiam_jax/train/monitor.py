"""Label-free monitoring and the best checkpoint (docs/method.md §6), the loop's optional hook.
A fixed set stays on the devices: one forward pass per monitor epoch, no recompilation."""
import dataclasses
import logging
import math
import os
import time
from typing import Dict, Optional

import jax
import numpy as np

from clusiam_jax import parallel, run_dir
from clusiam_jax.checkpoint import BEST_DIR, BEST_JSON, Checkpointer
from clusiam_jax.config import best_mode
from clusiam_jax.data import augment, image_io
from clusiam_jax.data.sources import open_source
from clusiam_jax.data.stats import sample_indices
from clusiam_jax.errors import ConfigError, DataError
from clusiam_jax.fileio import write_json
from clusiam_jax.knn import knn_predict, l2_normalize
from clusiam_jax.models.conv import compiler_options
from clusiam_jax.models.preprocess import embed_images
from clusiam_jax.train.metrics import collapse_warnings
from clusiam_jax.train.saveable import check_saveable
from clusiam_jax.train.step import cluster_diagnostics

log = logging.getLogger('clusiam_jax')

_SAMPLE, _VIEWS, _GUMBEL = 0x3011, 0x3012, 0x3013
_BATCH = 128


def rankme(features: np.ndarray, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023): exp(entropy) of the normalized singular values."""
    sigma = np.linalg.svd(np.asarray(features, np.float64), compute_uv=False)
    p = sigma / max(sigma.sum(), eps) + eps
    return float(np.exp(-np.sum(p * np.log(p))))


def alignment(view1: np.ndarray, view2: np.ndarray) -> float:
    """E |f(x) - f(x')|^2 over positive pairs, L2-normalized (Wang & Isola 2020)."""
    diff = l2_normalize(view1, dtype=np.float64) - l2_normalize(view2, dtype=np.float64)
    return float(np.mean(np.sum(diff ** 2, axis=1)))


def uniformity(features: np.ndarray, t: float = 2.0) -> float:
    """log E exp(-t |f(x) - f(y)|^2) over all pairs x != y, L2-normalized."""
    z = l2_normalize(features, dtype=np.float64)
    sq = np.maximum(2.0 - 2.0 * (z @ z.T), 0.0)
    return float(np.log(np.mean(np.exp(-t * sq[~np.eye(len(z), dtype=bool)]))))


def knn_scores(features, labels, slides) -> Optional[Dict[str, float]]:
    """Cosine 1-NN of the later half of the slides among the earlier half; None under 2 slides."""
    names = sorted(set(slides))
    if len(names) < 2:
        return None
    reference = np.isin(slides, names[: (len(names) + 1) // 2])
    predicted = knn_predict(features[reference], labels[reference], features[~reference])[1]
    truth = labels[~reference]
    recalls = [np.mean(predicted[truth == c] == c) for c in np.unique(truth)]
    return {'knn_top1': float(np.mean(predicted == truth)), 'knn_balanced': float(np.mean(recalls))}


@dataclasses.dataclass(frozen=True)
class MonitorSet:
    images: np.ndarray
    view1: np.ndarray
    view2: np.ndarray
    labels: Optional[np.ndarray]
    slides: np.ndarray


def build_monitor_set(source, indices, config, seed: int, transform=None) -> MonitorSet:
    """`indices` of `source` (unreadable ones left out) at data.image_size, with seeded views;
    `transform`: the training loader's (stain normalisation), so the monitor sees its input."""
    size = int(config.data.image_size)
    aug = dataclasses.replace(augment.AugmentConfig.from_config(config), on_device=False)
    images, v1, v2, labels, slides = [], [], [], [], []
    for i in map(int, indices):
        try:
            img = source.load(i) if transform is None else transform(source.load(i))
        except (image_io.BadImageError, DataError, OSError) as e:
            log.warning('monitor: skipping %s (%s)', source.path(i), e)
            continue
        a, b = augment.two_views(img, np.random.default_rng([seed, i, _VIEWS]), aug)
        h, w = img.shape[:2]
        images.append(img if (h, w) == (size, size) else
                      augment.resized_crop(img, (0, 0, h, w), size))
        record = source.record(i)
        for out, value in zip((v1, v2, labels, slides),
                              (a, b, record.label or '', record.slide_id or '')):
            out.append(value)
    if len(images) < 2:
        raise DataError(f'the monitor set has {len(images)} readable patches of '
                        f'{len(indices)} drawn: give monitor.data_path a readable source')
    labels = np.array(labels, dtype=object)
    return MonitorSet(np.stack(images), np.stack(v1), np.stack(v2),
                      labels if all(labels) else None, np.array(slides, dtype=object))


class Monitor:
    def __init__(self, network, mean, std, monitor_set: MonitorSet, mesh, num_clusters,
                 min_rankme: float, seed: int):
        self.set, self.num_clusters, self.min_rankme = monitor_set, num_clusters, min_rankme
        self.gumbel_key, self.warnings = jax.random.PRNGKey(seed ^ _GUMBEL), []
        ndev = mesh.devices.size
        self.batch = -(-min(_BATCH, len(monitor_set.images)) // ndev) * ndev
        # Replicated outputs: every process can fetch them.
        self._embed = jax.jit(
            lambda variables, images: embed_images(network, variables, images, mean, std),
            in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
            out_shardings=parallel.replicated(mesh),
            compiler_options=compiler_options(network.conv_impl))
        # Padded to whole batches; every process holds the whole set and places its shards.
        stacked = np.concatenate([monitor_set.images, monitor_set.view1, monitor_set.view2])
        stacked = np.pad(stacked, [(0, -len(stacked) % self.batch)] + [(0, 0)] * 3)
        self.batches = [jax.make_array_from_callback(chunk.shape, parallel.batch_sharded(mesh),
                                                     lambda index, chunk=chunk: chunk[index])
                        for chunk in np.split(stacked, len(stacked) // self.batch)]

    def embed_all(self, variables) -> Dict[str, np.ndarray]:
        """{'features', 'logits'?} over images, view1, view2 (in that order, unpadded)."""
        outs = jax.device_get([self._embed(variables, b) for b in self.batches])
        return {k: np.concatenate([o[k] for o in outs])[:3 * len(self.set.images)] for k in outs[0]}

    def scores(self, variables, judge_clusters: bool = True) -> Dict[str, float]:
        """The scores; collapse: low RankMe or (with `judge_clusters`) a collapse mode."""
        m, out = len(self.set.images), self.embed_all(variables)
        images, view1, view2 = np.split(out['features'], 3)
        result = {'rankme': rankme(images), 'alignment': alignment(view1, view2),
                  'uniformity': uniformity(images)}
        warnings = []
        if 'logits' in out:
            usage = jax.device_get(cluster_diagnostics(self.gumbel_key, out['logits'][:m]))
            result.update(usage)
            if judge_clusters:
                warnings = collapse_warnings(result, self.num_clusters, m)
        if result['rankme'] < self.min_rankme:
            warnings.append(f'RankMe {result["rankme"]:.2f} < monitor.min_rankme '
                            f'{self.min_rankme:g}: the features use about one direction')
        if self.set.labels is not None:
            result.update(knn_scores(images, self.set.labels, self.set.slides) or {})
        result['collapse'] = bool(warnings)
        self.warnings = warnings
        return {k: (float(v) if math.isfinite(v) else math.nan) for k, v in result.items()}


class MonitorHook:
    """The monitor every monitor.every_epochs (and the last) epoch; with train.best_metric, the
    best state so far in best_checkpoint/ and best_checkpoint.json."""

    def __init__(self, config, workdir, trainer, held_out=None, latest=None, transform=None):
        """`held_out`: the slides the data pipeline held out; `latest`: the run's Checkpointer;
        `transform`: the loader's patch transform (stain normalisation)."""
        self.config, self.workdir, self.latest = config, workdir, latest
        mon, seed = config.monitor, int(config.train.seed)
        source = open_source(mon.data_path, config.data.slide_dir) if mon.data_path else held_out
        if source is None:
            raise ConfigError("monitor.holdout holds out slides of the data pipeline's source; "
                              'this run was given its own loader: use monitor.data_path')
        chosen = sample_indices(len(source), int(mon.num_patches), [seed, _SAMPLE])
        monitor_set = build_monitor_set(source, chosen, config, seed, transform)
        if config.train.best_metric.startswith('monitor/knn') and (
                monitor_set.labels is None or len(set(monitor_set.slides)) < 2):
            raise ConfigError(f'train.best_metric={config.train.best_metric} needs a monitor '
                              f'set with labels on every patch and at least 2 slides')
        log.info('monitor: %d patches (%s), every %d epochs%s', len(monitor_set.images),
                 mon.data_path or f'{mon.holdout:g} of the training slides held out',
                 mon.every_epochs, '' if monitor_set.labels is None else ', with labels (kNN)')
        self.monitor = Monitor(trainer.network, trainer.mean, trainer.std, monitor_set,
                               trainer.mesh, config.model.num_clusters, float(mon.min_rankme), seed)
        self.metric, self.mode = config.train.best_metric, best_mode(config.train)
        # Every process saves (orbax writes each one's shards); process 0 writes the json.
        self.best_ckpt = Checkpointer(workdir, 1, subdir=BEST_DIR) if self.metric else None
        recorded = run_dir.read_best(workdir) if self.metric else None
        same = recorded and (recorded['metric'], recorded.get('mode')) == (self.metric, self.mode)
        self.best_value = recorded['value'] if same else None

    def __call__(self, epoch, step, state, data_state):
        if epoch % self.config.monitor.every_epochs and epoch != self.config.train.num_epochs:
            return {}, None
        start = time.perf_counter()
        scores = self.monitor.scores({'params': state.params, 'batch_stats': state.batch_stats},
                                     judge_clusters=epoch > 1)
        scores['seconds'] = round(time.perf_counter() - start, 3)
        if jax.process_index() == 0:
            log.info('epoch %d monitor: %s', epoch,
                     ', '.join(f'{k}={v:.4g}' for k, v in sorted(scores.items())))
            for warning in self.monitor.warnings:
                log.warning('epoch %d monitor: %s', epoch, warning)
        self.offer(step, epoch, scores, state, data_state)
        stop = None
        if scores['collapse'] and self.config.train.stop_on_collapse:
            stop = (f'train.stop_on_collapse: the monitor flags collapse at epoch {epoch} '
                    f'({"; ".join(self.monitor.warnings)})')
        return {f'monitor/{k}': v for k, v in scores.items()}, stop

    def offer(self, step, epoch, scores, state, data_state):
        """Keep `state` as the best checkpoint if its score beats the best so far."""
        value, best = scores.get(self.metric.removeprefix('monitor/'), math.nan), self.best_value
        if self.best_ckpt is None or scores.get('collapse') or not math.isfinite(value) or (
                best is not None and (value <= best if self.mode == 'max' else value >= best)):
            return
        check_saveable(state, step, self.latest)
        # Orbax saves only steps beyond its last: a replayed step's old best goes first.
        for old in self.best_ckpt.all_steps():
            if old >= step:
                self.best_ckpt.delete(old)
        self.best_ckpt.save(step, state, data_state)
        self.best_ckpt.wait()
        self.best_value = value
        if jax.process_index() == 0:
            write_json(os.path.join(self.workdir, BEST_JSON), {
                'step': step, 'epoch': epoch, 'metric': self.metric, 'value': value,
                'mode': self.mode}, indent=1)
            log.info('best checkpoint: step %d (%s %.4g)', step, self.metric, value)

    def close(self):
        if self.best_ckpt is not None:
            self.best_ckpt.close()
