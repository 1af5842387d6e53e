"""Stain normalisation of training and export inputs (data.stain_norm, docs/method.md):
each patch's colours mapped onto one target fitted once per run, Reinhard et al. 2001 (LAB
statistics of the tissue) or Macenko et al. 2009 (H and E optical-density vectors and their
maximum concentrations). The target is recorded in <workdir>/stain_target.json, so that a
resumed run and its export use the same one. NumPy/OpenCV only: it runs in grain workers."""
import dataclasses
import hashlib
import json
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from clusiam_jax import fileio, storage
from clusiam_jax.data import image_io, stats
from clusiam_jax.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

KINDS = ('reinhard', 'macenko')
TARGET_NAME = 'stain_target.json'
SAMPLE_SIZE = 64          # patches of the training data a target is fitted on
_SAMPLE_SEED = 0x57A1     # not the statistics' sample: the two choices stay independent
_MAX_FIT_PIXELS = 1 << 21  # pooled pixels a fit keeps (a fixed subsample beyond)
# Tissue (Reinhard's statistics; what both methods change): the tiling's fixed per-pixel
# floors (tile.min_saturation, black_value): OpenCV HSV saturation above 15 (white and grey
# glass are unsaturated) and value above 30 (black pen, scanner borders).
MIN_SATURATION, BLACK_VALUE = 15, 30
EDGE_SIGMA = 1.5   # px: how far the normalisation fades out across the tissue's edge
# Macenko's parameters: white (Io), the angle percentiles (alpha) and the transparency
# threshold (beta). OD = -ln((I + 1) / (Io + 1)) with Io = 255 makes uint8 white zero density
# and no density negative (Io = 240 gives every pixel brighter than 240 a negative one).
IO, ALPHA, BETA = 255.0, 1.0, 0.15
MAX_PERCENTILE = 99.0     # a stain's "maximum" concentration, robust to specks
# Fewer tissue pixels than this share of a patch leave it unchanged: the estimate would be
# noise, and a background-only patch has none (never a NaN or an exception in a worker).
MIN_TISSUE_FRACTION = 0.01
_MIN_TISSUE_PIXELS = 16
_MIN_ANGLE = np.deg2rad(1.0)  # two stain vectors closer than this: no stable decomposition

# A patch's own stains are estimated on at most this many pixels (a regular grid): as
# stable as all of a 224 px patch, at a fraction of the cost. Fits use every pixel.
_ESTIMATE_PIXELS = 1 << 14

# OD of every uint8 value: a lookup is far cheaper than a log per pixel.
_OD_LUT = (-np.log((np.arange(256) + 1.0) / (IO + 1.0))).astype(np.float32)
# The largest value dense enough for beta: "OD >= beta in every channel" on the raw pixels.
_OPAQUE_MAX = int(np.flatnonzero(_OD_LUT >= BETA).max())


@dataclasses.dataclass(frozen=True)
class StainTarget:
    """What a patch is normalised to. reinhard: the tissue's LAB (OpenCV's float scale: L in
    [0, 100]) mean and std; macenko: the H and E unit OD vectors and their 99th-percentile
    concentrations. `parameters` records the constants it was fitted with."""
    kind: str
    mean: Tuple[float, ...] = ()
    std: Tuple[float, ...] = ()
    stains: Tuple[Tuple[float, ...], ...] = ()
    max_concentrations: Tuple[float, ...] = ()
    parameters: Dict[str, float] = dataclasses.field(default_factory=dict)
    fitted_on: str = ''
    pixels: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + '\n'

    @classmethod
    def from_dict(cls, d: dict) -> 'StainTarget':
        """A target read back; ValueError naming what is wrong."""
        if not isinstance(d, dict) or d.get('kind') not in KINDS:
            raise ValueError(f'kind must be one of {", ".join(KINDS)}')
        t = cls(kind=d['kind'], mean=_floats(d.get('mean', ())), std=_floats(d.get('std', ())),
                stains=tuple(_floats(v) for v in d.get('stains', ())),
                max_concentrations=_floats(d.get('max_concentrations', ())),
                parameters={str(k): float(v) for k, v in dict(d.get('parameters', {})).items()},
                fitted_on=str(d.get('fitted_on', '')), pixels=int(d.get('pixels', 0)))
        shapes = ({'mean': (3,), 'std': (3,)} if t.kind == 'reinhard' else
                  {'stains': (2, 3), 'max_concentrations': (2,)})
        for name, shape in shapes.items():
            value = np.asarray(getattr(t, name), np.float64)
            if value.shape != shape or not np.isfinite(value).all():
                raise ValueError(f'{name} must be {shape} finite numbers')
        if (t.kind == 'reinhard' and min(t.std) <= 0) or (
                t.kind == 'macenko' and min(t.max_concentrations) <= 0):
            raise ValueError('a spread or concentration is not positive')
        return t

    @classmethod
    def from_json(cls, text: str) -> 'StainTarget':
        return cls.from_dict(json.loads(text))


