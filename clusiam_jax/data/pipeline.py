"""The training stream (grain): every element is a pure function of (seed, epoch, place), so
it resumes exactly for any worker or process count; an unreadable file gets a seeded substitute."""
import dataclasses
import logging
import os
from typing import Optional, Tuple

import numpy as np

from clusiam_jax import interrupts, storage
from clusiam_jax.data import augment, image_io, skips, slide_cache, slide_sampler, stain, stain_norm
from clusiam_jax.data import sources as sources_lib
from clusiam_jax.data import stats as stats_lib
from clusiam_jax.data.epoch_plan import EpochPlan, slide_members
from clusiam_jax.data.records import PatchSource
from clusiam_jax.errors import DataError
from clusiam_jax.slides import tissue

logger = logging.getLogger(__name__)

# Stream tags mixed into the seeds: shuffle (epoch_plan._SHUFFLE, 0x5), augmentation,
# substitutes and the resolution draw (data.mpps) never share draws.
_AUGMENT, _SUBSTITUTE, _SCALE = 0xA, 0xB, 0x5CA1E
_MAX_SUBSTITUTES = 100
_SAME_SLIDE_ATTEMPTS = 3
# Elements a worker asks its source to read ahead, across its batch boundaries (slides in a
# bucket: slide_source.prefetch). Why 32: one worker keeps about 15 patches waiting on the
# bucket (slide_source's docstring), so 32 covers the wait at a batch boundary (measured:
# bench/objstore_read.py); 32 patches x ~4 tiles is half of slide_source.REMOTE_TILES, so tiles
# read ahead are not evicted before they are used (slide_source bounds the queue: 64).
_PREFETCH_AHEAD = 32
STATE_KEY = 'batches_drawn'   # a checkpoint's data item: {STATE_KEY: batches drawn}
# The bucket reads an element cost, carried with it (storage.Telemetry.take_counts).
#
# The reads happen in grain's worker processes, whose storage.telemetry the main process
# never sees. Two ways back were weighed: a shared-memory array of counters that each
# worker's Telemetry adds into (created by the parent before the workers start: it must
# outlive worker restarts, be named to spawned workers, and count reads of batches read
# ahead but never consumed), or the counters carried with each element through grain and
# summed on the host as batches are drawn. The second is used: no shared state or locks,
# the same code for 0 or N workers and any process count, and a window counts the reads a
# worker made up to the batches drawn in it (its read-ahead threads' too: each element takes
# what its process counted since the last one); ~100 int64 per element next to ~300 KB of pixels.
IO_KEY = 'input_io'


@dataclasses.dataclass(frozen=True)
class Scales:
    """data.mpps: the µm/px a sample is read at, their probabilities, and whether the two
    views draw theirs independently (data.cross_scale)."""
    mpps: Tuple[float, ...]
    weights: Tuple[float, ...]
    cross: bool = False

    @classmethod
    def from_config(cls, data) -> Optional['Scales']:
        mpps = tuple(float(m) for m in data.get('mpps', ()))
        if not mpps:
            return None
        weights = np.asarray(data.get('mpp_weights', ()) or [1.0] * len(mpps), np.float64)
        return cls(mpps, tuple((weights / weights.sum()).tolist()),
                   bool(data.get('cross_scale', False)))

    def draw(self, seed: int, epoch: int, pos: int) -> Tuple[float, float]:
        """(view 1's µm/px, view 2's) of element `pos` of `epoch`: its own stream."""
        rng = np.random.default_rng([seed, epoch, pos, _SCALE])
        picks = rng.choice(len(self.mpps), size=2 if self.cross else 1, p=self.weights)
        return self.mpps[picks[0]], self.mpps[picks[-1]]


def two_views_of(imgs, rng: np.random.Generator, cfg: augment.AugmentConfig):
    """augment.two_views with each view from its own image (a cross-scale pair): the same
    draws in the same order, view 1's parameters then view 2's."""
    params = [augment.sample_view_params(rng, *img.shape[:2], cfg) for img in imgs]
    return tuple(augment.apply_view(img, p, cfg.image_size, cfg.on_device)
                 for img, p in zip(imgs, params))


