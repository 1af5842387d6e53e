"""The training input pipeline: shuffled records -> two augmented views -> batches.

Everything is a pure function of an element's position, so the stream does not
depend on the number of worker processes and resumes exactly:

* element k of this process (k = 0 .. num_epochs * steps_per_epoch * B_local - 1)
  belongs to epoch e = k // (steps_per_epoch * B_local), step s and slot j;
* its position in the epoch's global order is
  pos = s * B_global + process_index * B_local + j, i.e. each process takes a
  contiguous share of every global batch, so the global batch assembled with
  ``jax.make_array_from_process_local_data`` is the same for any process count;
* the epoch's order is a permutation of all N records drawn from (seed, e),
  truncated to steps_per_epoch * B_global (the incomplete last batch is dropped);
* the augmentation generator is seeded with (seed, e, pos). With
  ``data.augment_on_device`` the same draws are made but only the crop (and the
  optional vflip / rot90) is applied here; the rest runs in the train step
  (``device_augment``).

Bad files (unreadable, truncated, empty, not an image): the element takes a
substitute record drawn from (seed, e, pos, attempt) instead, so the batch stays
full and deterministic; the bad path is logged once and appended to
``<workdir>/skipped_files.txt``. Files are only checked when first read, so a
run starts without scanning millions of files.

grain runs it as ``MapDataset.range -> map(make pair) -> batch`` and, with
``num_workers`` > 0, ``mp_prefetch`` over spawned worker processes, each making
whole batches. The per-record code imports no JAX.
"""
import dataclasses
import logging
import os
from typing import Optional, Tuple

import numpy as np

from clusiam_jax import interrupts
from clusiam_jax.data import augment, image_io, skips
from clusiam_jax.data import records as records_lib
from clusiam_jax.data import sources as sources_lib
from clusiam_jax.data import stats as stats_lib
from clusiam_jax.errors import DataError
from clusiam_jax.slides import tissue

logger = logging.getLogger(__name__)

# Stream tags mixed into the seeds so the shuffle, the augmentation and the
# substitutes for bad files never share random numbers.
_SHUFFLE, _AUGMENT, _SUBSTITUTE = 0x5, 0xA, 0xB
_MAX_SUBSTITUTES = 100
# The data item of a checkpoint: {STATE_KEY: batches drawn} (BatchIterator).
STATE_KEY = 'batches_drawn'
_SAME_SLIDE_ATTEMPTS = 3


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """Which record and which random stream each element of this process gets."""
    num_records: int
    global_batch: int
    process_index: int
    process_count: int
    num_epochs: int
    seed: int
    sampling: str = 'uniform'             # uniform | slide_balanced (config data.sampling)
    slide_index: Optional[np.ndarray] = dataclasses.field(default=None, compare=False,
                                                          repr=False)  # [N] slide of each

    def __post_init__(self):
        # train.batch_size divides into the processes: config.validate checked it against
        # the device count, a multiple of the process count.
        if self.steps_per_epoch == 0:
            raise DataError(
                f'train.batch_size {self.global_batch} is larger than the {self.num_records} '
                f'records of the training list: not one full batch per epoch')

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.process_count

    @property
    def steps_per_epoch(self) -> int:
        return self.num_records // self.global_batch

    @property
    def local_elements(self) -> int:
        return self.num_epochs * self.steps_per_epoch * self.local_batch

    def locate(self, k: int) -> Tuple[int, int]:
        """(epoch, position in the epoch's global order) of local element k."""
        epoch, rest = divmod(k, self.steps_per_epoch * self.local_batch)
        step, slot = divmod(rest, self.local_batch)
        return epoch, step * self.global_batch + self.process_index * self.local_batch + slot

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's order: N record indices drawn from (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch, _SHUFFLE])
        if self.sampling == 'slide_balanced':
            return balanced_order(self.slide_index, rng)
        return rng.permutation(self.num_records)