def _floats(values) -> Tuple[float, ...]:
    return tuple(float(v) for v in values)


# ----------------------------------------------------------------------------- pixel maths

def tissue_pixels(img: np.ndarray) -> np.ndarray:
    """bool [H, W]: the tissue rule (MIN_SATURATION, BLACK_VALUE above)."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    return (hsv[..., 1] > MIN_SATURATION) & (hsv[..., 2] > BLACK_VALUE)


def to_lab(img: np.ndarray) -> np.ndarray:
    """float32 [H, W, 3] OpenCV LAB of uint8 RGB, on the float scale (no 8-bit rounding)."""
    return cv2.cvtColor(img.astype(np.float32) * np.float32(1 / 255), cv2.COLOR_RGB2LAB)


def optical_density(img: np.ndarray) -> np.ndarray:
    """float32, img's shape: -ln((I + 1) / (Io + 1)) per channel, 0 for white."""
    return cv2.LUT(img, _OD_LUT)


def _opaque_od(img: np.ndarray) -> np.ndarray:
    """float32 [N, 3]: the OD of the pixels dense in every channel (Macenko's beta); the
    rest is transparent (glass, or too pale to tell the stains apart)."""
    top = np.maximum(np.maximum(img[..., 0], img[..., 1]), img[..., 2])
    pixels = img[top <= _OPAQUE_MAX]
    return optical_density(pixels) if len(pixels) else np.zeros((0, 3), np.float32)


def _grid(img: np.ndarray) -> np.ndarray:
    step = int(np.ceil(np.sqrt(img.shape[0] * img.shape[1] / _ESTIMATE_PIXELS)))
    return img[::step, ::step] if step > 1 else img


def _enough(count: int, total: int) -> bool:
    return count >= max(_MIN_TISSUE_PIXELS, MIN_TISSUE_FRACTION * total)


def _stain_vectors(od: np.ndarray) -> Optional[np.ndarray]:
    """float64 [2, 3] unit OD vectors, haematoxylin first, of opaque pixels od [N, 3]: the
    plane of the two main directions (uncentred: stain mixtures span a plane through the
    origin), the extreme angles in it at the ALPHA percentiles. None when degenerate."""
    od = od.astype(np.float64)
    _, vectors = np.linalg.eigh(od.T @ od / len(od))
    plane = vectors[:, [2, 1]]                  # the two largest eigenvalues
    plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)
    projected = od @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, [ALPHA, 100.0 - ALPHA])
    if not np.isfinite([low, high]).all() or high - low < _MIN_ANGLE:
        return None
    pair = np.stack([plane @ [np.cos(a), np.sin(a)] for a in (low, high)])
    pair /= np.linalg.norm(pair, axis=1, keepdims=True)
    pair *= np.where(pair.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)
    # Haematoxylin absorbs red more than eosin does (eosin is the red dye).
    return pair if pair[0, 0] >= pair[1, 0] else pair[::-1].copy()