class PairMaker:
    """Local element index -> dict(view1, view2) (runs in grain workers). With `scales` or a
    slide_sampler source (data.mpps, tissue_random), each element reads its record at its
    drawn µm/px and epoch; `transform` (uint8 image -> uint8 image, picklable: stain
    normalisation) is applied to every loaded patch before the augmentation."""

    def __init__(self, source: PatchSource, plan: EpochPlan, aug: augment.AugmentConfig,
                 skip_log: skips.SkipLog, min_tissue: float = 0.0, count_io: bool = False,
                 stride: int = 1, scales: Optional[Scales] = None, transform=None):
        self.source, self.plan, self.aug = source, plan, aug
        self.skip_log, self.min_tissue, self.count_io = skip_log, float(min_tissue), count_io
        # Batches between two batches of one worker: grain's mp_prefetch gives worker w the
        # batches w, w + num_workers, ... of the stream (one worker, or none: every batch).
        self.stride = max(1, int(stride))
        self.scales, self.transform = scales, transform
        # Records read per (epoch, µm/px): a slide sampler's (data.mpps, tissue_random).
        self.sampled = hasattr(source, 'load_sample')
        self._fresh = bool(getattr(source, 'fresh', False))
        self._perms, self._bad, self._members = {}, set(), None

    def __reduce__(self):   # the state above starts afresh in each process
        return PairMaker, (self.source, self.plan, self.aug, self.skip_log, self.min_tissue,
                           self.count_io, self.stride, self.scales, self.transform)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:  # elements arrive in order: this epoch and the next
            if len(self._perms) >= 2:   # (read ahead) are all that is ever asked
                del self._perms[min(self._perms)]
            self._perms[epoch] = self.plan.permutation(epoch)
        return self._perms[epoch]

    def _load(self, index: int, epoch: int = 0, mpp: Optional[float] = None
              ) -> Optional[np.ndarray]:
        # What failed once is not read again: a record, or a sample (a fresh position is
        # another square in each epoch; another µm/px reads another level).
        key = index if not self.sampled else (index, epoch if self._fresh else 0, mpp)
        if key in self._bad:
            return None
        try:
            img = (self.source.load_sample(index, epoch, mpp) if self.sampled
                   else self.source.load(index))
            fraction = tissue.patch_tissue_fraction(img) if self.min_tissue > 0 else 1.0
            if fraction < self.min_tissue:
                raise image_io.BadImageError(
                    f'{self.source.path(index)}: background: tissue {fraction:.0%} < '
                    f'data.min_tissue {self.min_tissue:g}')
            return img
        except image_io.BadImageError as e:
            self._bad.add(key)
            self.skip_log.record(e.subject or self.source.path(index), str(e).split(': ', 1)[-1])
            return None
        except storage.Unreadable as e:   # an object gone or failing after the retries
            self._bad.add(key)
            self.skip_log.record(self.source.path(index), str(e))
            return None

    def _images(self, epoch: int, index: int, mpps) -> Optional[tuple]:
        """The record's image for each view (one read when both views share a µm/px)."""
        first = self._load(index, epoch, mpps[0])
        if first is None or mpps[1] == mpps[0]:
            return None if first is None else (first,)
        second = self._load(index, epoch, mpps[1])
        return None if second is None else (first, second)

    def _substitute(self, index: int, attempt: int, rng) -> int:
        """A stand-in record: from the same slide (balanced sampling), then from anywhere."""
        if self.plan.sampling == 'slide_balanced' and attempt <= _SAME_SLIDE_ATTEMPTS:
            if self._members is None:
                self._members = slide_members(self.plan.slide_index)
            order, starts = self._members
            slide = self.plan.slide_index[index]
            lo, hi = starts[slide], starts[slide + 1]
            return int(order[lo + rng.integers(hi - lo)])
        return int(rng.integers(self.plan.num_records))

    def record_index(self, k: int) -> Tuple[int, int, int]:
        epoch, pos = self.plan.locate(k)
        return epoch, pos, int(self._order(epoch)[pos])

    def next_elements(self, k: int, count: int) -> list:
        """The (up to) `count` local elements this worker loads after element k: the rest of
        k's batch, then its next batches (`stride` apart), up to the end of the run."""
        b = self.plan.local_batch
        end = self.plan.num_epochs * self.plan.steps_per_epoch * b
        out, j = [], k + 1
        while len(out) < count and j < end:
            if j % b == 0:   # past k's batch: this worker's next one
                j += (self.stride - 1) * b
                if j >= end:
                    break
            out.append(j)
            j += 1
        return out

    def _mpps(self, epoch: int, pos: int) -> Tuple[Optional[float], Optional[float]]:
        if self.scales is None:
            return None, None
        return self.scales.draw(self.plan.seed, epoch, pos)

    def _prefetch_after(self, k: int):
        """Asks a source that can (slide_source.prefetch: slides in a bucket) to start on the
        next elements this worker loads, across batch boundaries; pixels do not change. A
        slide sampler is told what each will read (its µm/px, its epoch's position)."""
        if self.sampled:
            if not self.source.base.remote:   # local slides: nothing to read ahead
                return
            samples = []
            for j in self.next_elements(k, _PREFETCH_AHEAD):
                epoch, pos, index = self.record_index(j)
                samples += [(index, epoch, m) for m in dict.fromkeys(self._mpps(epoch, pos))]
            self.source.prefetch_samples(samples)
            return
        prefetch = getattr(self.source, 'prefetch', None)
        if prefetch is None:
            return
        prefetch([self.record_index(j)[2] for j in self.next_elements(k, _PREFETCH_AHEAD)])

    def __call__(self, k: int):
        epoch, pos, index = self.record_index(int(k))
        self._prefetch_after(int(k))
        mpps = self._mpps(epoch, pos)   # the substitutes keep the element's µm/px
        imgs = self._images(epoch, index, mpps)
        attempt = 0
        while imgs is None:
            attempt += 1
            if attempt > _MAX_SUBSTITUTES:
                raise DataError(
                    f'{_MAX_SUBSTITUTES} substitutes in a row were unreadable: is the patch '
                    f'source mostly broken? See {self.skip_log.list_path}')
            sub_rng = np.random.default_rng([self.plan.seed, epoch, pos, _SUBSTITUTE, attempt])
            imgs = self._images(epoch, self._substitute(index, attempt, sub_rng), mpps)
        if self.transform is not None:
            imgs = tuple(self.transform(img) for img in imgs)
        rng = np.random.default_rng([self.plan.seed, epoch, pos, _AUGMENT])
        if len(imgs) == 1:
            view1, view2 = augment.two_views(imgs[0], rng, self.aug)
        else:
            view1, view2 = two_views_of(imgs, rng, self.aug)
        if not self.count_io:
            return {'view1': view1, 'view2': view2}
        return {'view1': view1, 'view2': view2,
                IO_KEY: np.asarray(storage.telemetry.take_counts(), np.int64)}


