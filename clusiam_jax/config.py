"""The config schema: defaults for every key, the methods' recipes, and every check run
before anything compiles.

Recipes in configs/ start from `method_config(name)` (the paper's settings of a method,
docs/method.md) and override a few fields. Every key a run may use is defined here, so a
typo or a wrong type is caught by `validate` with a one-line error instead of being
silently ignored, and `validate` is the one place that checks values: the builders
downstream trust a validated config.
"""
import os

import ml_collections

from clusiam_jax.errors import ConfigError
from clusiam_jax.models import BACKBONES, METHOD_SPECS
from clusiam_jax.models.conv import CONV_IMPLS

EXPORT_FORMATS = ('h5', 'npz')
SAMPLINGS = ('uniform', 'slide_balanced')


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.name = 'clusiam'          # clusiam | clubyol | simsiam | byol
    c.model.backbone = 'resnet18'     # resnet18 | resnet50 (| resnet_tiny: tests only)
    c.model.feat_size = 2048          # D: projector output size
    c.model.pred_hidden = 512         # predictor hidden width (4096 for BYOL-type)
    c.model.num_clusters = 100        # K
    c.model.dtype = 'float32'         # compute dtype: float32 | bfloat16 (params stay float32)
    c.model.conv_impl = 'auto'        # auto | xla | im2col: how convolutions run (same maths;
                                      # auto = im2col gradients on CPU, XLA's on GPU/TPU)

    c.loss = ml_collections.ConfigDict()
    c.loss.alpha = 0.5                # L = (1 - alpha) * L_inv + alpha * S

    c.data = ml_collections.ConfigDict()
    c.data.path = ''                  # patch folder, manifest CSV or built TFDS dataset dir
    c.data.image_size = 224
    c.data.num_workers = 0            # grain worker processes (0: in the main process)
    c.data.prefetch = 2               # batches prefetched to the devices
    # None: computed over the training list (and recorded in the run's normalization.json)
    c.data.mean = ml_collections.FieldReference(None, field_type=tuple)
    c.data.std = ml_collections.FieldReference(None, field_type=tuple)
    c.data.vflip = False              # histology option: vertical flips
    c.data.rot90 = False              # histology option: random 90-degree rotations
    c.data.augment_on_device = False  # CPU workers only decode + crop (uint8); jitter, gray,
                                      # blur and hflip run in the jitted step (device_augment)
    c.data.slide_dir = ''             # slides of a CLAM/TRIDENT patches/ folder (data.path);
                                      # a tiling's own slides.csv says where its slides are
    c.data.sampling = 'uniform'       # uniform over patches (the original) | slide_balanced:
                                      # every slide drawn equally often per epoch
    c.data.min_tissue = 0.0           # patch files: a patch with less tissue than this
                                      # fraction is skipped (listed) like an unreadable one
    c.data.stats_sample = 4096        # slide sources: normalization over this many patches
    c.data.open_slides = 512          # slide handles kept open per worker (LRU; a few kB and
                                      # one file descriptor each; reopening costs more than
                                      # reading a patch)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 512          # global batch (pairs per step)
    c.train.num_epochs = 50
    c.train.seed = 0
    c.train.log_every_steps = 10
    c.train.checkpoint_every_epochs = 10
    c.train.keep_checkpoints = 3
    c.train.distributed = False       # multi-process: jax.distributed.initialize() first
    c.train.resume_from = ''          # a new workdir starts from another run (or RUN/checkpoints/N)
    c.train.init_from = ''            # a fresh run starts from these weights (torchvision/timm
                                      # .pth/.safetensors, original .pth.tar, a run of ours);
                                      # optimizer, step and schedules start fresh
    c.train.on_nonfinite = 'stop'     # stop: a NaN/Inf metric ends the run | skip: a step with
                                      # NaN/Inf loss or gradient leaves the state unchanged
    c.train.max_consecutive_skips = 10  # skip: stop after this many skipped steps in a row

    c.train.best_metric = ''          # e.g. monitor/rankme: keep the best checkpoint by it
                                      # beside the latest ones ('' none; needs the monitor)
    c.train.best_mode = ''            # max | min: which direction of best_metric is better
                                      # ('' : the metric's own: min for alignment, uniformity)
    c.train.stop_on_collapse = False  # end the run (with a checkpoint) when the monitor
                                      # flags collapse

    # Representation monitoring without labels (docs/method.md §6); off by default.
    c.monitor = ml_collections.ConfigDict()
    c.monitor.every_epochs = 0        # embed the monitor set every N epochs (and at the end)
    c.monitor.data_path = ''          # the monitor set: any source data.path takes, or ...
    c.monitor.holdout = 0.0           # ... this fraction of the training slides, held out
    c.monitor.num_patches = 1024      # patches embedded (each + two augmented views)
    c.monitor.min_rankme = 2.0        # RankMe below this flags collapse

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 0.05            # lr = base_lr * batch_size / 256
    c.optim.weight_decay = 1e-4       # coupled (PyTorch SGD) weight decay
    c.optim.momentum = 0.9
    c.optim.fix_pred_lr = False       # predictor keeps the initial lr
    c.optim.name = 'sgd'              # sgd (original) | lars (pod-scale batches, as BYOL)
    c.optim.warmup_epochs = 0         # linear warmup per step before the per-epoch cosine

    c.ema = ml_collections.ConfigDict()
    c.ema.momentum = 0.99             # target = m * target + (1 - m) * online
    c.ema.schedule = 'constant'       # constant | cosine (BYOL: m -> 1 over training)

    # Embedding export (python launch.py --mode export) and what runs after training.
    c.export = ml_collections.ConfigDict()
    c.export.data_path = ''           # patches to embed; '' means data.path
    c.export.out_dir = ''             # '' means <workdir>/export
    c.export.batch_size = 256
    c.export.after_training = False   # the demo exports (and draws cluster maps) when done
    c.export.format = 'h5'            # h5: <out>/h5_files/<slide>.h5 (CLAM) | npz: one .npz
    c.export.with_projection = False  # also store the projector output z ('projections')
    c.export.num_workers = 4          # image-decoding threads
    c.export.cluster_maps = False     # draw <out>/cluster_maps/<slide>.png after the export
    c.export.thumbnail = ''           # slide thumbnail: an image file (one slide) or a folder of
                                      # <slide_id>[_thumb].{png,jpg}; '' paints over a mosaic
    c.export.thumbnail_downsample = 0.0  # level-0 pixels per thumbnail pixel (needed with one)
    c.export.image_size = 0           # patches are resized to this; 0: the run's data.image_size
    c.export.checkpoint = 'latest'    # latest | best (train.best_metric) | a step number
    c.export.slide_dir = ''           # slides of a CLAM/TRIDENT export.data_path; '' data.slide_dir
    c.export.pt_files = False         # also pt_files/<slide>.pt (CLAM's MIL loader; needs torch)
    c.export.map_alpha = 0.5          # cluster maps: colour opacity over the thumbnail
    c.export.annotations = ''         # cluster maps: folder of <slide_id>.geojson/.xml contours
    c.export.qupath = False           # also qupath/<slide>.geojson: clusters as QuPath tiles
    c.export.atlas = False            # also atlas/index.html: each cluster's typical patches

    # Tiling whole slides (python launch.py --mode tile), docs/method.md §9.
    c.tile = ml_collections.ConfigDict()
    c.tile.slides = ''                # slide folder (recursive) | CSV path[,slide_id,mpp,label]
                                      # | one slide file
    c.tile.out_dir = ''               # patches/, masks/, slides.csv
    c.tile.target_mpp = 0.5           # µm per pixel of the patches (0.5 ~ 20x)
    c.tile.patch_size = 224           # patch side in pixels at target_mpp
    c.tile.overlap = 0                # pixels (at target_mpp) shared by neighbouring patches
    c.tile.align = False              # True: patches laid on the scanner's tiles (fewer decodes)
    c.tile.min_tissue = 0.5           # fraction of a patch that must be tissue
    c.tile.mpp_default = 0.0          # level-0 µm/px of slides whose metadata has none; 0: none
    c.tile.mpp_override = 0.0         # force every slide's level-0 µm/px, over its metadata (each
                                      # slide it contradicts is logged); 0: the slide's own
    c.tile.mpp = 0.0                  # renamed: refused when set (mpp_default / mpp_override)
    c.tile.masks = ''                 # folder of <slide_id>.geojson/.xml tissue polygons
    c.tile.num_workers = 2            # slides tiled in parallel (processes)
    c.tile.tissue_mpp = 8.0           # µm/px of the image tissue is detected on
    c.tile.median_blur = 7            # px (of that image)
    c.tile.saturation_threshold = 0   # 0: Otsu on the saturation
    c.tile.min_saturation = 15        # floor of the threshold (0-255)
    c.tile.black_value = 30           # darker pixels (ink, empty tiles) are not tissue
    c.tile.morph_kernel = 5           # px: closing then opening
    c.tile.max_hole_um2 = 50000.0     # holes up to this area are filled
    c.tile.min_area_um2 = 10000.0     # smaller tissue components are dropped
    return c