def balanced_order(slide_index: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """N record indices where every slide is drawn equally often (N // S each, the
    remainder to slides drawn at random): within a slide its patches are taken in a
    random order without repeats until all were seen, then again. The whole list is
    shuffled at the end, so batches mix slides."""
    n = len(slide_index)
    members = np.argsort(slide_index, kind='stable')
    counts = np.bincount(slide_index)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    present = np.flatnonzero(counts)
    base, extra = divmod(n, len(present))
    quota = np.full(len(present), base)
    quota[rng.permutation(len(present))[:extra]] += 1
    picks = []
    for slide, q in zip(present, quota):
        own = members[starts[slide]:starts[slide] + counts[slide]]
        rounds = -(-q // len(own))
        picks.append(np.concatenate([own[rng.permutation(len(own))]
                                     for _ in range(rounds)])[:q])
    order = np.concatenate(picks)
    return order[rng.permutation(n)]


class PairMaker:
    """Local element index -> dict(view1, view2) (runs in grain workers)."""

    def __init__(self, source, plan: EpochPlan, aug: augment.AugmentConfig,
                 skip_log: skips.SkipLog, min_tissue: float = 0.0):
        self.source = source
        self.plan = plan
        self.aug = aug
        self.skip_log = skip_log
        self.min_tissue = float(min_tissue)
        self._perm_epoch, self._perm = None, None
        self._bad = set()
        self._members = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_perm_epoch=None, _perm=None, _bad=set(), _members=None)
        return state

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:  # one epoch at a time: elements arrive in order
            self._perm, self._perm_epoch = self.plan.permutation(epoch), epoch
        return self._perm

    def _load(self, index: int) -> Optional[np.ndarray]:
        if index in self._bad:
            return None
        try:
            img = self.source.load(index)
        except image_io.BadImageError as e:
            self._bad.add(index)
            self.skip_log.record(getattr(e, 'subject', None) or self.source.path(index),
                                 str(e).split(': ', 1)[-1])
            return None
        if self.min_tissue > 0:
            fraction = tissue.patch_tissue_fraction(img)
            if fraction < self.min_tissue:
                self._bad.add(index)
                self.skip_log.record(self.source.path(index),
                                     f'background: tissue {fraction:.0%} < data.min_tissue '
                                     f'{self.min_tissue:g}')
                return None
        return img

    def _substitute(self, index: int, attempt: int, rng) -> int:
        """A record to take the place of an unreadable one: with slide-balanced sampling
        first from the same slide (keeping the balance), then from anywhere (a slide that
        vanished has nothing to offer)."""
        if self.plan.sampling == 'slide_balanced' and attempt <= _SAME_SLIDE_ATTEMPTS:
            if self._members is None:
                order = np.argsort(self.plan.slide_index, kind='stable')
                counts = np.bincount(self.plan.slide_index)
                self._members = (order, np.concatenate([[0], np.cumsum(counts)]))
            order, starts = self._members
            slide = self.plan.slide_index[index]
            lo, hi = starts[slide], starts[slide + 1]
            return int(order[lo + rng.integers(hi - lo)])
        return int(rng.integers(self.plan.num_records))

    def record_index(self, k: int) -> Tuple[int, int, int]:
        epoch, pos = self.plan.locate(k)
        return epoch, pos, int(self._order(epoch)[pos])

    def __call__(self, k: int):
        epoch, pos, index = self.record_index(int(k))
        img = self._load(index)
        attempt = 0
        while img is None:
            attempt += 1
            if attempt > _MAX_SUBSTITUTES:
                raise DataError(
                    f'{_MAX_SUBSTITUTES} substitutes in a row were unreadable: is the patch '
                    f'source mostly broken? See {self.skip_log.list_path}')
            sub_rng = np.random.default_rng([self.plan.seed, epoch, pos, _SUBSTITUTE, attempt])
            img = self._load(self._substitute(index, attempt, sub_rng))
        rng = np.random.default_rng([self.plan.seed, epoch, pos, _AUGMENT])
        if self.aug.on_device:  # only the crops; colour, blur, hflip in the train step
            view1, view2 = augment.two_crops(img, rng, self.aug)
        else:
            view1, view2 = augment.two_views(img, rng, self.aug)
        return {'view1': view1, 'view2': view2}


class BatchIterator:
    """The loader's batches from a position on, the position being the only state.

    grain's own iterator state describes its workers (one sub-state per worker under
    mp_prefetch, a bare index without), so a run checkpointed with one `data.num_workers`
    could not resume with another. Every batch is a function of its index alone (module
    docstring), so the number of batches drawn is a complete state for any worker count:
    `set_state` starts a fresh grain pipeline at that batch. States written by grain
    itself (checkpoints made before this iterator) are translated (`batches_drawn`).
    """

    def __init__(self, loader: 'TrainLoader', start: int = 0):
        self._loader, self._next, self._it = loader, int(start), None

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:   # started lazily: set_state right after creation is free
            self._it = iter(self._loader.dataset(start_batch=self._next))
        batch = next(self._it)
        self._next += 1
        return batch

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
            if hasattr(self._it, 'close'):
                self._it.close()
            self._it = None



def batches_drawn(state: dict) -> int:
    """The number of batches drawn before `state`: ours, or grain's (a serial iterator's
    `next_index`; under mp_prefetch, workers take batches in turn, so the batches drawn
    are the sum of the workers' own `next_index`)."""
    try:
        if STATE_KEY in state:
            return int(state[STATE_KEY])
        if 'next_index' in state:
            return int(state['next_index'])
        return int(sum(s['next_index'] for s in state['iterators_in_use_states'] if s))
    except (KeyError, TypeError, ValueError):
        raise DataError(f"the checkpoint's data position is not one this pipeline wrote: "
                        f'{str(state)[:200]}') from None


def _ensure_absl_flags_parsed():
    # grain's mp_prefetch reads its absl flags; a caller that is not an absl app
    # never parsed them. Marking them parsed keeps the defaults and leaves
    # sys.argv alone.
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class TrainLoader:
    """The training stream of one process (see module docstring)."""

    def __init__(self, source, plan: EpochPlan, aug: augment.AugmentConfig,
                 mean, std, num_workers: int = 0, skip_list: Optional[str] = None,
                 normalization_origin: str = 'given', min_tissue: float = 0.0):
        self.source = source
        self.plan = plan
        self.aug = aug
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.normalization_origin = normalization_origin
        self.num_workers = int(num_workers)
        self.skip_log = skips.SkipLog(skip_list)
        self.min_tissue = float(min_tissue)

    num_records = property(lambda self: self.plan.num_records)
    steps_per_epoch = property(lambda self: self.plan.steps_per_epoch)
    num_epochs = property(lambda self: self.plan.num_epochs)

    def pair_maker(self) -> PairMaker:
        return PairMaker(self.source, self.plan, self.aug, self.skip_log, self.min_tissue)

    def dataset(self, start_batch: int = 0):
        """The grain IterDataset of batches over all epochs, from batch `start_batch` on."""
        import grain  # pylint: disable=g-import-not-at-top
        start = int(start_batch) * self.plan.local_batch
        ds = (grain.MapDataset.range(start, self.plan.local_elements)
              .map(self.pair_maker())
              .batch(self.plan.local_batch, drop_remainder=True))
        # One reading thread: the parallelism is in the worker processes (or, with
        # num_workers=0, one background thread overlapping the train step). The
        # buffer holds whole batches, so keep it short.
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
        if self.num_workers > 0:
            _ensure_absl_flags_parsed()
            it_ds = it_ds.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self.num_workers,
                                             per_worker_buffer_size=1),
                worker_init_fn=interrupts.worker_initializer())
        return it_ds

    def iterator(self) -> 'BatchIterator':
        """An iterator over the batches of all epochs; get_state/set_state resume it, with
        any number of workers."""
        return BatchIterator(self)

    def skipped_files(self):
        """Paths skipped so far (by any process writing to the same list)."""
        return self.skip_log.paths()

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_files())


