"""Representation monitoring during training, without labels (docs/method.md §6).

At the end of every `monitor.every_epochs`-th epoch (and the last) the online network,
in inference mode, embeds a fixed monitor set: `monitor.num_patches` patches (whole
patches, resized to data.image_size, as the export embeds them) plus two augmented views
of each (drawn once, with a fixed seed, by the training's own augmentation). The images
live on the devices, batch-sharded, from the first call; one compiled function embeds
them, so a monitor epoch costs one forward pass over 3 x num_patches images and no
recompilation. The scores (`monitor/...` in metrics.csv, TensorBoard and the log):

  rankme            RankMe (Garrido et al. 2023): exp of the entropy of the normalized
                    singular values of the backbone features [M, D]; the effective
                    number of dimensions in use (1 when one direction dominates)
  alignment         mean squared distance between the L2-normalized features of the two
                    views of a patch (Wang & Isola 2020, alpha 2; lower is more invariant)
  uniformity        log of the mean of exp(-2 |f(x) - f(y)|^2) over all pairs of patches
                    (t 2; lower is more spread over the sphere)
  active_clusters, active_clusters_gumbel, gumbel_agreement, cluster_entropy
                    the training's cluster diagnostics, on the monitor set
  knn_top1, knn_balanced
                    with labels only: cosine 1-NN of the query slides' patches among the
                    reference slides' (the monitor set's slides split in two, never a
                    slide in both)
  collapse          1 when RankMe < monitor.min_rankme or the cluster head shows one of
                    the two collapse modes (train/metrics.collapse_warnings), else 0

The monitor set is either `monitor.data_path` (any source data.path takes) or, with
`monitor.holdout` > 0, that fraction of the training source's slides, held out of
training (data/pipeline.py): chosen by slide, deterministically from train.seed.
"""
import dataclasses
import logging
import math
from typing import Dict, Optional

import jax
import numpy as np

from clusiam_jax import parallel
from clusiam_jax.data import augment, image_io
from clusiam_jax.errors import DataError
from clusiam_jax.losses import sample_gumbel
from clusiam_jax.models.conv import compiler_options
from clusiam_jax.models.preprocess import embed_images
from clusiam_jax.train.metrics import collapse_warnings

log = logging.getLogger('clusiam_jax')

_SAMPLE, _VIEWS, _GUMBEL = 0x3011, 0x3012, 0x3013
_BATCH = 128


# ----------------------------------------------------------------- scores (NumPy)

def rankme(features: np.ndarray, eps: float = 1e-7) -> float:
    """exp(entropy) of the singular values of [M, D], normalized to sum 1."""
    sigma = np.linalg.svd(np.asarray(features, np.float64), compute_uv=False)
    p = sigma / max(sigma.sum(), eps) + eps
    return float(np.exp(-np.sum(p * np.log(p))))


