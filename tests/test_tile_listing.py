"""What a folder of slides is read as, and the QC pictures and rows of slides without a
usable µm/px (issue 23, items 5 and 12).

A folder of DICOM instances is one slide named after the folder; the files that are not
slides are counted in one line. Every slide with a thumbnail gets a QC picture whose words
name its keys and sizes in µm, slides without µm/px included; a µm/px no scan has (the
72-dpi default of image editors) is a `bad_mpp` row naming the key that fixes it.

The DICOM slides are real ones OpenSlide reads: uncompressed RGB, TILED_FULL, one instance
per level, written here with pydicom (tests only); the grouping is also tested on empty
.dcm files with OpenSlide's detection replaced, which needs no pydicom.
"""
import logging
import os

import numpy as np
import openslide
import pytest
from PIL import Image

from clusiam_jax import cli
from clusiam_jax.errors import DataError
from clusiam_jax.slides import qc, reader, slides_csv, tiling
from tests.helpers import write_pyramid
from tests.test_slides import synthetic_base, tile_params
from tests.test_tile_mpp import write_bare_pyramid

WSI_STORAGE = '1.2.840.10008.5.1.4.1.1.77.1.6'   # VL Whole Slide Microscopy Image Storage
SMALL = ['--config.tile.patch_size=64', '--config.tile.tissue_mpp=2.0',
         '--config.tile.min_area_um2=1000', '--config.tile.num_workers=0']


def _dicom_dataset(sop_class):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    return ds