# The settings that make each method the paper's (docs/method.md, "Networks" and
# "Optimization"); everything else is default_config's.
_CLUSIAM = {'model.feat_size': 2048, 'model.pred_hidden': 512, 'loss.alpha': 0.5,
            'optim.fix_pred_lr': True}
# The original forces fix_pred_lr off for CluBYOL.
_CLUBYOL = {'model.feat_size': 256, 'model.pred_hidden': 4096, 'loss.alpha': 0.9,
            'optim.fix_pred_lr': False, 'ema.momentum': 0.99}
METHOD_RECIPES = {
    'clusiam': _CLUSIAM,
    'clubyol': _CLUBYOL,
    # The baselines of the paper's tables: the same networks without the cluster term.
    'simsiam': dict(_CLUSIAM, **{'loss.alpha': 0.0}),
    'byol': dict(_CLUBYOL, **{'loss.alpha': 0.0}),
}


def method_config(name: str) -> ml_collections.ConfigDict:
    """default_config() with the paper's settings for method `name`."""
    if name not in METHOD_RECIPES:
        raise ConfigError(f'model.name must be one of {", ".join(METHOD_RECIPES)}; '
                          f'got {name!r}')
    c = default_config()
    c.model.name = name
    for key, value in METHOD_RECIPES[name].items():
        section, field = key.split('.')
        c[section][field] = value
    return c