def _max_concentrations(od: np.ndarray, stains: np.ndarray) -> np.ndarray:
    concentrations = od.astype(np.float64) @ np.linalg.pinv(stains)
    return np.percentile(concentrations, MAX_PERCENTILE, axis=0)


# ----------------------------------------------------------------------------- fit and apply

def _pool(values: List[np.ndarray]) -> np.ndarray:
    pooled = np.concatenate(values) if values else np.zeros((0, 3), np.float32)
    if len(pooled) > _MAX_FIT_PIXELS:
        keep = np.sort(np.random.default_rng(_SAMPLE_SEED).choice(
            len(pooled), _MAX_FIT_PIXELS, replace=False))
        pooled = pooled[keep]
    return pooled


def parameters(kind: str) -> Dict[str, float]:
    """The constants a target of `kind` is fitted and applied with (recorded with it)."""
    common = {'min_saturation': MIN_SATURATION, 'black_value': BLACK_VALUE,
              'edge_sigma': EDGE_SIGMA}
    if kind == 'reinhard':
        return common
    return {'io': IO, 'alpha': ALPHA, 'beta': BETA, 'max_percentile': MAX_PERCENTILE, **common}


def fit(kind: str, images: Sequence[np.ndarray], what: str = 'the images') -> StainTarget:
    """The target of `kind` over the tissue of all `images` (uint8 [H, W, 3]) pooled;
    DataError when they hold no tissue by the rule above."""
    if kind not in KINDS:
        raise ConfigError(f'data.stain_norm must be one of {", ".join(KINDS)}; got {kind!r}')
    images = [_checked(img) for img in images]
    if kind == 'reinhard':
        pixels = _pool([to_lab(img)[tissue_pixels(img)] for img in images])
        if not _enough(len(pixels), 1):
            raise DataError(f'no tissue to fit the reinhard stain target on in {what}: no '
                            f'pixel of HSV saturation over {MIN_SATURATION} and value over '
                            f'{BLACK_VALUE} (background or grey only)')
        lab = pixels.astype(np.float64)
        return StainTarget(kind, mean=_floats(lab.mean(axis=0)), std=_floats(lab.std(axis=0)),
                           parameters=parameters(kind), fitted_on=what, pixels=len(lab))
    od = _pool([_opaque_od(img) for img in images])
    stains = _stain_vectors(od) if _enough(len(od), 1) else None
    if stains is None:
        raise DataError(f'no tissue to fit the macenko stain target on in {what}: no two '
                        f'distinct stains in pixels of optical density over {BETA} '
                        f'(background or one colour only)')
    return StainTarget(kind, stains=tuple(_floats(v) for v in stains),
                       max_concentrations=_floats(_max_concentrations(od, stains)),
                       parameters=parameters(kind), fitted_on=what, pixels=len(od))


def _checked(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f'stain normalisation takes uint8 [H, W, 3] RGB, got {img.dtype} '
                         f'{img.shape}')
    return img


