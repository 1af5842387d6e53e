"""Faults of the slide path (issue 22, items 2, 5, 10, 12): hostile slide ids, ids that
differ only in punctuation, two tiling jobs into one folder, a full disk while tiling,
damaged coordinate files, and slides whose header claims a huge size.

Synthetic slides are small tiled pyramidal TIFFs (tests/helpers.write_pyramid); the
"huge" ones are a few hundred kB whose every tile entry points at one stored tile, so
their header claims 65535 or 200000 px a side while the file stays small.
"""
import csv
import errno
import hashlib
import logging
import os
import shutil
import struct
import types
import zlib

import h5py
import jax
import numpy as np
import openslide
import pytest
from PIL import Image

from clusiam_jax import parallel
from clusiam_jax.data import image_io
from clusiam_jax.data import sources as sources_lib
from clusiam_jax.errors import DataError
from clusiam_jax.export import embed
from clusiam_jax.export import format as fmt
from clusiam_jax.slides import coords as coords_lib
from clusiam_jax.slides import reader, slides_csv, tiling
from tests.helpers import write_pyramid
from tests.test_slides import synthetic_base, tile_params

HOSTILE_IDS = ['../../../victim', '..', '.', '.hidden', 'a/b', 'a\\b', 'nul\0byte', '',
               'line\nbreak']


@pytest.fixture(scope='module')
def slide(tmp_path_factory):
    """One small synthetic slide at 0.5 µm/px with tissue."""
    root = tmp_path_factory.mktemp('fault_slides')
    return write_pyramid(str(root / 'field.tif'), synthetic_base(0.5), 0.5)


def _tree(root):
    """{path: sha1 of the content} of every file under root."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, 'rb') as f:
                out[path] = hashlib.sha1(f.read()).hexdigest()
    return out


def _slide_csv(path, rows):
    with open(path, 'w', newline='', encoding='utf-8') as f:
        writer = csv.writer(f)
        writer.writerow(['path', 'slide_id'])
        writer.writerows(rows)
    return str(path)


# ------------------------------------------------------------ 2: hostile slide ids

def test_hostile_slide_ids_write_nothing_outside_out_dir(slide, tmp_path):
    out = tmp_path / 'a' / 'b' / 'out'
    out.mkdir(parents=True)
    # What the ids would reach: a coordinate file and a QC picture above out_dir.
    (tmp_path / 'a' / 'victim_patches.h5').write_bytes(b'precious')
    (tmp_path / 'a' / 'victim.png').write_bytes(b'precious too')
    absolute = str(tmp_path / 'elsewhere' / 'abs')
    (tmp_path / 'elsewhere').mkdir()
    listing = _slide_csv(tmp_path / 'list.csv', [[slide, '../../../victim'],
                                                  [slide, absolute], [slide, 'normal one'],
                                                  [slide, '..'], [slide, 'x\\y']])
    before = {p: h for p, h in _tree(tmp_path).items() if not p.startswith(str(out))}
    rows = {r['slide_id']: r for r in tiling.tile_slides(tiling.list_slides(listing),
                                                         tile_params(), str(out))}
    after = {p: h for p, h in _tree(tmp_path).items() if not p.startswith(str(out))}
    assert after == before
    assert rows['normal one']['status'] == 'tiled'
    assert os.path.isfile(out / 'patches' / 'normal one_patches.h5')
    for bad in ('../../../victim', absolute, '..', 'x\\y'):
        assert rows[bad]['status'] == 'bad_id' and rows[bad]['reason'], bad
    on_disk = {r['slide_id']: r for r in slides_csv.read_rows(str(out))}
    assert set(on_disk) == set(rows) and on_disk[absolute]['status'] == 'bad_id'
    # Every file written is under out/patches or out/masks, named after the normal id.
    written = sorted(os.path.relpath(p, out) for p in _tree(out))
    assert written == ['masks/normal one.png', 'patches/normal one_patches.h5',
                       'slides.csv']
    # A rerun (the bad rows are redone, the normal one reused) changes nothing outside.
    tiling.tile_slides(tiling.list_slides(listing), tile_params(), str(out))
    assert {p: h for p, h in _tree(tmp_path).items() if not p.startswith(str(out))} == before


@pytest.mark.parametrize('slide_id', HOSTILE_IDS)
def test_export_names_refuse_ids_that_leave_their_folder(slide_id, tmp_path):
    for name_of in (lambda s: fmt.slide_file('h5', s), lambda s: fmt.pt_file(str(tmp_path), s),
                    lambda s: fmt.map_file(str(tmp_path), {'slide_id': s,
                                                           'file': fmt.NPZ_NAME}),
                    lambda s: coords_lib.trident_file(str(tmp_path), s)):
        with pytest.raises(DataError, match='slide id'):
            name_of(slide_id)


def test_ids_are_file_names_verbatim():
    for slide_id in ('x y', 'x_y', 'Ünïcode 名', 'a:b', 'TCGA-01.svs (2)'):
        assert fmt.slide_file('h5', slide_id) == os.path.join('h5_files', slide_id + '.h5')
        assert os.path.basename(coords_lib.trident_file('o', slide_id)) == \
            slide_id + '_patches.h5'


# ---------------------------------------------------- 5: collisions, jobs, full disk

class _MeanEmbedder(embed.Embedder):
    """Features = each image's mean colour: no network, no compile."""

    def embed_fn(self, with_projection):
        return lambda variables, images: {
            'features': images.reshape(len(images), -1, 3).mean(1).astype(np.float32)}


