"""Every key's default, the methods' recipes, and the checks a locked ConfigDict leaves out."""
import difflib
import os

import jax
import ml_collections
from absl import flags
from ml_collections.config_flags import config_path, tuple_parser

from clusiam_jax import storage
from clusiam_jax.errors import ConfigError
from clusiam_jax.models import BACKBONES, METHOD_SPECS, onednn
from clusiam_jax.models.conv import CONV_IMPLS

MONITOR_METRICS = ('rankme', 'alignment', 'uniformity', 'active_clusters', 'active_clusters_gumbel',
                   'gumbel_agreement', 'cluster_entropy', 'knn_top1', 'knn_balanced')
CLUSTER_METRICS = ('active_clusters', 'active_clusters_gumbel', 'gumbel_agreement',
                   'cluster_entropy')
LOWER_IS_BETTER = ('alignment', 'uniformity')


def default_config() -> ml_collections.ConfigDict:
    """Every key a run may use, locked: ConfigDict refuses an unknown key or another type."""
    c = ml_collections.ConfigDict({section: {} for section in (
        'model', 'loss', 'data', 'augment', 'train', 'monitor', 'optim', 'ema', 'export',
        'tile')})
    c.model.name = 'clusiam'          # clusiam | clubyol | simsiam | byol
    c.model.backbone = 'resnet18'     # resnet18 | resnet50 (| resnet_tiny: tests only)
    c.model.feat_size = 2048          # D: projector output size
    c.model.pred_hidden = 512         # predictor hidden width (4096 for BYOL-type)
    c.model.num_clusters = 100        # K
    c.model.dtype = 'float32'         # compute dtype: float32 | bfloat16 (params stay float32)
    # auto | xla | im2col | onednn (CPU: oneDNN's kernels, built on first use). auto: on CPU,
    # onednn for bfloat16 where oneDNN is installed, else im2col; on GPU/TPU, xla
    c.model.conv_impl = 'auto'

    c.loss.alpha = 0.5                # L = (1 - alpha) * L_inv + alpha * S

    c.data.path = ''                  # patch folder, manifest CSV or built TFDS dataset dir
    c.data.image_size = 224
    c.data.num_workers = 0            # grain worker processes (0: in the main process)
    c.data.prefetch = 2               # batches prefetched to the devices
    # None: computed over the training list (and recorded in the run's normalization.json)
    c.data.mean = ml_collections.FieldReference(None, field_type=tuple)
    c.data.std = ml_collections.FieldReference(None, field_type=tuple)
    c.data.vflip = False              # histology option: vertical flips
    c.data.rot90 = False              # histology option: random 90-degree rotations
    c.data.augment_on_device = False  # workers decode + crop; the rest runs in the jitted step
    c.data.slide_dir = ''             # slides of a CLAM/TRIDENT data.path (a tiling has its own)
    c.data.sampling = 'uniform'       # uniform over patches (original) | slide_balanced |
    #                                   tissue_random (fresh positions in the tissue each epoch)
    c.data.patches_per_slide = 0      # tissue_random: patches per slide and epoch (0: the grid's)
    c.data.mpps = ()                  # µm/px each sample is drawn at (): the tiling's target_mpp
    c.data.mpp_weights = ()           # their probabilities (normalised); (): equal
    c.data.cross_scale = False        # the two views of a pair at independently drawn µm/px
    c.data.stain_norm = ''            # '' | macenko | reinhard: training and export inputs
    c.data.stain_reference = ''       # image the stain target is fitted on; '': a data sample
    c.data.min_tissue = 0.0           # patch files with less tissue are skipped (listed)
    c.data.stats_sample = 4096        # slide sources: normalization over this many patches
    c.data.open_slides = 512          # slide handles kept open per worker (LRU)
    c.data.cache_dir = ''             # slides staged from a bucket ('' ~/.cache/clusiam_jax/slides)
    c.data.cache_gb = 50.0            # that cache's size per host (least recently opened evicted)

    # Histology options of the augmentation (docs/method.md); off: the paper's pipeline.
    c.augment.hed = 0.0               # HED stain jitter strength (Tellez et al. 2018: 0.05)

    c.train.batch_size = 512          # global batch (pairs per step)
    c.train.num_epochs = 50
    c.train.seed = 0
    c.train.log_every_steps = 10
    c.train.checkpoint_every_epochs = 10
    c.train.keep_checkpoints = 3
    c.train.distributed = False       # multi-process: jax.distributed.initialize() first
    c.train.resume_from = ''          # a new workdir starts from another run (or RUN/checkpoints/N)
    c.train.init_from = ''            # a fresh run starts from these weights (torch, a run)
    c.train.on_nonfinite = 'stop'     # stop the run | skip the step (state unchanged)
    c.train.max_consecutive_skips = 10  # skip: stop after this many skipped steps in a row
    c.train.best_metric = ''          # e.g. monitor/rankme: also keep the best checkpoint by it
    c.train.best_mode = ''            # max | min ('': the metric's own direction)
    c.train.stop_on_collapse = False  # end the run (with a checkpoint) when the monitor says so

    # Representation monitoring without labels (docs/method.md §6); off by default.
    c.monitor.every_epochs = 0        # embed the monitor set every N epochs (and at the end)
    c.monitor.data_path = ''          # the monitor set: any source data.path takes, or ...
    c.monitor.holdout = 0.0           # ... this fraction of the training slides, held out
    c.monitor.num_patches = 1024      # patches embedded (each + two augmented views)
    c.monitor.min_rankme = 2.0        # RankMe below this flags collapse

    c.optim.base_lr = 0.05            # lr = base_lr * batch_size / 256
    c.optim.weight_decay = 1e-4       # coupled (PyTorch SGD) weight decay
    c.optim.momentum = 0.9
    c.optim.fix_pred_lr = False       # predictor keeps the initial lr
    c.optim.name = 'sgd'              # sgd (original) | lars (pod-scale batches, as BYOL)
    c.optim.warmup_epochs = 0         # linear warmup per step before the per-epoch cosine

    c.ema.momentum = 0.99             # target = m * target + (1 - m) * online
    c.ema.schedule = 'constant'       # constant | cosine (BYOL: m -> 1 over training)

    # Embedding export (python launch.py --mode export) and what runs after training.
    c.export.data_path = ''           # patches to embed; '' means data.path
    c.export.out_dir = ''             # '' means <workdir>/export
    c.export.batch_size = 256
    c.export.after_training = False   # the demo exports (and draws cluster maps) when done
    c.export.format = 'h5'            # h5: <out>/h5_files/<slide>.h5 (CLAM) | npz: one .npz
    c.export.with_projection = False  # also store the projector output z ('projections')
    c.export.num_workers = 4          # image-decoding threads
    c.export.cluster_maps = False     # draw <out>/cluster_maps/<slide>.png after the export
    c.export.thumbnail = ''           # image (one slide) or folder of <slide_id>[_thumb].png/jpg
    c.export.thumbnail_downsample = 0.0  # level-0 pixels per thumbnail pixel (needed with one)
    c.export.image_size = 0           # patches are resized to this; 0: the run's data.image_size
    c.export.checkpoint = 'latest'    # latest | best (train.best_metric) | a step number
    c.export.slide_dir = ''           # slides of a CLAM/TRIDENT export.data_path; '' data.slide_dir
    c.export.pt_files = False         # also pt_files/<slide>.pt (CLAM's MIL loader; needs torch)
    c.export.map_alpha = 0.5          # cluster maps: colour opacity over the thumbnail
    c.export.annotations = ''         # cluster maps: folder of <slide_id>.geojson/.xml contours
    c.export.qupath = False           # also qupath/<slide>.geojson: clusters as QuPath tiles
    c.export.atlas = False            # also atlas/index.html: each cluster's typical patches
    c.export.mpps = ()                # features at each µm/px for the same grid (multi-scale)
    c.export.augment_copies = 0       # K HED-jittered embeddings per patch too (augment.hed)
    c.export.dtype = 'model'          # embedding compute: model (model.dtype) | float32 | bfloat16

    # Tiling whole slides (python launch.py --mode tile), docs/method.md §9.
    c.tile.slides = ''                # slide folder | CSV path[,slide_id,mpp,label] | one slide
    c.tile.out_dir = ''               # patches/, masks/, slides.csv
    c.tile.target_mpp = 0.5           # µm per pixel of the patches (0.5 ~ 20x)
    c.tile.patch_size = 224           # patch side in pixels at target_mpp
    c.tile.overlap = 0                # pixels (at target_mpp) shared by neighbouring patches
    c.tile.align = False              # True: patches laid on the scanner's tiles (fewer decodes)
    c.tile.min_tissue = 0.5           # fraction of a patch that must be tissue
    c.tile.mpp_default = 0.0          # level-0 µm/px of slides whose metadata has none; 0: none
    c.tile.mpp_override = 0.0         # level-0 µm/px of every slide, over its metadata; 0: none
    c.tile.mpp = 0.0                  # renamed: refused when set (mpp_default / mpp_override)
    c.tile.masks = ''                 # folder of <slide_id>.geojson/.xml tissue polygons
    c.tile.num_workers = 2            # slides tiled in parallel (processes)
    c.tile.host_count = 1             # hosts sharing the slides (each the sorted ids i, i+count..)
    c.tile.host_index = 0             # this host's share; each writes slides-<i>-of-<count>.csv
    c.tile.tissue_mpp = 8.0           # µm/px of the image tissue is detected on
    c.tile.median_blur = 7            # px (of that image)
    c.tile.saturation_threshold = 0   # 0: Otsu on the saturation
    c.tile.min_saturation = 15        # floor of the threshold (0-255)
    c.tile.black_value = 30           # darker pixels (ink, empty tiles) are not tissue
    c.tile.morph_kernel = 5           # px: closing then opening
    c.tile.max_hole_um2 = 50000.0     # holes up to this area are filled
    c.tile.min_area_um2 = 10000.0     # smaller tissue components are dropped
    return c.lock()