def flatten(config, prefix: str = '') -> dict:
    """{'train.batch_size': 512, ...} for a ConfigDict (or a plain nested dict)."""
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


def _check_schema(config, schema, prefix=''):
    """Unknown keys and wrong types, recursively, against the defaults."""
    for key in config.keys():
        name = f'{prefix}{key}'
        if key not in schema:
            raise ConfigError(f'unknown config key {name!r}; known keys here: '
                              f'{", ".join(sorted(schema.keys()))}')
        value, default = config[key], schema[key]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f'config key {name!r} must be a section, got {value!r}')
            _check_schema(value, default, name + '.')
            continue
        expected = schema.get_type(key) if hasattr(schema, 'get_type') else type(default)
        if value is None or expected is type(None):
            continue
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if expected is tuple and isinstance(value, list):
            continue
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f'config key {name!r} must be {expected.__name__}, '
                              f'got {type(value).__name__} {value!r}')


def validate_model(m):
    """The `model` section: what a network is built from (also checked when a run's
    config.json is read back for inference)."""
    if m.name not in METHOD_SPECS:
        raise ConfigError(f'model.name must be one of {", ".join(METHOD_SPECS)}; got {m.name!r}')
    if m.backbone not in BACKBONES:
        raise ConfigError(f'model.backbone must be one of {", ".join(BACKBONES)}; '
                          f'got {m.backbone!r}')
    if m.dtype not in ('float32', 'bfloat16'):
        raise ConfigError(f"model.dtype must be 'float32' or 'bfloat16'; got {m.dtype!r}")
    if m.conv_impl not in CONV_IMPLS:
        raise ConfigError(f'model.conv_impl must be one of {", ".join(CONV_IMPLS)}; '
                          f'got {m.conv_impl!r}')
    for key in ('feat_size', 'pred_hidden', 'num_clusters'):
        if m[key] < 1:
            raise ConfigError(f'model.{key} must be positive; got {m[key]}')


