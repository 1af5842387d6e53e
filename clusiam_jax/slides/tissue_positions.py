"""Where a patch lies on tissue (the tiling's `tile.min_tissue` rule, `cell_fractions`) and
fresh patch positions drawn uniformly among those that keep the rule (`data.sampling=
tissue_random`, docs/method.md). Pure NumPy: it runs in the loader's workers.

The rule. A square of side `size0` level-0 px at (x, y) covers the mask pixels
[round(x / ds), round((x + size0) / ds)) in x (and alike in y), clipped to the mask and at
least one pixel wide; its tissue fraction is the mean of the mask over them (an integral
image: exact). It is kept when that fraction is >= min_tissue and above 0.

The draw is exact, not approximate. Along one axis, the integer positions p in
[0, side0 - size0] fall into runs of consecutive p with the same pixel interval (both ends
are non-decreasing in p), at most a few runs per mask pixel. A square's fraction depends
only on its x-run and y-run, so the set of positions that keep the rule is a union of
rectangles (x-run x y-run) of known sizes. One random integer u, uniform below the number
of such positions, is mapped onto them in a fixed order (run row, run column, then the
offsets inside the two runs): each position that keeps the rule has the same
probability, every other has none, whatever the mask's resolution.
"""
import math
from typing import Optional, Tuple

import numpy as np

from clusiam_jax.errors import DataError

# Separates this stream from any other drawn from the same (seed, epoch, slide) numbers.
STREAM_TAG = 0x7155E0
# Cells of the run grid evaluated at once (bounds the memory of a large slide's mask).
_BLOCK = 1 << 21


def _integral(mask: np.ndarray) -> np.ndarray:
    """[H + 1, W + 1]: the number of tissue pixels above and left of each corner (int32 when
    it fits: a sampler kept per slide holds it)."""
    dtype = np.int32 if mask.size < 2 ** 31 else np.int64
    out = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype)
    np.cumsum(np.cumsum(np.asarray(mask, bool), axis=0, dtype=dtype), axis=1, out=out[1:, 1:])
    return out


def _span(starts: np.ndarray, size0: float, downsample: float, n: int):
    """(first, end) mask pixel of squares starting at level-0 `starts` along an axis of `n`
    mask pixels: the rule's rounding and clipping, end >= first + 1 inside the mask."""
    first = np.clip(np.round(starts / downsample).astype(np.int64), 0, n)
    end = np.clip(np.round((starts + size0) / downsample).astype(np.int64), 0, n)
    return first, np.minimum(np.maximum(end, first + 1), n)


def _fractions(integral, y0, y1, x0, x1):
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return total, total / np.maximum((x1 - x0) * (y1 - y0), 1)


def cell_fractions(mask: np.ndarray, coords: np.ndarray, size0: float,
                   downsample: float) -> np.ndarray:
    """Fraction of each patch's area that is tissue, from a mask at `downsample` level-0
    px per pixel (an integral image: exact over the mask's pixels)."""
    coords = np.asarray(coords).reshape(-1, 2)
    if not len(coords):
        return np.zeros(0)
    h, w = mask.shape
    x0, x1 = _span(coords[:, 0].astype(np.float64), size0, downsample, w)
    y0, y1 = _span(coords[:, 1].astype(np.float64), size0, downsample, h)
    return _fractions(_integral(mask), y0, y1, x0, x1)[1]


def keeps_rule(mask: np.ndarray, coords: np.ndarray, size0: float, downsample: float,
               min_tissue: float) -> np.ndarray:
    """bool [N]: whether each square keeps the tiling's rule (what the tiling keeps)."""
    fractions = cell_fractions(mask, coords, size0, downsample)
    return (fractions >= min_tissue) & (fractions > 0)


class _Axis:
    """The runs of one axis: integer starts in [0, side0 - size0] sharing a pixel span."""

    def __init__(self, side0: int, size0: float, downsample: float, n: int):
        p = np.arange(0, max(math.floor(side0 - size0) + 1, 0), dtype=np.int64)
        first, end = _span(p.astype(np.float64), size0, downsample, n)
        if len(p):
            new = np.flatnonzero(np.r_[True, (first[1:] != first[:-1]) | (end[1:] != end[:-1])])
        else:
            new = np.zeros(0, np.int64)
        self.start = p[new]                                 # level-0 start of each run
        self.count = np.diff(np.r_[new, len(p)]).astype(np.int64)
        self.first, self.end = first[new], end[new]

    def near(self, lo: int, hi: int) -> np.ndarray:
        """Runs whose span meets mask pixels [lo, hi) (others have no tissue)."""
        return np.flatnonzero((self.first < hi) & (self.end > lo))