class StainNormalizer:
    """uint8 [H, W, 3] -> the same patch with its stains mapped onto `target` (a picklable
    callable, the loader's `transform`). A patch with too little tissue to estimate its own
    stains from is returned unchanged, never NaN."""

    def __init__(self, target: StainTarget):
        self.target = target
        if target.kind == 'reinhard':
            self._mean = np.asarray(target.mean, np.float32)
            self._std = np.asarray(target.std, np.float32)
        else:
            self._stains = np.asarray(target.stains, np.float64)
            self._max = np.asarray(target.max_concentrations, np.float64)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        img = _checked(img)
        return self._reinhard(img) if self.target.kind == 'reinhard' else self._macenko(img)

    def _reinhard(self, img: np.ndarray) -> np.ndarray:
        mask = tissue_pixels(img).view(np.uint8)
        if not _enough(cv2.countNonZero(mask), mask.size):
            return img
        lab = to_lab(img)
        mean, std = (v.ravel() for v in cv2.meanStdDev(lab, mask=mask))   # float64 sums
        # A flat channel keeps its spread rather than being blown up.
        scale = np.where(std > 1e-3, self._std / np.maximum(std, 1e-3), 1.0)
        affine = np.hstack([np.diag(scale), (self._mean - scale * mean)[:, None]])
        lab = cv2.transform(lab, affine.astype(np.float32))    # per channel: scale, shift
        rgb = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB) * np.float32(255) + np.float32(0.5)
        return _keep_background(img, np.clip(rgb, 0, 255).astype(np.uint8), mask)

    def _macenko(self, img: np.ndarray) -> np.ndarray:
        grid = _grid(img)
        opaque = _opaque_od(grid)
        if not _enough(len(opaque), grid.shape[0] * grid.shape[1]):
            return img
        stains = _stain_vectors(opaque)
        if stains is None:
            return img
        inverse = np.linalg.pinv(stains)           # [3, 2]: least-squares concentrations
        peak = np.percentile(opaque.astype(np.float64) @ inverse, MAX_PERCENTILE, axis=0)
        if not (np.isfinite(peak).all() and (peak > 1e-6).all()):
            return img
        # od @ inverse @ diag(max/peak) @ target stains, folded into one 3x3 matrix
        # (cv2.transform multiplies each pixel's column vector: the transpose).
        mix = ((inverse * (self._max / peak)) @ self._stains).T.astype(np.float32)
        density = cv2.transform(optical_density(img), mix)
        out = cv2.exp(-density) * np.float32(IO + 1.0) - np.float32(0.5)   # rounds below
        out = np.clip(out, 0, 255).astype(np.uint8)
        return _keep_background(img, out, tissue_pixels(img).view(np.uint8))