class BatchIterator:
    """The loader's batches; the number drawn is the whole state (grain's needs the workers)."""

    def __init__(self, loader: 'TrainLoader', start: int = 0):
        self._loader, self._next, self._it = loader, int(start), None
        self._io = None   # the summed bucket counters of the batches drawn since the last take

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:   # started lazily: set_state right after creation is free
            if self._loader.count_io:   # this process's reads so far (stats, a restore)
                storage.telemetry.take_counts()   # are not the batches' (0 workers)
            self._it = iter(self._loader.dataset(start_batch=self._next))
        batch = next(self._it)
        self._next += 1
        io = batch.pop(IO_KEY, None)
        if io is not None:
            io = io.sum(axis=0)
            self._io = io if self._io is None else self._io + io
        return batch

    def take_input_counts(self) -> Optional[np.ndarray]:
        """storage.Telemetry counts of the batches drawn since the last call; None when the
        source reads no bucket."""
        if not self._loader.count_io:
            return None
        io, self._io = self._io, None
        return np.zeros(storage.Telemetry.SIZE, np.int64) if io is None else io

    def get_state(self) -> dict:
        return {STATE_KEY: self._next}

    def set_state(self, state: dict):
        drawn = batches_drawn(state)
        total = self._loader.num_epochs * self._loader.steps_per_epoch
        if not 0 <= drawn <= total:
            raise DataError(f"the saved data position (batch {drawn}) is outside this run's "
                            f'{total} batches: the checkpoint belongs to another data set or '
                            f'batch size')
        self.close()
        self._next = drawn

    def close(self):
        if self._it is not None:
            self._it.close()
            self._it = None