def _normalized(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def alignment(view1: np.ndarray, view2: np.ndarray) -> float:
    """E |f(x) - f(x')|^2 over positive pairs, features L2-normalized."""
    return float(np.mean(np.sum((_normalized(view1) - _normalized(view2)) ** 2, axis=1)))


def uniformity(features: np.ndarray, t: float = 2.0) -> float:
    """log E exp(-t |f(x) - f(y)|^2) over all pairs x != y, features L2-normalized."""
    z = _normalized(features)
    sq = np.maximum(2.0 - 2.0 * (z @ z.T), 0.0)
    off = ~np.eye(len(z), dtype=bool)
    return float(np.log(np.mean(np.exp(-t * sq[off]))))


def cluster_usage(logits: np.ndarray, noisy_logits: np.ndarray) -> Dict[str, float]:
    """The training's cluster diagnostics (train/step.cluster_diagnostics) over [M, K]."""
    k = logits.shape[1]
    clean, noisy = logits.argmax(1), noisy_logits.argmax(1)
    freq = np.bincount(clean, minlength=k) / len(clean)
    nz = freq[freq > 0]
    return {'active_clusters': float((freq > 0).sum()),
            'active_clusters_gumbel': float(len(np.unique(noisy))),
            'gumbel_agreement': float(np.mean(clean == noisy)),
            'cluster_entropy': float(-np.sum(nz * np.log(nz)))}


def knn_scores(features, labels, slides) -> Optional[Dict[str, float]]:
    """Cosine 1-NN of the second half of the slides among the first half's patches."""
    names = sorted(set(slides))
    if len(names) < 2:
        return None
    reference = np.isin(slides, names[: (len(names) + 1) // 2])
    if reference.all() or not reference.any():
        return None
    z = _normalized(features)
    nearest = np.argmax(z[~reference] @ z[reference].T, axis=1)
    predicted = labels[reference][nearest]
    truth = labels[~reference]
    recalls = [np.mean(predicted[truth == c] == c) for c in np.unique(truth)]
    return {'knn_top1': float(np.mean(predicted == truth)),
            'knn_balanced': float(np.mean(recalls))}


# ----------------------------------------------------------------- the monitor set

@dataclasses.dataclass(frozen=True)
class MonitorSet:
    """uint8 images [M, S, S, 3] (whole patches) and two views of each, plus labels and
    slides (None / '' when unknown)."""
    images: np.ndarray
    view1: np.ndarray
    view2: np.ndarray
    labels: Optional[np.ndarray]
    slides: np.ndarray


def build_monitor_set(records, source, indices, config, seed: int) -> MonitorSet:
    """Reads `indices` of `source` (unreadable ones are left out), resized to
    data.image_size; views from the training's augmentation with a fixed seed."""
    size = int(config.data.image_size)
    aug = augment.AugmentConfig.from_config(config)
    aug = dataclasses.replace(aug, on_device=False)
    images, v1, v2, labels, slides = [], [], [], [], []
    for i in indices:
        try:
            img = source.load(int(i))
        except (image_io.BadImageError, DataError, OSError) as e:
            log.warning('monitor: skipping %s (%s)', source.path(int(i)), e)
            continue
        rng = np.random.default_rng([seed, int(i), _VIEWS])
        a, b = augment.two_views(img, rng, aug)
        h, w = img.shape[:2]
        images.append(img if (h, w) == (size, size) else
                      augment.resized_crop(img, (0, 0, h, w), size))
        v1.append(a)
        v2.append(b)
        labels.append(records[int(i)].label or '')
        slides.append(records[int(i)].slide_id or '')
    if len(images) < 2:
        raise DataError(f'the monitor set has {len(images)} readable patches of '
                        f'{len(indices)} drawn: give monitor.data_path a readable source')
    labels = np.array(labels, dtype=object)
    return MonitorSet(np.stack(images), np.stack(v1), np.stack(v2),
                      labels if all(labels) else None, np.array(slides, dtype=object))


def sample_indices(n: int, size: int, seed: int) -> np.ndarray:
    """A fixed, sorted sample of `size` of n indices (all when n <= size)."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, _SAMPLE]).choice(n, size, replace=False))


# --------------------------------------------------------------- on the devices

class Monitor:
    """Embeds the monitor set with the online network and scores it (see module)."""

    def __init__(self, network, mean, std, monitor_set: MonitorSet, mesh, num_clusters,
                 min_rankme: float, seed: int):
        self.network, self.mesh, self.set = network, mesh, monitor_set
        self.num_clusters, self.min_rankme, self.seed = num_clusters, min_rankme, seed
        ndev = mesh.devices.size
        self.batch = -(-min(_BATCH, len(monitor_set.images)) // ndev) * ndev
        self._device_batches = None

        def embed(variables, images):
            return embed_images(network, variables, images, mean, std)
        # Replicated outputs: every process can fetch them (a mesh over several
        # processes refuses to fetch a batch-sharded array).
        self._embed = jax.jit(embed, in_shardings=(parallel.replicated(mesh),
                                                   parallel.batch_sharded(mesh)),
                              out_shardings=parallel.replicated(mesh),
                              compiler_options=compiler_options(network.conv_impl))

    def _batches(self):
        """The images of all three sets, padded to whole batches, on the devices once."""
        if self._device_batches is None:
            stacked = np.concatenate([self.set.images, self.set.view1, self.set.view2])
            pad = -len(stacked) % self.batch
            stacked = np.concatenate([stacked, np.zeros((pad,) + stacked.shape[1:],
                                                        stacked.dtype)])
            sharding = parallel.batch_sharded(self.mesh)
            # Every process holds the whole (deterministic) set: each places its shards.
            self._device_batches = [
                jax.make_array_from_callback(chunk.shape, sharding,
                                             lambda index, chunk=chunk: chunk[index])
                for chunk in (stacked[i:i + self.batch]
                              for i in range(0, len(stacked), self.batch))]
        return self._device_batches

    def embed_all(self, variables) -> Dict[str, np.ndarray]:
        """{'features', 'logits'?} over images, view1, view2 (in that order, unpadded)."""
        outs = [self._embed(variables, b) for b in self._batches()]
        outs = jax.device_get(outs)
        n = 3 * len(self.set.images)
        return {k: np.concatenate([o[k] for o in outs])[:n] for k in outs[0]}

    def scores(self, variables, judge_clusters: bool = True) -> Dict[str, float]:
        """The scores (module docstring). `judge_clusters=False` leaves the cluster
        collapse modes out of the flag: logits start near uniform, so the training's own
        check skips the first epoch, and so does the monitor."""
        m = len(self.set.images)
        out = self.embed_all(variables)
        feats = out['features']
        images, view1, view2 = feats[:m], feats[m:2 * m], feats[2 * m:]
        result = {'rankme': rankme(images), 'alignment': alignment(view1, view2),
                  'uniformity': uniformity(images)}
        warnings = []
        if 'logits' in out:
            logits = out['logits'][:m]
            noise = np.asarray(sample_gumbel(jax.random.PRNGKey(self.seed ^ _GUMBEL),
                                             logits.shape))
            usage = cluster_usage(logits, logits + noise)
            result.update(usage)
            if judge_clusters:
                warnings = collapse_warnings(usage, self.num_clusters, m)
        if result['rankme'] < self.min_rankme:
            warnings.append(f'RankMe {result["rankme"]:.2f} < monitor.min_rankme '
                            f'{self.min_rankme:g}: the features use about one direction')
        if self.set.labels is not None:
            knn = knn_scores(images, self.set.labels, self.set.slides)
            if knn is not None:
                result.update(knn)
        result['collapse'] = float(bool(warnings))
        self.warnings = warnings
        return {k: (float(v) if math.isfinite(v) else float('nan')) for k, v in
                result.items()}