def create_train_loader(config, workdir: Optional[str] = None, process_index: int = 0,
                        process_count: int = 1, recorded=None) -> TrainLoader:
    """The training loader of this process, from ``config.data`` and ``config.train``
    (checked by ``config.validate``).

    The normalization is ``data.mean/std`` when set, else ``recorded`` (what a resumed
    run recorded when it started, with ``mean``, ``std`` and ``origin``), else computed
    over the training list (cached). Raises DataError (one line) for an empty or missing
    source, a manifest without a ``path`` column, or a batch larger than the list.
    """
    data = config.data
    data_path = data.path
    recs, source = sources_lib.open_source(data_path, data.slide_dir, int(data.open_slides))
    monitor = None
    mon = config.get('monitor')
    if mon is not None and mon.every_epochs > 0 and not mon.data_path and mon.holdout > 0:
        keep, held = sources_lib.holdout_slides(recs, float(mon.holdout), int(config.train.seed))
        monitor = (recs, source, held)   # the monitor set's records, before the subset
        logger.info('monitor: %d patches of the training source held out (monitor.holdout '
                    '%g of its slides); training on the other %d', len(held), mon.holdout,
                    len(keep))
        recs, source = records_lib.take(recs, keep), sources_lib.SubsetSource(source, keep)
    slide_index = None
    if data.sampling == 'slide_balanced':
        slide_index = getattr(source, 'slide_index', None)
        if slide_index is None:
            slide_index = _slide_index_of(recs)
    plan = EpochPlan(num_records=len(source), global_batch=int(config.train.batch_size),
                     process_index=int(process_index), process_count=int(process_count),
                     num_epochs=int(config.train.num_epochs), seed=int(config.train.seed),
                     sampling=data.sampling, slide_index=slide_index)
    skip_list = os.path.join(workdir, skips.SKIPPED_FILES) if workdir else None
    mean, std = config.data.mean, config.data.std
    origin = 'config data.mean/std'
    if mean is None and recorded is not None:
        mean, std, origin = recorded.mean, recorded.std, recorded.origin
        logger.info('normalization recorded by the run: mean %s std %s (%s)', mean, std,
                    origin)
    elif mean is None:
        sample = None
        if hasattr(source, 'slide_index'):  # slides: a deterministic sample of patches
            sample = stats_lib.sample_indices(len(source), int(data.stats_sample))
        mean, std, origin = stats_lib.cached_stats(
            data_path, source, workdir=workdir, num_workers=int(data.num_workers),
            skip_log=skips.SkipLog(skip_list), indices=sample)
    loader = TrainLoader(source, plan, augment.AugmentConfig.from_config(config), mean, std,
                         num_workers=int(data.num_workers), skip_list=skip_list,
                         normalization_origin=origin, min_tissue=float(data.min_tissue))
    loader.monitor_source = monitor   # (records, source, indices) held out, or None
    return loader


def _slide_index_of(recs) -> np.ndarray:
    """int32 [N]: each record's slide (its slide_id, else its folder), for balancing."""
    keys = [r.slide_id or os.path.dirname(r.path) for r in recs]
    _, index = np.unique(np.array(keys, dtype=object).astype(str), return_inverse=True)
    return index.astype(np.int32)