class TissueSampler:
    """The positions of one slide that keep the rule, counted once; `draw` is then cheap.
    Holds the mask's integral image (4 bytes a mask pixel) and a few numbers per run.
    `size0` may be fractional (a patch at another µm/px than the grid's)."""

    def __init__(self, mask: np.ndarray, downsample: float, size0: float, min_tissue: float,
                 level0_size: Optional[Tuple[int, int]] = None, name: str = 'the slide'):
        mask = np.asarray(mask, bool)
        if mask.ndim != 2:
            raise DataError(f'{name}: the tissue mask has shape {list(mask.shape)}, not [H, W]')
        h, w = mask.shape
        self.downsample, self.size0 = float(downsample), float(size0)
        self.min_tissue, self.name = float(min_tissue), name
        if not (self.downsample > 0 and self.size0 > 0 and math.isfinite(self.downsample)
                and math.isfinite(self.size0)):
            raise DataError(f'{name}: no positions for squares of {size0} level-0 px on a mask '
                            f'at {downsample} level-0 px per pixel')
        if level0_size is None:   # the mask covers the slide (the tiling's thumbnail)
            level0_size = (int(math.floor(w * self.downsample + 1e-6)),
                           int(math.floor(h * self.downsample + 1e-6)))
        self.level0_size = tuple(int(s) for s in level0_size)
        self._integral = _integral(mask)
        self._x = _Axis(self.level0_size[0], self.size0, self.downsample, w)
        self._y = _Axis(self.level0_size[1], self.size0, self.downsample, h)
        # Only runs whose squares meet the tissue's bounding box can have tissue.
        cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
        self._xi = self._yi = np.zeros(0, np.int64)
        if len(cols):
            xi, yi = self._x.near(cols[0], cols[-1] + 1), self._y.near(rows[0], rows[-1] + 1)
            if len(xi) and len(yi):
                self._xi, self._yi = xi, yi
        # The x-runs' mask columns, relative to the band of integral columns they need.
        first, end = self._x.first[self._xi], self._x.end[self._xi]
        self._lo = int(first.min()) if len(first) else 0
        self._x0, self._x1 = first - self._lo, end - self._lo
        self._hi = int(end.max()) + 1 if len(end) else 0
        # Positions that keep the rule in each run row: y-run count x sum of x-run counts.
        per_row = np.zeros(len(self._yi), np.int64)
        chunk = max(1, _BLOCK // max(len(self._xi), 1))
        for a in range(0, len(self._yi), chunk):
            per_row[a:a + chunk] = self._row_weights(np.arange(a, min(a + chunk,
                                                                       len(self._yi)))).sum(1)
        self._row_cum = np.cumsum(per_row * self._y.count[self._yi])
        self.total = int(self._row_cum[-1]) if len(self._row_cum) else 0

    def _row_weights(self, rows: np.ndarray) -> np.ndarray:
        """int64 [len(rows), x-runs]: x-run count where the cell keeps the rule, else 0."""
        yi = self._yi[rows]
        y0, y1 = self._y.first[yi], self._y.end[yi]
        # Tissue pixels of each row band left of each column, then two columns per cell:
        # the same counts and areas as cell_fractions, so the same fractions.
        band = self._integral[y1, self._lo:self._hi] - self._integral[y0, self._lo:self._hi]
        total = np.take(band, self._x1, axis=1) - np.take(band, self._x0, axis=1)
        area = np.maximum((y1 - y0)[:, None] * (self._x1 - self._x0)[None, :], 1)
        keep = (total / area >= self.min_tissue) & (total > 0)
        return np.where(keep, self._x.count[self._xi][None, :], 0)

    def draw(self, n: int, seed: int, epoch: int, slide_index: int) -> np.ndarray:
        """int64 [n, 2] level-0 top-left (x, y): n independent uniform draws among the
        positions that keep the rule, the same for the same (seed, epoch, slide_index)
        (each taken modulo 2**64: a negative seed is a seed too)."""
        if self.total == 0:
            raise DataError(f'{self.name}: no square of {self.size0:g} level-0 px has tissue '
                            f'>= {self.min_tissue:g} of its area inside the slide '
                            f'({self.level0_size[0]} x {self.level0_size[1]} px at level 0)')
        rng = np.random.default_rng([int(v) % 2 ** 64 for v in (seed, epoch, slide_index)]
                                    + [STREAM_TAG])
        u = rng.integers(0, self.total, size=int(n), dtype=np.int64)
        out = np.zeros((len(u), 2), np.int64)
        if not len(u):
            return out
        row = np.searchsorted(self._row_cum, u, side='right')
        rest = u - np.r_[0, self._row_cum][row]            # [0, y-run count x row sum)
        dy = np.zeros(len(u), np.int64)
        rows, where = np.unique(row, return_inverse=True)
        chunk = max(1, _BLOCK // max(len(self._xi), 1))
        for a in range(0, len(rows), chunk):   # the drawn run rows, a block at a time
            cum = np.cumsum(self._row_weights(rows[a:a + chunk]), axis=1)
            mine = np.flatnonzero((where >= a) & (where < a + chunk))
            local = where[mine] - a
            dy[mine], rest[mine] = np.divmod(rest[mine], cum[local, -1])
            # One search for the block: each row's cumulative counts shifted past the last.
            shift = int(cum[:, -1].max()) + 1
            flat = (cum + shift * np.arange(len(cum))[:, None]).ravel()
            col = np.searchsorted(flat, rest[mine] + shift * local, side='right') \
                - local * cum.shape[1]
            before = np.where(col > 0, cum[local, np.maximum(col - 1, 0)], 0)
            xi = self._xi[col]
            out[mine, 0] = self._x.start[xi] + rest[mine] - before
        out[:, 1] = self._y.start[self._yi[row]] + dy
        return out


def draw_positions(mask: np.ndarray, downsample: float, size0: float, n: int,
                   min_tissue: float, seed: int, epoch: int, slide_index: int,
                   level0_size: Optional[Tuple[int, int]] = None,
                   name: str = 'the slide') -> np.ndarray:
    """int64 [n, 2]: level-0 top-left corners of squares of side `size0` level-0 px, drawn
    uniformly (independently) among the integer positions whose square lies inside the
    slide and keeps the tiling's rule on `mask` (bool [H, W] at `downsample` level-0 px per
    pixel), deterministic from (seed, epoch, slide_index). `level0_size` (width, height):
    the slide's level-0 size; None: the mask's size times `downsample`, rounded down (the
    tiling's mask covers the slide to within a pixel). DataError naming `name` when no
    position keeps the rule. Drawing many epochs of one slide: keep a TissueSampler."""
    return TissueSampler(mask, downsample, size0, min_tissue, level0_size, name).draw(
        n, seed, epoch, slide_index)