def validate(config, num_devices: int = 1, check_data_path: bool = True):
    """Raise ConfigError (one line) for anything that would fail later or compute nonsense.

    check_data_path=False for callers that bring their own data (tests, benchmarks).
    """
    _check_schema(config, default_config())
    validate_model(config.model)
    m = config.model
    if not 0.0 <= config.loss.alpha <= 1.0:
        raise ConfigError(f'loss.alpha must be in [0, 1]; got {config.loss.alpha}')
    if not METHOD_SPECS[m.name].has_cluster_head and config.loss.alpha != 0.0:
        raise ConfigError(f'{m.name} has no cluster term: loss.alpha must be 0; '
                          f'got {config.loss.alpha}')
    t = config.train
    if t.batch_size < 1 or t.num_epochs < 1:
        raise ConfigError('train.batch_size and train.num_epochs must be positive; got '
                          f'{t.batch_size} and {t.num_epochs}')
    if t.batch_size % num_devices:
        raise ConfigError(f'train.batch_size={t.batch_size} is not divisible by the '
                          f'{num_devices} devices')
    if t.on_nonfinite not in ('stop', 'skip'):
        raise ConfigError(f"train.on_nonfinite must be 'stop' or 'skip'; "
                          f'got {t.on_nonfinite!r}')
    if t.max_consecutive_skips < 1:
        raise ConfigError(f'train.max_consecutive_skips must be positive; '
                          f'got {t.max_consecutive_skips}')
    if config.optim.name not in ('sgd', 'lars'):
        raise ConfigError(f"optim.name must be 'sgd' or 'lars'; got {config.optim.name!r}")
    if not 0 <= config.optim.warmup_epochs < t.num_epochs:
        raise ConfigError(f'optim.warmup_epochs must be in [0, train.num_epochs); '
                          f'got {config.optim.warmup_epochs}')
    if config.ema.schedule not in ('constant', 'cosine'):
        raise ConfigError(f"ema.schedule must be 'constant' or 'cosine'; "
                          f'got {config.ema.schedule!r}')
    for key in ('mean', 'std'):
        value = config.data[key]
        if value is not None and len(value) != 3:
            raise ConfigError(f'data.{key} must have 3 values (R, G, B); got {value!r}')
    if (config.data.mean is None) != (config.data.std is None):
        raise ConfigError('set both data.mean and data.std, or neither (computed)')
    if config.data.std is not None and min(config.data.std) <= 0:
        raise ConfigError(f'data.std must be positive; got {config.data.std!r}')
    # keep_checkpoints=0 would train and keep nothing to resume from or export.
    for name, value, least in (('data.image_size', config.data.image_size, 1),
                               ('data.num_workers', config.data.num_workers, 0),
                               ('train.keep_checkpoints', t.keep_checkpoints, 1),
                               ('train.checkpoint_every_epochs', t.checkpoint_every_epochs, 0)):
        if value < least:
            raise ConfigError(f'{name} must be at least {least}; got {value}')
    _validate_monitor(config)
    d = config.data
    if d.sampling not in SAMPLINGS:
        raise ConfigError(f"data.sampling must be one of {', '.join(SAMPLINGS)}; "
                          f'got {d.sampling!r}')
    if not 0.0 <= d.min_tissue <= 1.0:
        raise ConfigError(f'data.min_tissue must be in [0, 1]; got {d.min_tissue}')
    for name, value in (('data.stats_sample', d.stats_sample),
                        ('data.open_slides', d.open_slides)):
        if value < 1:
            raise ConfigError(f'{name} must be at least 1; got {value}')
    if d.slide_dir and not os.path.isdir(d.slide_dir):
        raise ConfigError(f'data.slide_dir is not a folder: {d.slide_dir}')
    if t.resume_from and not os.path.exists(t.resume_from):
        raise ConfigError(f'train.resume_from does not exist: {t.resume_from}')
    if t.init_from and not os.path.exists(t.init_from):
        raise ConfigError(f'train.init_from does not exist: {t.init_from}')
    if t.init_from and t.resume_from:
        raise ConfigError('set train.init_from or train.resume_from, not both: resume_from '
                          'continues a run (optimizer, step, schedules), init_from starts a new '
                          'one from weights')
    _validate_export(config.export)
    if check_data_path:
        if not config.data.path:
            raise ConfigError('data.path is not set: pass --config.data.path=DIR '
                              '(a patch folder, a manifest CSV or a built dataset)')
        if not os.path.exists(config.data.path):
            hint = ''
            if config.tile.slides and os.path.abspath(config.tile.out_dir or '') == \
                    os.path.abspath(config.data.path):
                hint = ('; it is the tiling output of tile.slides: tile first (python '
                        'launch.py --mode tile --config ...)')
            raise ConfigError(f'data.path does not exist: {config.data.path}{hint}')