def write_dicom_level(path, rgb, mpp, uids, instance, tile=128):
    """One level of a DICOM WSI: uncompressed RGB frames of `tile` px, TILED_FULL."""
    h, w = rgb.shape[:2]
    nx, ny = -(-w // tile), -(-h // tile)
    padded = np.full((ny * tile, nx * tile, 3), 255, np.uint8)
    padded[:h, :w] = rgb
    frames = padded.reshape(ny, tile, nx, tile, 3).transpose(0, 2, 1, 3, 4)
    from pydicom.dataset import Dataset
    ds = _dicom_dataset(WSI_STORAGE)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids
    ds.Modality = 'SM'
    ds.ImageType = ['ORIGINAL', 'PRIMARY', 'VOLUME', 'NONE']
    ds.InstanceNumber = instance
    ds.DimensionOrganizationType = 'TILED_FULL'
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
    ds.TotalPixelMatrixFocalPlanes = ds.NumberOfOpticalPaths = 1
    ds.Columns = ds.Rows = tile
    ds.NumberOfFrames = nx * ny
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = 'RGB'
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = w * mpp / 1000, h * mpp / 1000
    measures = Dataset()
    measures.PixelSpacing = [mpp / 1000, mpp / 1000]   # mm
    measures.SliceThickness = 0.001
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_dicom_slide(folder, rgb, mpp):
    """A DICOM WSI as scanners export it: a folder with one instance per level, named by
    their UIDs, and a DICOM file of another kind sorted first (it opens no slide)."""
    from pydicom.uid import generate_uid
    os.makedirs(folder, exist_ok=True)
    uids = (generate_uid(), generate_uid(), generate_uid())
    write_dicom_level(os.path.join(folder, '2.25.9.dcm'), rgb, mpp, uids, 1)
    write_dicom_level(os.path.join(folder, '2.25.3.dcm'), rgb[::2, ::2].copy(), 2 * mpp,
                      uids, 2)
    report = _dicom_dataset('1.2.840.10008.5.1.4.1.1.88.11')   # Basic Text SR
    report.Modality = 'SR'
    report.save_as(os.path.join(folder, '0_report.dcm'), enforce_file_format=True)
    return folder


def tile(slides, out, *flags):
    return cli.main(['--mode', 'tile', f'--config.tile.slides={slides}',
                     f'--config.tile.out_dir={out}', *SMALL, *flags])


def rows_of(out):
    return {r['slide_id']: r for r in slides_csv.read_rows(str(out))}


def qc_words(out, slide_id):
    """The words of a QC picture (also in its PNG text), and its size."""
    with Image.open(os.path.join(str(out), 'masks', f'{slide_id}.png')) as image:
        return image.text.get('Title', ''), image.size


def skipped_lines(caplog):
    return [r.getMessage() for r in caplog.records if 'not slides' in r.getMessage()]


# ------------------------------------------------------------------ DICOM folders

def test_a_folder_of_dicom_instances_is_one_slide_and_is_tiled(tmp_path, caplog):
    pytest.importorskip('pydicom')
    slides = tmp_path / 'slides'
    write_dicom_slide(str(slides / 'case 7' / 'HE-slide'), synthetic_base(0.5), 0.5)
    write_pyramid(str(slides / 'scan.tif'), synthetic_base(0.5), 0.5)
    entries = tiling.list_slides(str(slides))
    assert [e.slide_id for e in entries] == ['HE-slide', 'scan']
    dicom = entries[0]
    # Opened through a level, not through the report sorted before it.
    assert os.path.basename(dicom.path) == '2.25.3.dcm'
    with reader.open_slide(dicom.path) as slide:
        assert slide.handle.level_count == 2
        assert reader.level0_resolution(slide).mpp == pytest.approx(0.5)

    caplog.set_level(logging.INFO)
    out = tmp_path / 'tiles'
    assert tile(slides, out) == 0
    rows = rows_of(out)
    assert set(rows) == {'HE-slide', 'scan'}
    assert rows['HE-slide']['status'] == 'tiled', rows['HE-slide']
    # The same field as the TIFF: the same grid.
    assert rows['HE-slide']['n_patches'] == rows['scan']['n_patches']
    assert not skipped_lines(caplog)   # the report .dcm belongs to the slide's folder

    # A CSV row may name the folder, or any instance of it; the id is the folder's.
    listing = tmp_path / 'list.csv'
    listing.write_text(f'path\n{slides / "case 7" / "HE-slide"}\n')
    entry, = tiling.list_slides(str(listing))
    assert (entry.slide_id, entry.path) == ('HE-slide', dicom.path)
    listing.write_text(f'path\n{dicom.path}\n')
    assert tiling.list_slides(str(listing))[0].slide_id == 'HE-slide'
    # So may tile.slides itself.
    assert tiling.list_slides(str(slides / 'case 7'))[0].path == dicom.path


def test_dicom_instances_are_grouped_by_folder(tmp_path, monkeypatch):
    """Empty .dcm files, OpenSlide's detection replaced: one slide per folder, opened
    through the first file it detects (else the first), named after the folder."""
    detected = []

    def detect(path):
        detected.append(os.path.basename(path))
        return 'dicom' if 'level' in os.path.basename(path) else None

    monkeypatch.setattr(openslide.OpenSlide, 'detect_format', staticmethod(detect))
    root = tmp_path / 'cohort'
    for folder, names in {'A1': ['z_level1.dcm', 'b_level0.dcm', 'a_annotation.dcm'],
                          'nested/B2': ['x.DCM', 'y.dcm'],
                          'C3': ['level.dcm']}.items():
        (root / folder).mkdir(parents=True)
        for name in names:
            (root / folder / name).write_bytes(b'')
    (root / 'C3' / 'sub').mkdir()
    (root / 'C3' / 'sub' / 'level.dcm').write_bytes(b'')
    entries = tiling.list_slides(str(root))
    found = {e.slide_id: os.path.relpath(e.path, root) for e in entries}
    assert found == {'A1': 'A1/b_level0.dcm', 'B2': 'nested/B2/x.DCM',
                     'C3': 'C3/level.dcm', 'sub': 'C3/sub/level.dcm'}
    assert 'a_annotation.dcm' in detected and 'z_level1.dcm' not in detected


def test_files_that_are_not_slides_are_counted_in_one_line(tmp_path, caplog):
    slides = tmp_path / 'slides'
    slides.mkdir()
    write_pyramid(str(slides / 'one.svs'), synthetic_base(1.0), 1.0)
    for i in range(8):
        (slides / f'notes{i}.txt').write_text('x')
    (slides / 'sub').mkdir()
    for i in range(4):
        (slides / 'sub' / f'meta{i}.json').write_text('{}')
    (slides / 'one_thumb.png').write_bytes(b'png')
    (slides / 'README').write_text('x')
    (slides / '.DS_Store').write_text('x')   # hidden: not counted
    # A MIRAX slide's data folder and a VMS slide's tiles belong to their slide.
    (slides / 'zeiss.czi').write_text('')   # the bundled OpenSlide reads Zeiss CZI
    (slides / 'mx.mrxs').write_text('')
    (slides / 'mx').mkdir()
    for name in ('Slidedat.ini', 'Index.dat', 'Data0000.dat'):
        (slides / 'mx' / name).write_text('')
    (slides / 'vms').mkdir()
    for name in ('s.vms', 's.jpg', 's_1.jpg', 's.opt'):
        (slides / 'vms' / name).write_text('')
    caplog.set_level(logging.INFO)
    entries = tiling.list_slides(str(slides))
    assert sorted(e.slide_id for e in entries) == ['mx', 'one', 's', 'zeiss']
    line, = skipped_lines(caplog)
    assert 'skipped 14 files that are not slides: 8 .txt, 4 .json, 1 .png, 1 without ' \
           'extension' in line, line

    # None at all: the error names the formats read and counts what is there.
    empty = tmp_path / 'docs'
    empty.mkdir()
    (empty / 'a.txt').write_text('x')
    (empty / 'scan.isyntax').write_text('x')
    with pytest.raises(DataError) as e:
        tiling.list_slides(str(empty))
    message = str(e.value)
    assert 'no slide files' in message and 'DICOM' in message and '.svs' in message
    assert '2 files that are not slides: 1 .isyntax, 1 .txt' in message, message


# ------------------------------------------------------------------ QC pictures, µm/px

@pytest.fixture(scope='module')
def mixed(tmp_path_factory):
    """`ok` at 0.5 µm/px, `bare` with no µm/px, `dpi72` at 352.8 µm/px (an image editor's
    72 dpi) and `tiny` at 0.01 µm/px in their TIFF tags."""
    root = tmp_path_factory.mktemp('mixed')
    field = synthetic_base(0.5)
    write_pyramid(str(root / 'ok.tif'), field, 0.5)
    write_bare_pyramid(str(root / 'bare.tif'), field)
    write_pyramid(str(root / 'dpi72.tif'), field, 25400 / 72)
    write_pyramid(str(root / 'tiny.tif'), field, 0.01)
    return root


@pytest.fixture(scope='module')
def tiled(mixed, tmp_path_factory):
    """The tiling of `mixed`, with the defaults (no tile.mpp_default)."""
    out = tmp_path_factory.mktemp('tiled') / 'tiles'
    assert tile(mixed, out) == 0
    return out


def test_qc_pictures_name_their_keys_and_sizes_in_um(tiled):
    out = tiled
    words, (width, _) = qc_words(out, 'ok')
    assert 'tile.patch_size 64 px at tile.target_mpp 0.5 µm/px = 32 µm' in words, words
    assert 'tile.min_tissue 0.5' in words and 'level-0 µm/px 0.5' in words, words
    assert width >= qc.QC_MIN_WIDTH   # readable over a slide of 512 px


def test_a_slide_without_mpp_gets_its_tissue_picture(tiled):
    out = tiled
    assert rows_of(out)['bare']['status'] == 'no_mpp'
    words, _ = qc_words(out, 'bare')
    assert 'no µm/px: set tile.mpp_default or the CSV mpp column' in words, words
    with Image.open(out / 'masks' / 'bare.png') as image:
        rgb = np.asarray(image.convert('RGB'))
    green = (rgb[..., 1] > 150) & (rgb[..., 0] < 60) & (rgb[..., 2] < 60)
    assert green.sum() > 100   # the tissue contour is drawn


def test_an_absurd_mpp_is_named_with_the_key_that_fixes_it(mixed, tiled, tmp_path):
    rows = rows_of(tiled)
    dpi72, tiny = rows['dpi72'], rows['tiny']
    assert dpi72['status'] == 'bad_mpp' and dpi72['n_patches'] == '0', dpi72
    assert 'level-0 µm/px 352.8 is the 72-dpi default of image editors, not a scan' in \
        dpi72['reason'], dpi72['reason']
    assert 'tile.mpp_default' in dpi72['reason'] and '"mpp" column' in dpi72['reason']
    assert tiny['status'] == 'bad_mpp' and '0.01' in tiny['reason'], tiny
    words, _ = qc_words(tiled, 'dpi72')
    assert '72-dpi default' in words and 'tile.mpp_default' in words, words
    # The default fills in for them, says so, and leaves the slide with a real µm/px be.
    out = tmp_path / 'tiles'
    assert tile(mixed, out, '--config.tile.mpp_default=0.5') == 0
    rows = rows_of(out)
    for name in ('dpi72', 'tiny', 'bare'):
        assert rows[name]['status'] == 'tiled' and rows[name]['mpp_origin'] == \
            'tile.mpp_default', rows[name]
    assert '352.8' in rows['dpi72']['reason'] and rows['bare']['reason'] == ''
    assert rows['ok']['mpp_origin'].startswith('slide metadata')


@pytest.mark.parametrize('mpp, words', [
    (25400 / 72, '352.8 is the 72-dpi default of image editors'),
    (25400 / 96, '264.6 is the 96-dpi default'),
    (25400 / 300, '84.67 is the 300-dpi default'),   # inside the range, still no scan's
    (150.0, 'coarser than any scan'),
    (0.02, 'finer than any scan'),
    (0.2525, None), (0.5, None), (8.0, None),
])
def test_implausible_mpp(mpp, words):
    problem = reader.implausible_mpp(mpp)
    assert problem is None if words is None else words in problem, problem


def test_unreadable_reasons_name_the_slide_file(mixed, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError('a damaged tile')

    monkeypatch.setattr(reader, 'thumbnail', broken)
    path = str(mixed / 'ok.tif')
    row = tiling.tile_slide(tiling.SlideEntry('ok', path), tile_params(), str(tmp_path))
    assert row['status'] == 'unreadable' and path in row['reason'], row
    assert 'a damaged tile' in row['reason']
    missing = str(tmp_path / 'gone.svs')
    row = tiling.tile_slide(tiling.SlideEntry('gone', missing), tile_params(), str(tmp_path))
    assert row['status'] == 'unreadable' and missing in row['reason'], row