# The settings that make each method the paper's (docs/method.md); the rest is default_config's.
_CLUSIAM = {'model.feat_size': 2048, 'model.pred_hidden': 512, 'loss.alpha': 0.5,
            'optim.fix_pred_lr': True}
# The original forces fix_pred_lr off for CluBYOL.
_CLUBYOL = {'model.feat_size': 256, 'model.pred_hidden': 4096, 'loss.alpha': 0.9,
            'optim.fix_pred_lr': False, 'ema.momentum': 0.99}
# simsiam and byol, the baselines of the paper's tables: the networks without the cluster term.
METHOD_RECIPES = {'clusiam': _CLUSIAM, 'clubyol': _CLUBYOL,
                  'simsiam': dict(_CLUSIAM, **{'loss.alpha': 0.0}),
                  'byol': dict(_CLUBYOL, **{'loss.alpha': 0.0})}


def method_config(name: str) -> ml_collections.ConfigDict:
    c = default_config()
    c.model.name = name
    for key, value in METHOD_RECIPES[name].items():
        config_path.set_value(key, c, value)
    return c


def flatten(config, prefix: str = '') -> dict:
    """{'train.batch_size': 512, ...} for a ConfigDict or nested dict."""
    out = {}
    for key, value in config.items():
        name = f'{prefix}{key}'
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            out.update(flatten(value, name + '.'))
        else:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def config_changes(old, new) -> list:
    """['train.num_epochs: 2 -> 3', ...]: the keys whose value differs, sorted."""
    a, b = flatten(old), flatten(new)
    return [f'{k}: {a.get(k, "(absent)")!r} -> {b.get(k, "(absent)")!r}'
            for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def _unknown_key(config, key: str, name: str) -> str:
    """The one-line error for `key`, naming its first unknown part as `name` does."""
    node = config
    for part in key.split('.'):
        known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        if part not in known:
            break
        node = node[part]
    close = difflib.get_close_matches(part, known, n=1)
    return (f'unknown config key {name.format(part=part, key=key)!r}'
            + (f'; did you mean {close[0]!r}?' if close else
               f'; known here: {", ".join(sorted(known))}'))


def _check_types(config):
    """Unknown keys and wrong types in a section a recipe rebuilt (ConfigDict's own checks)."""
    schema = default_config()
    for key, value in flatten(config).items():
        try:
            config_path.set_value(key, schema, value)
        except (KeyError, AttributeError):
            raise ConfigError(_unknown_key(schema, key, '{key}')) from None
        except TypeError:
            kind = config_path.get_type(key, schema).__name__
            raise ConfigError(f'config key {key!r} must be {kind}, got '
                              f'{type(value).__name__} {value!r}') from None


_PARSERS = {int: flags.IntegerParser(), float: flags.FloatParser(), bool: flags.BooleanParser(),
            tuple: tuple_parser.TupleParser(), str: flags.ArgumentParser()}


def override(config, key: str, text: str):
    """Sets `--config.KEY=TEXT`, parsed as the key's type by absl's parsers (as config flags)."""
    flag = f'--config.{key}={text}'
    try:
        kind = config_path.get_type(key, config)
    except (KeyError, AttributeError):
        raise ConfigError(_unknown_key(config, key, '{part}') + f' ({flag})') from None
    if kind not in _PARSERS:
        raise ConfigError(f'{flag}: {key} is a section; set one of its keys')
    try:
        value = None if kind is tuple and text == 'None' else _PARSERS[kind].parse(text)
        config_path.set_value(key, config, value)
    except (ValueError, TypeError) as e:  # absl's bool parser gives (message, value)
        raise ConfigError(f'bad config override {flag}: ' + '; '.join(map(str, e.args))) from None


# Each key's own rule: choices, an interval, or 'path'/'folder' (when set: exists/is a folder).
RULES = {
    'model.name': tuple(METHOD_SPECS),
    'model.backbone': tuple(BACKBONES),
    'model.dtype': ('float32', 'bfloat16'),
    'model.conv_impl': tuple(CONV_IMPLS),
    'data.sampling': ('uniform', 'slide_balanced', 'tissue_random'),
    'data.stain_norm': ('', 'macenko', 'reinhard'),
    'augment.hed': '[0, 1)',
    'train.on_nonfinite': ('stop', 'skip'),
    'train.best_metric': ('',) + tuple(f'monitor/{m}' for m in MONITOR_METRICS),
    'train.best_mode': ('', 'max', 'min'),   # '': the metric's own direction
    'optim.name': ('sgd', 'lars'),
    'ema.schedule': ('constant', 'cosine'),
    'export.format': ('h5', 'npz'),
    'export.dtype': ('model', 'float32', 'bfloat16'),
    'monitor.holdout': '[0, 1)',
    'monitor.num_patches': '[8, 8192]',      # the scores compare every pair
    'export.map_alpha': '(0, 1]',
    'tile.patch_size': '[8, inf)',
}
RULES.update({key: rule for rule, keys in {
    '(0, inf)': 'data.cache_gb model.feat_size model.pred_hidden model.num_clusters '
               'train.batch_size train.num_epochs train.max_consecutive_skips tile.target_mpp '
               'tile.tissue_mpp',
    # keep_checkpoints=0 would train and keep nothing to resume from or export.
    '[1, inf)': 'data.image_size data.stats_sample data.open_slides train.keep_checkpoints '
                'export.batch_size export.num_workers tile.host_count',
    '[0, inf)': 'data.num_workers train.checkpoint_every_epochs monitor.every_epochs '
                'data.patches_per_slide export.augment_copies '
                'export.image_size export.thumbnail_downsample tile.mpp_default tile.mpp_override '
                'tile.num_workers tile.median_blur tile.saturation_threshold tile.min_saturation '
                'tile.black_value tile.morph_kernel tile.max_hole_um2 tile.min_area_um2 '
                'tile.host_index',
    '[0, 1]': 'loss.alpha data.min_tissue tile.min_tissue',
    'path': 'data.stain_reference train.resume_from train.init_from monitor.data_path '
            'export.data_path export.thumbnail tile.slides',
    'folder': 'data.slide_dir export.slide_dir export.annotations tile.masks',
}.items() for key in keys.split()})


def _refuse(broken, message: str):
    if broken:
        raise ConfigError(message)


def check_rules(section, name: str):
    """RULES for one section (`model` again when a run's config.json is read back)."""
    for key, rule in RULES.items():
        if not key.startswith(name + '.'):
            continue
        value = section[key.split('.')[1]]
        if isinstance(rule, tuple):
            words = (' or '.join(map(repr, rule)) if len(rule) == 2 else
                     'one of ' + ', '.join(map(repr, rule)))
            _refuse(value not in rule, f'{key} must be {words}; got {value!r}')
        elif rule == 'path':
            _refuse(value and not storage.exists(value), f'{key} does not exist: {value}')
        elif rule == 'folder':
            _refuse(value and not storage.isdir(value), f'{key} is not a folder: {value}')
        else:
            low, high = (float(v) for v in rule[1:-1].split(','))
            inside = ((low <= value if rule[0] == '[' else low < value)
                      and (value <= high if rule[-1] == ']' else value < high))
            words = (f'in {rule}' if not rule.endswith('inf)') else
                     'positive' if rule == '(0, inf)' else f'at least {low:g}')
            _refuse(not inside, f'{key} must be {words}; got {value}')


def validate(config, num_devices: int = 1, check_data_path: bool = True):
    """ConfigError (one line) for anything that would fail later or compute nonsense."""
    _check_types(config)
    for name in config.keys():
        if name != 'tile':
            check_rules(config[name], name)
    t, d, mon, exp = config.train, config.data, config.monitor, config.export
    method, alpha, warmup = config.model.name, config.loss.alpha, config.optim.warmup_epochs
    has_clusters = METHOD_SPECS[method].has_cluster_head
    reason = _onednn_refusal(config, num_devices)
    _refuse(reason, str(reason))
    _refuse(not has_clusters and alpha != 0.0,
            f'{method} has no cluster term: loss.alpha must be 0; got {alpha}')
    _refuse(t.batch_size % num_devices,
            f'train.batch_size={t.batch_size} is not divisible by the {num_devices} devices')
    _refuse(not 0 <= warmup < t.num_epochs,
            f'optim.warmup_epochs must be in [0, train.num_epochs); got {warmup}')
    for key in ('mean', 'std'):
        _refuse(d[key] is not None and len(d[key]) != 3,
                f'data.{key} must have 3 values (R, G, B); got {d[key]!r}')
    _refuse((d.mean is None) != (d.std is None),
            'set both data.mean and data.std, or neither (computed)')
    _refuse(d.std is not None and min(d.std) <= 0, f'data.std must be positive; got {d.std!r}')
    _check_mpps(d, exp)
    _refuse(t.init_from and t.resume_from,
            'set train.init_from or train.resume_from, not both: resume_from continues a run '
            '(optimizer, step, schedules), init_from starts one from weights')
    _refuse(mon.every_epochs and not mon.data_path and not mon.holdout,
            'monitor.every_epochs needs a monitor set: monitor.data_path=DIR or '
            'monitor.holdout=0.05 (a fraction of the training slides)')
    _refuse(mon.data_path and mon.holdout, 'set monitor.data_path or monitor.holdout, not both')
    _refuse(mon.holdout and not mon.every_epochs, 'monitor.holdout holds slides out of '
            'training for the monitor: set monitor.every_epochs too (or drop monitor.holdout)')
    _refuse(t.best_metric.removeprefix('monitor/') in CLUSTER_METRICS and not has_clusters,
            f'train.best_metric={t.best_metric}: {method} has no cluster head')
    _refuse(exp.after_training and str(exp.checkpoint) == 'best' and not t.best_metric,
            'export.checkpoint=best after training needs train.best_metric')
    _refuse((t.best_metric or t.stop_on_collapse) and not mon.every_epochs,
            'train.best_metric and train.stop_on_collapse need the monitor: set '
            'monitor.every_epochs (and monitor.data_path or monitor.holdout)')
    _refuse(exp.out_dir and os.path.isfile(exp.out_dir),
            f'export.out_dir {exp.out_dir} is a file, not a folder')
    parse_checkpoint_choice(exp.checkpoint)
    for key in ('annotations', 'thumbnail'):
        _refuse(exp[key] and not exp.cluster_maps,
                f'export.{key} is used only with export.cluster_maps=True')
    _refuse(exp.thumbnail and not exp.thumbnail_downsample, 'export.thumbnail needs '
            'export.thumbnail_downsample (level-0 pixels per thumbnail pixel, e.g. 8)')
    _refuse(exp.pt_files and exp.format != 'h5',
            'export.pt_files goes with export.format=h5 (per-slide files)')
    if not check_data_path:
        return
    _refuse(not d.path, 'data.path is not set: pass --config.data.path=DIR (a patch folder, a '
            'manifest CSV or a built dataset)')
    tiled = config.tile.slides and os.path.abspath(config.tile.out_dir) == os.path.abspath(d.path)
    _refuse(not storage.exists(d.path), f'data.path does not exist: {d.path}' + (
        '; it is the tiling output of tile.slides: tile first (python launch.py --mode tile '
        '--config ...)' if tiled else ''))


def _onednn_refusal(config, num_devices):
    """Why an explicit model.conv_impl=onednn cannot run here, or a bad thread count where
    oneDNN may run (at start, not at the first step's compile), or None. The check asks
    for JAX's backend, which starts it: the processes of a distributed run must join
    first, so theirs waits for the loop's validation after joining (train/loop.py)."""
    m = config.model
    if m.conv_impl == 'onednn' or (m.conv_impl == 'auto' and m.dtype == 'bfloat16'):
        problem = onednn.threads_env_problem()   # read wherever oneDNN may run
        if problem:
            return problem
    if m.conv_impl != 'onednn':
        return None
    joining = config.train.distributed or os.environ.get('CLUSIAM_DISTRIBUTED') == '1'
    if joining and not jax.distributed.is_initialized():
        return None
    return onednn.unavailable_reason(config.model.dtype, num_devices)


def _check_mpps(d, exp):
    """The histology options' cross-key rules (docs/method.md)."""
    for key, values in (('data.mpps', d.mpps), ('export.mpps', exp.mpps),
                        ('data.mpp_weights', d.mpp_weights)):
        _refuse(any(not isinstance(v, (int, float)) or not v > 0 for v in values),
                f'{key} must hold positive numbers; got {tuple(values)!r}')
    for key, values in (('data.mpps', d.mpps), ('export.mpps', exp.mpps)):
        _refuse(len(set(values)) != len(values), f'{key} repeats a resolution: {tuple(values)!r}')
    _refuse(d.mpp_weights and len(d.mpp_weights) != len(d.mpps),
            f'data.mpp_weights has {len(d.mpp_weights)} weights for the {len(d.mpps)} '
            f'resolutions of data.mpps {tuple(d.mpps)!r}: give one weight per resolution')
    _refuse(d.cross_scale and len(d.mpps) < 2,
            'data.cross_scale draws the two views at different µm/px: give data.mpps at least '
            f'two resolutions; got {tuple(d.mpps)!r}')
    _refuse(d.patches_per_slide and d.sampling != 'tissue_random',
            'data.patches_per_slide is the number of fresh positions per slide: set '
            'data.sampling=tissue_random too')
    _refuse(d.stain_reference and not d.stain_norm, 'data.stain_reference is the target of '
            'data.stain_norm: set data.stain_norm=macenko or reinhard too')


def best_mode(train) -> str:
    lower = train.best_metric.removeprefix('monitor/') in LOWER_IS_BETTER
    return train.best_mode or ('min' if lower else 'max')


def parse_checkpoint_choice(text) -> object:
    """'latest' | 'best' | a step (int), from export.checkpoint / --checkpoint."""
    text = str(text).strip()
    _refuse(text not in ('latest', 'best') and not text.isdigit(),
            f"a checkpoint is 'latest', 'best' or a step number; got {text!r}")
    return int(text) if text.isdigit() else text


def validate_tile(t):
    _refuse(not t.slides, 'tile.slides is not set: --config.tile.slides=DIR (a folder of slides) '
            'or a CSV with a "path" column')
    _refuse(not t.out_dir, 'tile.out_dir is not set: --config.tile.out_dir=DIR')
    check_rules(t, 'tile')
    _refuse(not 0 <= t.overlap < t.patch_size,
            f'tile.overlap must be in [0, tile.patch_size); got {t.overlap}')
    _refuse(t.host_index >= t.host_count, f'tile.host_index must be below tile.host_count '
            f'({t.host_count}); got {t.host_index}')
    _refuse(t.align and t.overlap, f'tile.align steps by whole scanner tiles, so tile.overlap '
            f'({t.overlap}) cannot apply: set one of them')
    _refuse(t.mpp, f'tile.mpp is split in two: --config.tile.mpp_default={t.mpp:g} sets the '
            f'µm/px of the slides whose metadata has none; --config.tile.mpp_override='
            f'{t.mpp:g} forces it on every slide, over their metadata')
    _refuse(t.mpp_default and t.mpp_override,
            'set one of tile.mpp_default (slides without µm/px) and tile.mpp_override (every '
            'slide): the override leaves the default nothing to fill in')