MONITOR_METRICS = ('rankme', 'alignment', 'uniformity', 'active_clusters',
                   'active_clusters_gumbel', 'gumbel_agreement', 'cluster_entropy',
                   'knn_top1', 'knn_balanced')


def _validate_monitor(config):
    mon, t = config.monitor, config.train
    if mon.every_epochs < 0:
        raise ConfigError(f'monitor.every_epochs must not be negative; got {mon.every_epochs}')
    if not 0.0 <= mon.holdout < 1.0:
        raise ConfigError(f'monitor.holdout must be in [0, 1); got {mon.holdout}')
    if mon.num_patches < 8:
        raise ConfigError(f'monitor.num_patches must be at least 8; got {mon.num_patches}')
    if mon.every_epochs and not mon.data_path and not mon.holdout:
        raise ConfigError('monitor.every_epochs needs a monitor set: monitor.data_path=DIR or '
                          'monitor.holdout=0.05 (a fraction of the training slides)')
    if mon.data_path and mon.holdout:
        raise ConfigError('set monitor.data_path or monitor.holdout, not both')
    if mon.data_path and not os.path.exists(mon.data_path):
        raise ConfigError(f'monitor.data_path does not exist: {mon.data_path}')
    if t.best_mode not in ('', 'max', 'min'):
        raise ConfigError(f"train.best_mode must be 'max', 'min' or '' (the metric's own "
                          f"direction); got {t.best_mode!r}")
    if mon.holdout and not mon.every_epochs:
        raise ConfigError('monitor.holdout holds slides out of training for the monitor: set '
                          'monitor.every_epochs too (or drop monitor.holdout)')
    if mon.num_patches > 8192:
        raise ConfigError(f'monitor.num_patches must be at most 8192 (the scores compare '
                          f'every pair); got {mon.num_patches}')
    if t.best_metric:
        name = t.best_metric.removeprefix('monitor/')
        if not t.best_metric.startswith('monitor/') or name not in MONITOR_METRICS:
            raise ConfigError(f'train.best_metric must be one of '
                              f'{", ".join("monitor/" + m for m in MONITOR_METRICS)}; got '
                              f'{t.best_metric!r}')
        if name in CLUSTER_METRICS and not METHOD_SPECS[config.model.name].has_cluster_head:
            raise ConfigError(f'train.best_metric={t.best_metric}: {config.model.name} has no '
                              f'cluster head')
    if (config.export.after_training and str(config.export.checkpoint) == 'best'
            and not t.best_metric):
        raise ConfigError('export.checkpoint=best after training needs train.best_metric')
    if (t.best_metric or t.stop_on_collapse) and not mon.every_epochs:
        raise ConfigError('train.best_metric and train.stop_on_collapse need the monitor: set '
                          'monitor.every_epochs (and monitor.data_path or monitor.holdout)')


CLUSTER_METRICS = ('active_clusters', 'active_clusters_gumbel', 'gumbel_agreement',
                   'cluster_entropy')
LOWER_IS_BETTER = ('alignment', 'uniformity')


def best_mode(train) -> str:
    """train.best_mode, or the metric's own direction when it is ''."""
    if train.best_mode:
        return train.best_mode
    return 'min' if train.best_metric.removeprefix('monitor/') in LOWER_IS_BETTER else 'max'


def parse_checkpoint_choice(text) -> object:
    """'latest' | 'best' | a step (int), from export.checkpoint / --checkpoint."""
    text = str(text).strip()
    if text in ('latest', 'best'):
        return text
    if text.isdigit():
        return int(text)
    raise ConfigError(f"a checkpoint is 'latest', 'best' or a step number; got {text!r}")