def _keep_background(img: np.ndarray, out: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`out` on the tissue, `img` on the background: Reinhard's map sends white far off
    and Macenko projects grey glass onto the stains' plane, both a tinted glass. The mask's
    edge is blurred: a hard one leaves pale tissue pixels next to it unchanged (speckle)."""
    weight = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), EDGE_SIGMA)
    return cv2.blendLinear(out, img, weight, 1.0 - weight)


# ----------------------------------------------------------------------------- the run's target

def read_reference(path: str) -> np.ndarray:
    """The reference image (local or gs:// s3://) as uint8 RGB; DataError in one line."""
    try:
        data = storage.read_bytes(path)
    except OSError as e:
        raise DataError(f'data.stain_reference {path}: {e.strerror or e}') from None
    try:
        return image_io.decode_rgb(data)
    except image_io.BadImageError as e:
        raise DataError(f'data.stain_reference {path} is not a readable image: {e}') from None


def read_target(path: str) -> StainTarget:
    """A recorded target; DataError when unreadable or fitted with other constants (this
    version would normalise differently from what the run was trained with)."""
    try:
        target = StainTarget.from_json(storage.read_bytes(path).decode('utf-8'))
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
        raise DataError(f'{path} is not a stain target ({e}): restore the one this run '
                        f'was normalised with, or delete it to fit a new one') from None
    if target.parameters != parameters(target.kind):
        raise DataError(f'{path} was fitted with {target.parameters}; this version '
                        f'normalises with {parameters(target.kind)}: delete it to fit a new '
                        f'one (the run was trained with the old normalisation)')
    return target


def fit_sample(kind: str, source, size: int = SAMPLE_SIZE) -> StainTarget:
    """The target over a fixed sample of `source`'s patches (unreadable ones skipped)."""
    indices = stats.sample_indices(len(source), size, seed=_SAMPLE_SEED)
    images = []
    for i in map(int, indices):
        try:
            images.append(source.load(i))
        except image_io.BadImageError as e:
            logger.warning('stain target: skipping %s (%s)', source.path(i), e)
    if not images:
        raise DataError(f'stain target: none of the {len(indices)} sampled patches is '
                        f'readable')
    return fit(kind, images, f'a fixed sample of {len(images)} of the {len(source)} '
                             f'training patches')


def prepare(config, workdir: Optional[str], source=None,
            record: bool = True) -> Optional[StainNormalizer]:
    """The run's normaliser (None when data.stain_norm is ''): the target recorded in
    <workdir>/stain_target.json when there is one (a resumed run, its export), else fitted
    on data.stain_reference or a fixed sample of `source`, and recorded there when `record`
    (the main process; every process fits the same target from the same sample)."""
    kind = config.data.get('stain_norm', '')
    if not kind:
        return None
    if kind not in KINDS:
        raise ConfigError(f'data.stain_norm must be one of {", ".join(KINDS)}; got {kind!r}')
    reference = config.data.get('stain_reference', '')
    recorded = storage.join(workdir, TARGET_NAME) if workdir else None
    if recorded and storage.exists(recorded):
        target = read_target(recorded)
        if target.kind != kind:
            raise ConfigError(f'{recorded} records the {target.kind} stain target this run '
                              f'was trained with; data.stain_norm={kind} would change it')
        logger.info('stain normalisation (%s) to the target in %s, fitted on %s%s', kind,
                    recorded, target.fitted_on,
                    f' (data.stain_reference {reference} is not read again)' if reference
                    else '')
        return StainNormalizer(target)
    if reference:
        target = fit(kind, [read_reference(reference)], f'data.stain_reference {reference}')
    elif source is None:
        raise DataError(f'no stain target recorded in {recorded or "the run"}: data.stain_norm='
                        f'{kind} needs the one the run was trained with')
    else:
        target = fit_sample(kind, source)
    if recorded and record:
        storage.makedirs(workdir)
        fileio.write_text(recorded, target.to_json())
    logger.info('stain normalisation (%s) to a target fitted on %s (%d pixels)%s', kind,
                target.fitted_on, target.pixels, f', recorded in {recorded}' if recorded else '')
    return StainNormalizer(target)


def record(workdir: str, normalizer: Optional[StainNormalizer]) -> None:
    """Records the run's target once it starts for real (beside config.json, process 0): a
    start refused before that leaves no target for the next start to take as the run's."""
    if normalizer is None:
        return
    recorded = storage.join(workdir, TARGET_NAME)
    if not storage.exists(recorded):
        storage.makedirs(workdir)
        fileio.write_text(recorded, normalizer.target.to_json())
        logger.info('stain target recorded in %s', recorded)


def digest(normalizer: StainNormalizer) -> str:
    """A short name of the target (exports record it: another target, another export)."""
    target = normalizer.target
    text = StainTarget.from_dict(target.to_dict()).to_json().encode()   # as read back
    return f'stain_norm={target.kind}:{hashlib.sha256(text).hexdigest()[:12]}'


class NormalizedSource:
    """`source` with its patches stain-normalised, for the normalisation statistics: a run
    with data.stain_norm standardises what the network sees, not the raw colours."""

    def __init__(self, source, normalizer: StainNormalizer):
        self.source, self.normalizer = source, normalizer

    def __len__(self):
        return len(self.source)

    def path(self, index: int) -> str:
        return self.source.path(index)

    def load(self, index: int) -> np.ndarray:
        return self.normalizer(self.source.load(index))


def normalized_stats(source, normalizer: StainNormalizer, data_path: str, sample_size: int,
                     num_workers: int = 0, skip_log=None):
    """(mean, std, origin) over a fixed sample of the normalised patches. Not cached: the
    cache is keyed by the patch list alone, which the raw statistics share."""
    sample = stats.sample_indices(len(source), sample_size)
    mean, std = stats.compute_stats(NormalizedSource(source, normalizer), num_workers, skip_log,
                                    sample, what=f'the patches of {data_path}')
    return mean, std, (f'computed over a fixed sample of {len(sample)} of the {len(source)} '
                       f'patches of {data_path} after stain normalisation '
                       f'({normalizer.target.kind})')
