"""A patch source packed into TFDS ArrayRecord shards (example i: row i of records.csv), and read
back. RGB 8-bit PNG/JPEG are stored as is, the rest as lossless PNG: the pixels stay the file's.
A tiling's patches are read from its slides once and stored as lossless PNG with their slide id
and level-0 coordinates (the `path` names the slide and the coordinates)."""
import contextlib
import io
import os
import tempfile
from typing import Callable, List, Optional

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from PIL import Image

from clusiam_jax import fileio, storage
from clusiam_jax.data import image_io, skips, slide_source
from clusiam_jax.data import records as records_lib
from clusiam_jax.errors import ConfigError, DataError


def _stored_bytes(path: str) -> bytes:
    with open(path, 'rb') as f:
        data = f.read()
    rgb = image_io.decode_rgb(data)  # validates; raises BadImageError
    if data.startswith((b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n')):
        # Kept only when 3-channel 8-bit, which decodes to the same pixels.
        with contextlib.suppress(Exception), Image.open(io.BytesIO(data)) as im:
            if im.mode == 'RGB':
                return data
    return _png(rgb)


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, 'RGB').save(buf, format='PNG', compress_level=1)
    return buf.getvalue()


class ClusiamPatches(tfds.core.GeneratorBasedBuilder):
    name = 'clusiam_patches'  # a stable name whatever the class is called
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'First version.'}

    def __init__(self, *, records: List[records_lib.PatchRecord],
                 encode: Optional[Callable[[int, records_lib.PatchRecord], bytes]] = None,
                 **kwargs):
        self._source_records = records
        self._encode = encode or (lambda index, rec: _stored_bytes(rec.path))
        self.skipped: List[str] = []
        self.written: List[records_lib.PatchRecord] = []
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3)),
                **{k: tfds.features.Text() for k in ('path', 'slide_id', 'label')},
                'x': np.int64, 'y': np.int64}),
            disable_shuffling=True,  # example i == manifest row i
            description='Histopathology patches packed for clusiam_jax.')

    def _split_generators(self, dl_manager):
        return {'train': self._generate_examples()}

    def _generate_examples(self):
        for index, rec in enumerate(tqdm.tqdm(self._source_records, desc='packing patches',
                                              unit='patch', mininterval=1.0)):
            try:
                data = self._encode(index, rec)
            except (image_io.BadImageError, OSError) as e:
                self.skipped.append(f'{rec.path}\t{e}')
                continue
            self.written.append(rec)
            yield index, {'image': data, 'path': rec.path, 'slide_id': rec.slide_id or '',
                          'label': rec.label or '', 'x': -1 if rec.x is None else rec.x,
                          'y': -1 if rec.y is None else rec.y}


# Uploaded last: a reader takes the folder for a dataset only once dataset_info.json is there.
_METADATA_LAST = ('features.json', records_lib.DATASET_MANIFEST, skips.SKIPPED_FILES,
                  'dataset_info.json')


def build_dataset(source: str, out_dir: str, slide_dir: str = '') -> str:
    """The dataset folder `out_dir/clusiam_patches/1.0.0` (data.path takes it or `out_dir`).
    `source`: a patch folder, a manifest, or a tiling (`slide_dir`: as data.slide_dir).
    A gs:// or s3:// `out_dir` is built in a local temporary folder (array_record writes
    local files only), then uploaded file by file, each whole, the metadata last."""
    recs, encode = _records_of(source, slide_dir)
    if not storage.is_url(out_dir):
        return _build(recs, encode, source, out_dir)
    target = storage.join(out_dir, ClusiamPatches.name, str(ClusiamPatches.VERSION))
    storage.makedirs(target)   # the bucket exists
    if storage.exists(storage.join(target, 'dataset_info.json')):
        raise DataError(f'a dataset is already built at {target}; '
                        f'remove it or choose another --out')
    with tempfile.TemporaryDirectory(prefix='clusiam-dataset-') as local:
        built = _build(recs, encode, source, local)
        if storage.find_files(target):   # an earlier build's half upload: none of it is kept
            storage.remove(target, recursive=True)
        names = sorted(os.listdir(built))
        for name in [n for n in names if n not in _METADATA_LAST] + list(_METADATA_LAST):
            storage.upload(os.path.join(built, name), storage.join(target, name))
    return target


def _records_of(source: str, slide_dir: str):
    """(records, encode) of a tiling (patches read from its slides) or of patch files."""
    if slide_source.is_slide_source(source):
        patches = slide_source.open_slide_source(source, slide_dir)
        return ([patches.record(i) for i in range(len(patches))],
                lambda index, rec: _png(patches.load(index)))
    if slide_dir:
        raise DataError(f'data.slide_dir is set but {source} is not a tiling or CLAM/TRIDENT '
                        f'patch folder (no patches/*.h5): drop data.slide_dir')
    recs = records_lib.discover(source)
    if records_lib.find_tfds_dataset(source) is not None:
        raise DataError(f'{source} is already a built dataset')
    return recs, None


def _build(recs, encode, source: str, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    builder = ClusiamPatches(records=recs, encode=encode, data_dir=out_dir,
                             file_format='array_record')
    if os.path.exists(os.path.join(builder.data_dir, 'dataset_info.json')):
        raise DataError(f'a dataset is already built at {builder.data_dir}; '
                        f'remove it or choose another --out')
    builder.download_and_prepare()
    if not builder.written:
        raise DataError(f'no readable image in {source}')
    records_lib.write_patch_manifest(
        builder.written, os.path.join(builder.data_dir, records_lib.DATASET_MANIFEST))
    fileio.write_text(os.path.join(builder.data_dir, skips.SKIPPED_FILES),
                      ''.join(line + '\n' for line in builder.skipped))
    return builder.data_dir


def open_data_source(dataset_dir: str):
    """The examples of a built dataset on local disk or at a gs:// URL (array_record reads
    GCS itself; an s3:// dataset is read from its local copy: sources.stage_dataset)."""
    if dataset_dir.startswith('s3://'):
        raise DataError(f'{dataset_dir}: array_record cannot read s3:// (stage it locally)')
    builder = tfds.builder_from_directory(dataset_dir)
    if storage.is_url(dataset_dir):
        _check_readable(builder.info.splits['train'].filepaths)
    return builder.as_data_source('train', decoders={'image': tfds.decode.SkipDecoding()})


def _check_readable(shards) -> None:
    """array_record never raises on a shard it cannot open: it reads as empty (ok() False)."""
    if os.environ.get('STORAGE_EMULATOR_HOST') and not os.environ.get(
            'CLOUD_STORAGE_EMULATOR_ENDPOINT'):
        raise ConfigError('STORAGE_EMULATOR_HOST is set but CLOUD_STORAGE_EMULATOR_ENDPOINT is '
                          'not: array_record (google-cloud-cpp) reads only the latter; set it '
                          'to the same endpoint')
    from array_record.python import array_record_module
    for shard in shards:
        reader = array_record_module.ArrayRecordReader(str(shard))
        if not reader.ok():   # (closing a failed reader raises its error again)
            raise DataError(f'cannot read {shard}: array_record cannot open it (a missing '
                            f'object or no access; GCS credentials come from '
                            f'GOOGLE_APPLICATION_CREDENTIALS)')
        reader.close()