def _validate_export(exp):
    if exp.format not in EXPORT_FORMATS:
        raise ConfigError(f"export.format must be one of {', '.join(EXPORT_FORMATS)}; "
                          f'got {exp.format!r}')
    for name, value, least in (('export.batch_size', exp.batch_size, 1),
                               ('export.num_workers', exp.num_workers, 1),
                               ('export.image_size', exp.image_size, 0)):
        if value < least:
            raise ConfigError(f'{name} must be at least {least}; got {value}')
    if exp.out_dir and os.path.isfile(exp.out_dir):
        raise ConfigError(f'export.out_dir {exp.out_dir} is a file, not a folder')
    if exp.data_path and not os.path.exists(exp.data_path):
        raise ConfigError(f'export.data_path does not exist: {exp.data_path}')
    if exp.thumbnail_downsample < 0:
        raise ConfigError(f'export.thumbnail_downsample must be positive; '
                          f'got {exp.thumbnail_downsample}')
    parse_checkpoint_choice(exp.checkpoint)
    if not 0.0 < exp.map_alpha <= 1.0:
        raise ConfigError(f'export.map_alpha must be in (0, 1]; got {exp.map_alpha}')
    if exp.slide_dir and not os.path.isdir(exp.slide_dir):
        raise ConfigError(f'export.slide_dir is not a folder: {exp.slide_dir}')
    if exp.annotations:
        if not exp.cluster_maps:
            raise ConfigError('export.annotations is used only with export.cluster_maps=True')
        if not os.path.isdir(exp.annotations):
            raise ConfigError(f'export.annotations is not a folder: {exp.annotations}')
    if exp.thumbnail:
        if not exp.cluster_maps:
            raise ConfigError('export.thumbnail is used only with export.cluster_maps=True')
        if not os.path.exists(exp.thumbnail):
            raise ConfigError(f'export.thumbnail does not exist: {exp.thumbnail}')
        if not exp.thumbnail_downsample:
            raise ConfigError('export.thumbnail needs export.thumbnail_downsample (level-0 '
                              'pixels per thumbnail pixel, e.g. 8)')


def validate_tile(t):
    """The `tile` section (--mode tile)."""
    if not t.slides:
        raise ConfigError('tile.slides is not set: --config.tile.slides=DIR (a folder of '
                          'slides) or a CSV with a "path" column')
    if not os.path.exists(t.slides):
        raise ConfigError(f'tile.slides does not exist: {t.slides}')
    if not t.out_dir:
        raise ConfigError('tile.out_dir is not set: --config.tile.out_dir=DIR')
    if t.target_mpp <= 0:
        raise ConfigError(f'tile.target_mpp must be positive; got {t.target_mpp}')
    if t.patch_size < 8:
        raise ConfigError(f'tile.patch_size must be at least 8; got {t.patch_size}')
    if not 0 <= t.overlap < t.patch_size:
        raise ConfigError(f'tile.overlap must be in [0, tile.patch_size); got {t.overlap}')
    if t.align and t.overlap:
        raise ConfigError(f'tile.align steps by whole scanner tiles, so tile.overlap '
                          f'({t.overlap}) cannot apply: set one of them')
    if not 0.0 <= t.min_tissue <= 1.0:
        raise ConfigError(f'tile.min_tissue must be in [0, 1]; got {t.min_tissue}')
    if t.get('mpp'):
        raise ConfigError(f'tile.mpp is split in two: --config.tile.mpp_default={t.mpp:g} '
                          f'sets the µm/px of the slides whose metadata has none; '
                          f'--config.tile.mpp_override={t.mpp:g} forces it on every slide, '
                          f'over their metadata')
    for key in ('mpp_default', 'mpp_override'):
        if t[key] < 0:
            raise ConfigError(f'tile.{key} must be positive (or 0: none); got {t[key]}')
    if t.mpp_default and t.mpp_override:
        raise ConfigError('set one of tile.mpp_default (slides without µm/px) and '
                          'tile.mpp_override (every slide): the override leaves the default '
                          'nothing to fill in')
    if t.masks and not os.path.isdir(t.masks):
        raise ConfigError(f'tile.masks is not a folder: {t.masks}')
    for key in ('num_workers', 'median_blur', 'saturation_threshold', 'min_saturation',
                'black_value', 'morph_kernel'):
        if t[key] < 0:
            raise ConfigError(f'tile.{key} must not be negative; got {t[key]}')
    for key in ('tissue_mpp', 'max_hole_um2', 'min_area_um2'):
        if t[key] < 0 or (key == 'tissue_mpp' and t[key] == 0):
            raise ConfigError(f'tile.{key} must be positive; got {t[key]}')
