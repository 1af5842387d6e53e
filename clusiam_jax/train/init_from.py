"""train.init_from: a fresh run takes every source array that fits by name and shape."""
import dataclasses
import logging
from typing import Optional, Sequence, Tuple

import jax
import numpy as np

from clusiam_jax import parallel
from clusiam_jax.checkpoint import leaf_name
from clusiam_jax.errors import ConfigError
from clusiam_jax.interop.read_weights import Source, listing, read_weights, variable_names
from clusiam_jax.state import TrainState, fresh_weights, state_from_weights

log = logging.getLogger('clusiam_jax')

# Arrays of the online network under this module path must all come from the source.
BACKBONE = ('encoder', 'backbone')


@dataclasses.dataclass(frozen=True)
class Report:
    """What init_from did, by our variable names (collection/module path/leaf)."""
    source: Source
    loaded: Tuple[str, ...]
    fresh: Tuple[str, ...]
    misshapen: Tuple[str, ...]
    unused: Tuple[str, ...]

    def lines(self):
        every = self.loaded + self.fresh
        yield (f'train.init_from: loaded {len(self.loaded)} of {len(every)} arrays (parameters and '
               f'BatchNorm statistics) from the {self.source.kind} {self.source.path}: '
               f'{compact(self.loaded, every)}')
        yield (f'train.init_from: freshly initialised {len(self.fresh)}: '
               f'{compact(self.fresh, every) or "none"}')
        if self.misshapen:
            yield (f'train.init_from: shapes differ, initialised instead: '
                   f'{listing(self.misshapen, 8)}')
        if self.unused:
            yield (f'train.init_from: not used from the source ({len(self.unused)}): '
                   f'{_grouped(self.unused)}')


def _module(name: str) -> Tuple[str, ...]:
    return tuple(name.split('/')[1:])


def compact(names: Sequence[str], every: Sequence[str]) -> str:
    """`names` among `every`; a module wholly in `names` named once ('encoder/backbone (120)')."""
    chosen = {_module(n) for n in names}
    universe = sorted({_module(n) for n in every})
    if not chosen:
        return ''

    def walk(prefix):
        under = [u for u in universe if u[:len(prefix)] == prefix]
        picked = [u for u in under if u in chosen]
        if not picked:
            return []
        if len(picked) == len(under):
            label = '/'.join(prefix) or 'everything'
            return [label if len(under) == 1 and prefix else f'{label} ({len(under)})']
        children = sorted({u[len(prefix)] for u in under if len(u) > len(prefix)})
        return [part for child in children for part in walk(prefix + (child,))]

    return ', '.join(walk(()))


def _grouped(names: Sequence[str], spell_out: int = 3) -> str:
    """Names by their top module ('target_encoder.* (122)'); small groups in full."""
    groups = {}
    for name in names:
        top = (_module(name)[0] if name.startswith(('params/', 'batch_stats/'))
               else name.split('.')[0])
        groups.setdefault(top, []).append(name)
    parts = []
    for top, members in sorted(groups.items()):
        parts += (sorted(members) if len(members) <= spell_out else
                  [f'{top}{"/" if "/" in members[0] else "."}* ({len(members)})'])
    return listing(parts)


def apply_source(trainer, state: TrainState, source: Source) -> Tuple[TrainState, Report]:
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    online = variable_names(variables)
    loaded, fresh, misshapen = [], [], list(source.notes)
    for name, leaf in online.items():
        value = source.arrays.get(name)
        fits = value is not None and tuple(value.shape) == tuple(leaf.shape)
        if value is not None and not fits:
            misshapen.append(f'{name}: source {tuple(value.shape)} vs model {tuple(leaf.shape)}')
        (loaded if fits else fresh).append(name)
    missing = [n for n in fresh if _module(n)[:2] == BACKBONE]
    extra = [n for n in source.arrays if n not in online and _module(n)[:2] == BACKBONE]
    if missing or extra:
        parts = [f'{len(missing)} of its arrays not in the source ({listing(missing, 5)})',
                 f'{len(extra)} arrays of the source not in it ({listing(extra, 5)})',
                 f'shapes differ: {listing(misshapen, 5)}']
        parts = [part for part, said in zip(parts, (missing, extra, misshapen)) if said]
        raise ConfigError(f"train.init_from={source.path} does not fit this run's "
                          f'{"/".join(BACKBONE)} (the whole backbone must load): '
                          f'{"; ".join(parts)}')
    unused = sorted(set(source.arrays) - set(online)) + list(source.unused)
    report = Report(source, tuple(loaded), tuple(fresh), tuple(misshapen), tuple(unused))

    def take(path, leaf):   # placed as the fresh array, on every process (each read it)
        if leaf_name(path) not in loaded:
            return leaf
        value = np.asarray(source.arrays[leaf_name(path)], dtype=leaf.dtype)
        return jax.make_array_from_callback(value.shape, leaf.sharding, lambda i: value[i])

    def fresh_start(params, batch_stats):
        weights = fresh_weights(params, batch_stats, trainer.has_target)
        return state_from_weights(weights, trainer.tx, trainer.config.train.seed)

    placed = jax.tree_util.tree_map_with_path(take, variables)
    return jax.jit(fresh_start, out_shardings=parallel.replicated(trainer.mesh))(**placed), report


def initial_state(trainer) -> Tuple[TrainState, Optional[Report]]:
    """(the state a fresh run starts from, with train.init_from applied; its report or None)."""
    path = trainer.config.train.init_from
    if not path:
        return trainer.init_state(), None
    source = read_weights(path, trainer.config)   # first: a bad file fails fast
    state, report = apply_source(trainer, trainer.init_state(), source)
    if jax.process_index() == 0:
        for line in report.lines():
            log.info('%s', line)
        log.info('train.init_from: step 0 with a fresh optimizer state, rng and schedules%s',
                 '; the EMA target starts as a copy of the initialised online encoder'
                 if trainer.has_target else '')
    return state, report