def batches_drawn(state: dict) -> int:
    """The batches drawn before `state`: ours, or grain's (under mp_prefetch: the sum)."""
    try:
        if STATE_KEY in state:
            return int(state[STATE_KEY])
        if 'next_index' in state:
            return int(state['next_index'])
        return int(sum(s['next_index'] for s in state['iterators_in_use_states'] if s))
    except (KeyError, TypeError, ValueError):
        raise DataError(f"the checkpoint's data position is not one this pipeline wrote: "
                        f'{str(state)[:200]}') from None


class TrainLoader:
    def __init__(self, source: PatchSource, plan: EpochPlan, aug: augment.AugmentConfig,
                 mean, std, num_workers: int = 0, skip_list: Optional[str] = None,
                 normalization_origin: str = 'given', min_tissue: float = 0.0,
                 held_out: Optional[PatchSource] = None, count_io: bool = False,
                 scales: Optional[Scales] = None, transform=None):
        self.source, self.plan, self.aug = source, plan, aug
        # data.mpps (with a slide_sampler source); a uint8 -> uint8 callable applied to every
        # patch before the augmentation (stain normalisation), picklable for the workers.
        self.scales, self.transform = scales, transform
        self.count_io = count_io   # elements carry their bucket reads (IO_KEY)
        self.held_out = held_out   # the monitor set's slides, held out of `source`
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))
        self.num_workers, self.min_tissue = int(num_workers), float(min_tissue)
        self.normalization_origin, self.skip_log = normalization_origin, skips.SkipLog(skip_list)

    num_records = property(lambda self: self.plan.num_records)
    steps_per_epoch = property(lambda self: self.plan.steps_per_epoch)
    num_epochs = property(lambda self: self.plan.num_epochs)

    def pair_maker(self) -> PairMaker:
        return PairMaker(self.source, self.plan, self.aug, self.skip_log, self.min_tissue,
                         self.count_io, stride=self.num_workers, scales=self.scales,
                         transform=self.transform)

    def dataset(self, start_batch: int = 0):
        """The grain IterDataset of batches over all epochs, from batch `start_batch` on."""
        import grain
        b = self.plan.local_batch
        end = self.num_epochs * self.steps_per_epoch * b
        ds = (grain.MapDataset.range(int(start_batch) * b, end).map(self.pair_maker())
              .batch(b, drop_remainder=True))
        # One reading thread (the parallelism is in the workers); a short buffer of batches.
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
        if self.num_workers > 0:
            from absl import flags  # grain reads absl flags a non-absl caller never parsed
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            options = grain.MultiprocessingOptions(self.num_workers, per_worker_buffer_size=1)
            it_ds = it_ds.mp_prefetch(options, worker_init_fn=interrupts.worker_initializer())
        return it_ds

    def iterator(self) -> BatchIterator:
        return BatchIterator(self)

    def close(self):
        """Stops this process's read-ahead threads of the source, without waiting."""
        close = getattr(self.source, 'close', None)
        if close is not None:
            close()

    def skipped_files(self):
        """Paths skipped so far (by any process writing to the same list)."""
        return self.skip_log.paths()


