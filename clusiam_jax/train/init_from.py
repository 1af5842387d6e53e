"""train.init_from: a fresh run whose weights start from existing ones.

A new run (no checkpoint in its work directory) creates its state as usual, then takes
every array of the online network that the source (interop/read_weights.py: PyTorch,
safetensors or a run of ours) has under the same name and shape: the backbone must be
complete; the projector, predictor and cluster head are taken where they fit and stay
freshly initialised where not. Step, optimizer state, rng and schedules are those of a
fresh start (unlike train.resume_from, which continues a run), and a BYOL-type target
starts as a copy of the initialised online encoder. The log says which arrays were
loaded, which were initialised and what of the source was not used.
"""
import dataclasses
import logging
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from clusiam_jax import parallel
from clusiam_jax.checkpoint import leaf_name
from clusiam_jax.errors import ConfigError
from clusiam_jax.interop.read_weights import Source, listing, read_weights, variable_names
from clusiam_jax.state import TrainState, Weights, state_from_weights

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
        total = len(every)
        yield (f'train.init_from: loaded {len(self.loaded)} of {total} arrays (parameters and '
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
    """'params/encoder/backbone/conv1/kernel' -> ('encoder', 'backbone', 'conv1', 'kernel'):
    parameters and statistics of one module side by side (their leaf names differ)."""
    return tuple(name.split('/')[1:])


def _in_backbone(name: str) -> bool:
    return _module(name)[:len(BACKBONE)] == BACKBONE


def compact(names: Sequence[str], every: Sequence[str]) -> str:
    """An exact, short listing of `names` among `every`: a module all of whose arrays are
    in `names` is named once, with their count ('encoder/backbone (120)')."""
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
        if len(members) <= spell_out:
            parts.extend(sorted(members))
        else:
            parts.append(f'{top}{"/" if "/" in members[0] else "."}* ({len(members)})')
    return listing(parts)


# ------------------------------------------------------------------ applying a source

def _match(online: Dict[str, object], source: Source) -> Report:
    loaded, fresh, misshapen = [], [], list(source.notes)
    for name, leaf in online.items():
        value = source.arrays.get(name)
        if value is None:
            fresh.append(name)
        elif tuple(value.shape) != tuple(leaf.shape):
            misshapen.append(f'{name}: source {tuple(value.shape)} vs model '
                             f'{tuple(leaf.shape)}')
            fresh.append(name)
        else:
            loaded.append(name)
    unused = sorted(set(source.arrays) - set(online)) + list(source.unused)
    report = Report(source=source, loaded=tuple(loaded), fresh=tuple(fresh),
                    misshapen=tuple(misshapen), unused=tuple(unused))
    backbone = '/'.join(BACKBONE)
    missing = [n for n in fresh if _in_backbone(n)]
    extra = [n for n in source.arrays if n not in online and _in_backbone(n)]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f'{len(missing)} of its arrays not in the source '
                         f'({listing(missing, 5)})')
        if extra:
            parts.append(f'{len(extra)} arrays of the source not in it ({listing(extra, 5)})')
        if misshapen:
            parts.append(f'shapes differ: {listing(misshapen, 5)}')
        raise ConfigError(f"train.init_from={source.path} does not fit this run's {backbone} "
                          f'(the whole backbone must load): {"; ".join(parts)}')
    return report


def _placed(value: np.ndarray, like) -> jax.Array:
    """`value` with the dtype and sharding of the fresh array `like` (on every process:
    each one read the same source)."""
    value = np.asarray(value, dtype=like.dtype)
    return jax.make_array_from_callback(value.shape, like.sharding, lambda index: value[index])


def apply_source(trainer, state: TrainState, source: Source) -> Tuple[TrainState, Report]:
    """The fresh `state` with the source's arrays where they fit (see the module
    docstring); ConfigError when the backbone does not load completely."""
    online = {'params': state.params, 'batch_stats': state.batch_stats}
    report = _match(variable_names(online), source)
    loaded = set(report.loaded)

    def take(path, leaf):
        name = leaf_name(path)
        return _placed(source.arrays[name], leaf) if name in loaded else leaf

    online = jax.tree_util.tree_map_with_path(take, online)
    has_target = trainer.has_target
    seed = trainer.config.train.seed

    def fresh_start(params, batch_stats):
        # What state.init_weights does after drawing: the target copies the online encoder.
        target_params = jax.tree.map(jnp.copy, params['encoder']) if has_target else {}
        target_stats = jax.tree.map(jnp.copy, batch_stats['encoder']) if has_target else {}
        weights = Weights(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=batch_stats, target_params=target_params,
                          target_batch_stats=target_stats)
        return state_from_weights(weights, trainer.tx, seed)

    replicated = parallel.replicated(trainer.mesh)
    state = jax.jit(fresh_start, out_shardings=replicated)(online['params'],
                                                           online['batch_stats'])
    return state, report


def initial_state(trainer) -> Tuple[TrainState, Optional[Report]]:
    """(the state a fresh run starts from, the init_from report or None): the trainer's
    fresh state, with train.init_from's weights applied when it is set."""
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