def test_ids_differing_in_punctuation_are_exported_to_their_own_files(tmp_path):
    rows = []
    colours = {'x y': (200, 30, 30), 'x_y': (30, 200, 30), 'x-y': (30, 30, 200),
               'CMU 1 région 😐': (90, 90, 90)}
    for k, (slide_id, colour) in enumerate(colours.items()):
        path = tmp_path / f'p{k}.png'
        Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(path)
        rows.append({'path': str(path), 'slide_id': slide_id})
    with open(tmp_path / 'patches.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['path', 'slide_id'])
        writer.writeheader()
        writer.writerows(rows)
    source = sources_lib.open_source(str(tmp_path / 'patches.csv'))
    embedder = _MeanEmbedder(types.SimpleNamespace(
        method='clusiam', backbone='none', dtype='float32', conv_impl='xla'), {},
                             (0.0,) * 3, (1.0,) * 3, 0,
                             parallel.make_mesh(jax.local_devices()[:1]))
    options = embed.EmbedOptions(image_size=8, batch_size=4, export_format='h5',
                                 with_projection=False, num_workers=1)
    out = str(tmp_path / 'export')
    embed.export_embeddings(embedder, source, out, options,
                            {'config': {}, 'data_path': str(tmp_path)})
    manifest = fmt.read_export_manifest(out)
    assert len({r['file'] for r in manifest}) == len(colours)
    assert len(os.listdir(os.path.join(out, fmt.H5_DIR))) == len(colours)
    # CLAM finds a slide's file as os.path.join(dir, 'h5_files', f'{slide_id}.h5') from
    # the slide_id column of its CSV: the ids of the manifest, verbatim.
    for row in manifest:
        assert os.path.isfile(os.path.join(out, 'h5_files', '{}.h5'.format(row['slide_id'])))
    exported = fmt.read_export(out)
    for slide_id, colour in colours.items():
        np.testing.assert_allclose(exported[slide_id]['features'], [colour])


def test_a_second_tiling_job_keeps_the_rows_the_first_wrote_meanwhile(slide, tmp_path,
                                                                      monkeypatch):
    out = str(tmp_path / 'out')
    first = _slide_csv(tmp_path / 'first.csv', [[slide, 'one'], [slide, 'two']])
    second = _slide_csv(tmp_path / 'second.csv', [[slide, 'three']])
    tile_slide = tiling.tile_slide
    interleaved = []

    def interleaving(entry, params, out_dir):
        # While job 1 tiles its first slide, job 2 runs start to end into the same folder.
        if not interleaved:
            interleaved.append(entry.slide_id)
            tiling.tile_slides(tiling.list_slides(second), params, out_dir)
        return tile_slide(entry, params, out_dir)

    monkeypatch.setattr(tiling, 'tile_slide', interleaving)
    tiling.tile_slides(tiling.list_slides(first), tile_params(), out)
    rows = {r['slide_id']: r['status'] for r in slides_csv.read_rows(out)}
    assert rows == {'one': 'tiled', 'two': 'tiled', 'three': 'tiled'}


def test_an_interrupted_retiling_keeps_the_rows_of_slides_it_did_not_reach(slide, tmp_path,
                                                                        monkeypatch):
    out = str(tmp_path / 'out')
    listing = _slide_csv(tmp_path / 'list.csv', [[slide, 'one'], [slide, 'two']])
    tiling.tile_slides(tiling.list_slides(listing), tile_params(), out)
    tile_slide = tiling.tile_slide

    def interrupted(entry, params, out_dir):
        if entry.slide_id == 'two':
            raise KeyboardInterrupt
        return tile_slide(entry, params, out_dir)

    monkeypatch.setattr(tiling, 'tile_slide', interrupted)
    with pytest.raises(KeyboardInterrupt):   # other settings: both are redone
        tiling.tile_slides(tiling.list_slides(listing), tile_params(min_tissue=0.6), out)
    rows = {r['slide_id']: r['status'] for r in slides_csv.read_rows(out)}
    # 'two' still has its earlier coordinate file: its row stays, so training keeps it.
    assert rows == {'one': 'tiled', 'two': 'tiled'}
    assert os.path.isfile(coords_lib.trident_file(out, 'two'))


@pytest.mark.parametrize('code', [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_stops_the_tiling_job_and_keeps_finished_slides(slide, tmp_path,
                                                                    monkeypatch, code):
    out = str(tmp_path / 'out')
    listing = _slide_csv(tmp_path / 'list.csv', [[slide, f's{i}'] for i in range(4)])
    write_trident = coords_lib.write_trident
    written = []

    def filling_up(path, coords, attrs, *rest):
        if len(written) == 2:
            raise OSError(code, os.strerror(code), path)
        write_trident(path, coords, attrs, *rest)
        written.append(path)

    monkeypatch.setattr(coords_lib, 'write_trident', filling_up)
    with pytest.raises(DataError, match='out of space writing .*finished slides are kept'):
        tiling.tile_slides(tiling.list_slides(listing), tile_params(), out)
    rows = slides_csv.read_rows(out)
    assert [(r['slide_id'], r['status']) for r in rows] == [('s0', 'tiled'), ('s1', 'tiled')]
    # The rerun, with space again, reuses the two and tiles the rest.
    monkeypatch.setattr(coords_lib, 'write_trident', write_trident)
    rows = tiling.tile_slides(tiling.list_slides(listing), tile_params(), out)
    assert [r['status'] for r in rows] == ['tiled'] * 4


def test_h5pys_own_full_disk_error_stops_the_job(slide, tmp_path, monkeypatch):
    """h5py reports a full disk as an OSError whose errno is unset, in its message."""
    def full(*args, **kwargs):
        raise OSError('Unable to synchronously create file (unable to open file: name = '
                      "'x', errno = 28, error message = 'No space left on device')")

    monkeypatch.setattr(h5py, 'File', full)
    listing = _slide_csv(tmp_path / 'list.csv', [[slide, 's0']])
    with pytest.raises(DataError, match='out of space'):
        tiling.tile_slides(tiling.list_slides(listing), tile_params(), str(tmp_path / 'o'))


# ------------------------------------------------------- 10: bad coordinate files

def _rewrite_coords(path, coords, **attrs):
    with h5py.File(path, 'a') as f:
        kept = dict(f['coords'].attrs)
        del f['coords']
        ds = f.create_dataset('coords', data=coords)
        ds.attrs.update(kept)
        ds.attrs.update(attrs)


def test_bad_coordinate_files_are_left_out_with_their_reason(slide, tmp_path, caplog):
    ids = ['good', 'three_columns', 'nan', 'fraction', 'outside', 'negative', 'off_grid',
           'text']
    listing = _slide_csv(tmp_path / 'list.csv', [[slide, s] for s in ids])
    out = str(tmp_path / 'out')
    tiling.tile_slides(tiling.list_slides(listing), tile_params(), out)
    good = coords_lib.read_coords(coords_lib.trident_file(out, 'good'))
    xy, step = good.coords, int(good.attrs['step_level0'])
    width = int(good.attrs['level0_width'])
    n = len(xy)
    bad = {'three_columns': np.concatenate([xy, xy[:, :1]], 1),
           'nan': np.where(np.arange(n)[:, None] == 1, np.nan, xy.astype(float)),
           'fraction': xy + 0.5,
           'outside': xy + [width, 0],
           'negative': xy - [xy[0, 0] + step, 0],
           'off_grid': np.concatenate([xy[:-1], xy[-1:] + 1]),
           'text': np.array([[b'a', b'b']])}
    for slide_id, coords in bad.items():
        _rewrite_coords(coords_lib.trident_file(out, slide_id), coords)
    with caplog.at_level(logging.WARNING, logger='clusiam_jax'):
        source = sources_lib.open_source(out)
    assert [s.slide_id for s in source.slides] == ['good']
    assert len(source) == n
    text = caplog.text
    for slide_id, words in (('three_columns', 'shape'), ('nan', 'finite'),
                            ('fraction', 'whole'), ('outside', 'outside'),
                            ('negative', 'outside'), ('off_grid', 'grid'), ('text', 'type')):
        line, = [ln for ln in text.splitlines() if f'{slide_id}_patches.h5' in ln]
        assert words in line, (slide_id, line)
    # Nothing left: one line with a reason.
    _rewrite_coords(coords_lib.trident_file(out, 'good'), bad['outside'])
    with pytest.raises(DataError, match='no slide has usable patch coordinates'):
        sources_lib.open_source(out)


def test_float_coordinates_that_are_whole_numbers_are_accepted(slide, tmp_path):
    out = str(tmp_path / 'out')
    tiling.tile_slides(tiling.list_slides(slide), tile_params(), out)
    path = coords_lib.trident_file(out, 'field')
    xy = coords_lib.read_coords(path).coords
    _rewrite_coords(path, xy.astype(np.float32))
    np.testing.assert_array_equal(coords_lib.read_coords(path).coords, xy)


def test_clam_coordinates_outside_the_slide_skip_that_slide_once(slide, tmp_path):
    """A CLAM file says nothing of the slide's size: its coordinates are checked when
    the slide is opened, and the slide is skipped as an unreadable one is."""
    folder = tmp_path / 'job' / 'patches'
    folder.mkdir(parents=True)
    slides = tmp_path / 'wsi'
    slides.mkdir()
    width, height = openslide.OpenSlide(slide).dimensions
    for name, coords in (('inside', [[0, 0], [64, 0]]),
                         ('beyond', [[0, 0], [width + 64, 0]])):
        shutil.copy(slide, slides / f'{name}.tif')
        with h5py.File(folder / f'{name}.h5', 'w') as f:
            ds = f.create_dataset('coords', data=np.array(coords, np.int64))
            ds.attrs.update({'patch_level': 0, 'patch_size': 64})
    source = sources_lib.open_source(str(tmp_path / 'job'), str(slides))
    records = list(map(source.record, range(len(source))))
    by_slide = {r.slide_id: i for i, r in enumerate(records)}
    assert source.load(by_slide['inside']).shape == (64, 64, 3)
    first = [i for i, r in enumerate(records) if r.slide_id == 'beyond'][0]
    for index in (first, first + 1):
        with pytest.raises(image_io.BadImageError, match='outside') as caught:
            source.load(index)
        assert caught.value.subject == str(slides / 'beyond.tif')   # listed once


# ----------------------------------------------------- 12: headers claiming huge sizes

def write_claimed_tiff(path, width, height, mpp=0.25, tile=512):
    """A tiled RGB TIFF whose header claims width x height px: every tile entry points at
    one stored deflate tile, so the file is small whatever it claims."""
    n = -(-width // tile) * -(-height // tile)
    data = zlib.compress(np.full((tile, tile, 3), 200, np.uint8).tobytes(), 9)
    codes = {3: 'H', 4: 'I', 5: 'II'}
    res = (int(round(1e4 / mpp)), 1)   # pixels per centimetre
    tags = [(256, 4, [width]), (257, 4, [height]), (258, 3, [8, 8, 8]), (259, 3, [8]),
            (262, 3, [2]), (277, 3, [3]), (282, 5, [res]), (283, 5, [res]), (284, 3, [1]),
            (296, 3, [3]), (322, 3, [tile]), (323, 3, [tile]), (324, 4, [8] * n),
            (325, 4, [len(data)] * n)]
    start = 8 + len(data) + len(data) % 2
    entries, blobs = [], bytearray()
    for tag, kind, values in tags:
        raw = b''.join(struct.pack('<' + codes[kind], *(v if isinstance(v, tuple) else (v,)))
                       for v in values)
        if len(raw) <= 4:
            entries.append(struct.pack('<HHI', tag, kind, len(values)) + raw.ljust(4, b'\0'))
        else:
            entries.append(struct.pack('<HHII', tag, kind, len(values), start + len(blobs)))
            blobs += raw + b'\0' * (len(raw) % 2)
    with open(path, 'wb') as f:
        f.write(b'II*\0' + struct.pack('<I', start + len(blobs)) + data
                + b'\0' * (len(data) % 2) + bytes(blobs))
        f.write(struct.pack('<H', len(entries)) + b''.join(entries) + b'\0\0\0\0')
    return str(path)


def test_a_slide_claiming_a_huge_size_is_a_too_large_row(slide, tmp_path, monkeypatch):
    folder = tmp_path / 'wsi'
    folder.mkdir()
    shutil.copy(slide, folder / 'normal.tif')
    write_claimed_tiff(folder / 'claims_65535.tif', 65535, 65535)
    write_claimed_tiff(folder / 'claims_200000.tif', 200000, 200000)
    with openslide.OpenSlide(str(folder / 'claims_200000.tif')) as claimed:
        assert claimed.dimensions == (200000, 200000) and claimed.level_count == 1
    # Reading such a level whole takes minutes: a read of more than a real thumbnail's
    # pixels fails the slide at once (as 'unreadable', which is not what is expected).
    read_region = openslide.OpenSlide.read_region
    pixels_read = {}

    def bounded(self, location, level, size):
        pixels_read[id(self)] = pixels_read.get(id(self), 0) + size[0] * size[1]
        if pixels_read[id(self)] > 64 * 1024 * 1024:
            raise RuntimeError(f'over {64 * 1024 * 1024} px read from one slide')
        return read_region(self, location, level, size)

    monkeypatch.setattr(openslide.OpenSlide, 'read_region', bounded)
    rows = {r['slide_id']: r for r in tiling.tile_slides(
        tiling.list_slides(str(folder)), tile_params(), str(tmp_path / 'out'))}
    assert rows['normal']['status'] == 'tiled'
    for name, side in (('claims_65535', 65535), ('claims_200000', 200000)):
        assert rows[name]['status'] == 'too_large', rows[name]
        assert f'{side} x {side}' in rows[name]['reason']


def test_the_size_cap_passes_a_large_real_slide_with_a_pyramid():
    """A 200k x 100k px 40x scan with levels at 1, 4, 16, 64 is normal; the same without
    a pyramid, or a header claiming 65535 px a side with one level, is not."""
    def fake(levels):
        return reader.Slide(types.SimpleNamespace(
            dimensions=levels[0][1], level_count=len(levels),
            level_downsamples=tuple(float(d) for d, _ in levels),
            level_dimensions=tuple(s for _, s in levels)))

    pyramid = fake([(d, (200000 // d, 100000 // d)) for d in (1, 4, 16, 64)])
    for downsample in (32, 16, 195):   # tissue at 8 or 4 µm/px, QC at 1024 px
        assert reader.thumbnail_problem(pyramid, downsample) is None
    flat = fake([(1, (200000, 100000))])
    assert '200000 x 100000' in reader.thumbnail_problem(flat, 32)
    assert '65535 x 65535' in reader.thumbnail_problem(fake([(1, (65535, 65535))]), 256)