def create_train_loader(config, workdir: Optional[str] = None, process_index: int = 0,
                        process_count: int = 1, recorded=None, transform=None) -> TrainLoader:
    """The training loader of this process. The normalization is data.mean/std when set,
    else what a resumed run `recorded` (mean, std, origin), else computed (cached).
    `transform`: TrainLoader's; None: data.stain_norm's (stain_norm.prepare)."""
    data = config.data
    source = sources_lib.open_source(data.path, data.slide_dir, int(data.open_slides),
                                     data.get('cache_dir', ''),
                                     data.get('cache_gb', slide_cache.DEFAULT_CACHE_GB))
    held_out = None
    mon = config.get('monitor')
    if mon is not None and mon.every_epochs > 0 and not mon.data_path and mon.holdout > 0:
        keep, held = sources_lib.holdout_slides(source, float(mon.holdout), int(config.train.seed))
        logger.info('monitor: %d patches of the training source held out (monitor.holdout %g '
                    'of its slides); training on the other %d', len(held), mon.holdout, len(keep))
        source, held_out = source.subset(keep), source.subset(held)
    grid, scales = source, Scales.from_config(data)   # the grid: what the statistics read
    if 'augment' in config and float(config.augment.hed) > 0:
        stain.require_colour_of(grid, data.path)
        logger.info('augment.hed %g: HED stain jitter of every view', config.augment.hed)
    if transform is None:   # every process fits the same target; the loop records it
        transform = stain_norm.prepare(config, workdir, grid, record=False)
    fresh = data.sampling == 'tissue_random'
    if scales is not None or fresh:
        source = slide_sampler.training_sampler(
            source, data.path, scales.mpps if scales else (), fresh,
            int(data.get('patches_per_slide', 0)), int(config.train.seed))
    plan = EpochPlan(num_records=len(source), global_batch=int(config.train.batch_size),
                     process_index=int(process_index), process_count=int(process_count),
                     num_epochs=int(config.train.num_epochs), seed=int(config.train.seed),
                     sampling=data.sampling, slide_index=(
                         source.slide_index if data.sampling == 'slide_balanced' else None))
    skip_list = os.path.join(workdir, skips.SKIPPED_FILES) if workdir else None
    mean, std, origin = data.mean, data.std, 'config data.mean/std'
    if mean is None and recorded is not None:
        mean, std, origin = recorded.mean, recorded.std, recorded.origin
        logger.info('normalization recorded by the run: mean %s std %s (%s)', mean, std, origin)
    elif mean is None and transform is not None:
        mean, std, origin = stain_norm.normalized_stats(
            grid, transform, data.path, int(data.stats_sample), int(data.num_workers),
            skips.SkipLog(skip_list))
    elif mean is None:
        sample = (stats_lib.sample_indices(len(grid), int(data.stats_sample))
                  if grid.from_slides else None)   # slides: millions of patches
        mean, std, origin = stats_lib.cached_stats(
            data.path, grid, workdir=workdir, num_workers=int(data.num_workers),
            skip_log=skips.SkipLog(skip_list), indices=sample)
    return TrainLoader(source, plan, augment.AugmentConfig.from_config(config), mean, std,
                       num_workers=int(data.num_workers), skip_list=skip_list,
                       normalization_origin=origin, min_tissue=float(data.min_tissue),
                       held_out=held_out, count_io=reads_bucket(source), scales=scales,
                       transform=transform)


def reads_bucket(source: PatchSource) -> bool:
    """Whether the elements are read from a bucket through storage, which counts the reads:
    slides in a bucket, not a built dataset (array_record reads gs:// by itself, unseen by
    storage, and an s3:// one is staged first) nor local slides of a tiling in a bucket."""
    return (len(source) > 0 and source.dataset_dir is None
            and storage.is_url(source.path(0)))
