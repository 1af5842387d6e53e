"""The order of the training stream: which record, and which random stream, each element of
this process gets in each epoch (uniform shuffle, or data.sampling slide_balanced). A pure
function of (seed, epoch, place), so the stream resumes exactly for any worker or process
count (pipeline.py turns it into grain's elements)."""
import dataclasses
from typing import Optional, Tuple

import numpy as np

from clusiam_jax.errors import DataError

# The shuffle's stream tag, mixed into its seed: pipeline.py's other tags (augmentation,
# substitutes, the resolution draw) are other numbers, so no two streams share draws.
_SHUFFLE = 0x5


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
    slide_index: Optional[np.ndarray] = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
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

    def locate(self, k: int) -> Tuple[int, int]:
        """(epoch, position in the epoch's global order) of local element k."""
        epoch, rest = divmod(k, self.steps_per_epoch * self.local_batch)
        step, slot = divmod(rest, self.local_batch)
        return epoch, step * self.global_batch + self.process_index * self.local_batch + slot

    def permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, _SHUFFLE])
        if self.sampling == 'slide_balanced':
            return balanced_order(self.slide_index, rng)
        return rng.permutation(self.num_records)


def slide_members(slide_index: np.ndarray):
    """(patches sorted by slide, each slide's start in them; one more: the end)."""
    counts = np.bincount(slide_index)
    return np.argsort(slide_index, kind='stable'), np.concatenate([[0], np.cumsum(counts)])


def balanced_order(slide_index: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """N indices drawing each slide equally often, its patches repeated only once all were seen."""
    n = len(slide_index)
    members, starts = slide_members(slide_index)
    present = np.flatnonzero(np.diff(starts))
    base, extra = divmod(n, len(present))
    quota = np.full(len(present), base)
    quota[rng.permutation(len(present))[:extra]] += 1
    picks = []
    for slide, q in zip(present, quota):
        own = members[starts[slide]:starts[slide + 1]]
        rounds = -(-q // len(own))
        picks.append(np.concatenate([own[rng.permutation(len(own))] for _ in range(rounds)])[:q])
    return np.concatenate(picks)[rng.permutation(n)]
