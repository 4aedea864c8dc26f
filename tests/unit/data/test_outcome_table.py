"""The outcome table reader and the radiograph reader: what a site's CSV and images turn into."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from PIL import Image

from medflare.data.brats_layout import DataListError
from medflare.data.outcome_table import OutcomeCase, load_outcome_table, read_xray

CLINICAL = ["age", "spo2"]
LABELS = ["o2_24h"]
HEADER = ["case_id", "split", "image", "age", "spo2", "o2_24h"]


def write_table(path, rows, header=HEADER):
    """A CSV with ``header`` and ``rows`` (lists of cells), written as a site would."""
    lines = [",".join(header)] + [",".join(str(cell) for cell in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_png(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path)
    return str(path)


def write_dicom(path, pixels, photometric="MONOCHROME2", slope=1.0, intercept=0.0):
    """A minimal single-frame 16-bit greyscale DICOM file with a modality LUT."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def gradient(shape=(12, 20), low=0, high=200, dtype=np.uint8):
    """A non-square ramp along the columns, so a transposed or flipped read shows up."""
    rows, cols = shape
    ramp = np.linspace(low, high, cols).round().astype(dtype)
    return np.tile(ramp, (rows, 1))


def scaled(array):
    array = array.astype(np.float64)
    return (array - array.min()) / (array.max() - array.min())


# --- load_outcome_table: valid tables -----------------------------------------------------


@pytest.fixture
def site(tmp_path):
    """A data root with three images and a table naming them, train and test interleaved."""
    (tmp_path / "images").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "images" / f"{name}.png").write_bytes(b"")
    rows = [
        ["a", "train", "images/a.png", 71, 88.0, 1],
        ["b", "test", "images/b.png", 45, 97.5, 0],
        ["c", "train", "images/c.png", 60.5, "92", "0.0"],
    ]
    return tmp_path, write_table(tmp_path / "table.csv", rows)


def test_a_table_with_images_gives_train_and_test_cases_in_file_order(site):
    root, table = site
    cases = load_outcome_table(table, str(root), CLINICAL, LABELS, image_column="image")
    assert set(cases) == {"train", "test"}
    assert cases["train"] == [
        OutcomeCase("a", "train", os.path.join(str(root), "images", "a.png"), (71.0, 88.0), (1,)),
        OutcomeCase("c", "train", os.path.join(str(root), "images", "c.png"), (60.5, 92.0), (0,)),
    ]
    assert cases["test"] == [OutcomeCase("b", "test", os.path.join(str(root), "images", "b.png"), (45.0, 97.5), (0,))]
    assert all(os.path.isabs(c.image) for split in cases.values() for c in split)


def test_a_table_only_model_ignores_images_and_keeps_the_column_order_of_the_job(site):
    root, table = site
    # columns in the job's order, not the file's; the image column is not looked at
    cases = load_outcome_table(table, str(root), ["spo2", "age"], ["o2_24h"], image_column=None)
    assert [c.case_id for c in cases["train"]] == ["a", "c"]
    assert [c.clinical for c in cases["train"]] == [(88.0, 71.0), (92.0, 60.5)]
    assert all(c.image is None for split in cases.values() for c in split)


def test_a_table_without_an_image_column_at_all_and_several_labels(tmp_path):
    table = write_table(
        tmp_path / "t.csv",
        [["x1", "train", 3, 1, 0], ["x2", "test", 4, 0, 1]],
        header=["case_id", "split", "age", "l1", "l2"],
    )
    cases = load_outcome_table(table, str(tmp_path), ["age"], ["l1", "l2"])
    assert cases["train"][0].labels == (1, 0)
    assert cases["test"][0].labels == (0, 1)


def test_an_image_only_model_may_have_no_clinical_columns(site):
    root, table = site
    cases = load_outcome_table(table, str(root), [], LABELS, image_column="image")
    assert [c.clinical for c in cases["train"]] == [(), ()]


# --- load_outcome_table: the site's data is wrong -----------------------------------------


GOOD_ROWS = [
    ["a", "train", "images/a.png", 71, 88.0, 1],
    ["b", "test", "images/b.png", 45, 97.5, 0],
]


def replace(row_index, column, value):
    rows = [list(r) for r in GOOD_ROWS]
    rows[row_index][HEADER.index(column)] = value
    return rows


@pytest.mark.parametrize(
    "rows, message",
    [
        (replace(1, "age", ""), "line 3 (case 'b'): column 'age' is empty"),
        (replace(0, "spo2", "high"), "line 2 (case 'a'): column 'spo2' is not a number: 'high'"),
        (replace(1, "spo2", "nan"), "line 3 (case 'b'): column 'spo2' is not finite: 'nan'"),
        (replace(0, "age", "inf"), "line 2 (case 'a'): column 'age' is not finite: 'inf'"),
        (replace(0, "o2_24h", "2"), "line 2 (case 'a'): label 'o2_24h' must be 0 or 1, got '2'"),
        (replace(1, "o2_24h", "yes"), "line 3 (case 'b'): label 'o2_24h' must be 0 or 1, got 'yes'"),
        (replace(1, "o2_24h", ""), "line 3 (case 'b'): label 'o2_24h' must be 0 or 1, got ''"),
        (replace(1, "case_id", "a"), "line 3 (case 'a'): case_id appears twice"),
        (replace(0, "case_id", " "), "line 2 (case ''): empty case_id"),
        (replace(1, "split", "valid"), "line 3 (case 'b'): split must be one of ['train', 'test'], got 'valid'"),
        (replace(1, "split", "train"), "has no 'test' cases"),
        (replace(0, "split", "test"), "has no 'train' cases"),
        (replace(1, "image", "images/missing.png"), "line 3 (case 'b'): image {root}/images/missing.png does not exist"),
        (replace(0, "image", ""), "line 2 (case 'a'): no image in column 'image'"),
    ],
)
def test_a_bad_value_names_the_file_the_line_the_case_and_the_column(tmp_path, rows, message):
    (tmp_path / "images").mkdir()
    for name in ("a", "b"):
        (tmp_path / "images" / f"{name}.png").write_bytes(b"")
    table = write_table(tmp_path / "table.csv", rows)
    with pytest.raises(DataListError) as raised:
        load_outcome_table(table, str(tmp_path), CLINICAL, LABELS, image_column="image")
    assert table in str(raised.value)
    assert message.format(root=tmp_path) in str(raised.value)


def test_a_missing_file_is_named(tmp_path):
    path = str(tmp_path / "absent.csv")
    with pytest.raises(DataListError, match=re.escape(f"outcome table {path} does not exist")):
        load_outcome_table(path, str(tmp_path), CLINICAL, LABELS)


@pytest.mark.parametrize("content", ["", ",".join(HEADER) + "\n"], ids=["empty", "header-only"])
def test_a_table_without_cases_is_refused(tmp_path, content):
    path = tmp_path / "t.csv"
    path.write_text(content)
    with pytest.raises(DataListError, match=re.escape(f"outcome table {path} has no cases")):
        load_outcome_table(str(path), str(tmp_path), CLINICAL, LABELS)


def test_missing_columns_are_all_listed(tmp_path):
    table = write_table(tmp_path / "t.csv", [["a", "train", 70], ["b", "test", 50]], header=["case_id", "split", "age"])
    with pytest.raises(DataListError) as raised:
        load_outcome_table(table, str(tmp_path), CLINICAL, ["o2_24h", "o2_72h"], image_column="image")
    message = str(raised.value)
    assert table in message
    assert "lacks column(s) ['image', 'spo2', 'o2_24h', 'o2_72h']" in message
    assert "it has ['case_id', 'split', 'age']" in message


# --- load_outcome_table: the job's column arguments are wrong -----------------------------


@pytest.mark.parametrize(
    "clinical, labels, image, message",
    [
        (CLINICAL, [], None, "label_columns must name at least one column"),
        (["age", "o2_24h"], ["o2_24h"], None, r"columns \['o2_24h'\] are named both as clinical inputs and as labels"),
        ([], LABELS, None, "clinical_columns must name at least one column"),
        (["age", "age"], LABELS, None, "clinical_columns names a column twice"),
        (["age", ""], LABELS, None, "clinical_columns must be a list of column names"),
        ("age", LABELS, None, "clinical_columns must be a list of column names, got 'age'"),
        (CLINICAL, LABELS, "", "image_column must be a column name or null, got ''"),
    ],
)
def test_bad_job_arguments_are_the_jobs_fault_not_the_sites(tmp_path, clinical, labels, image, message):
    # the file does not exist: the arguments are checked before the site's data is touched
    with pytest.raises(ValueError, match=message) as raised:
        load_outcome_table(str(tmp_path / "absent.csv"), str(tmp_path), clinical, labels, image_column=image)
    assert not isinstance(raised.value, DataListError)


# --- read_xray ----------------------------------------------------------------------------


def assert_unit_range(image, shape):
    assert image.dtype == np.float32
    assert image.shape == shape
    assert image.min() == 0.0 and image.max() == 1.0


def test_an_8_bit_png_is_scaled_by_its_own_range_without_transposing(tmp_path):
    array = gradient((12, 20), low=40, high=140)
    array[3, 17] = 250  # the one bright pixel
    image = read_xray(write_png(tmp_path / "x.png", array))
    assert_unit_range(image, (12, 20))
    assert np.unravel_index(image.argmax(), image.shape) == (3, 17)
    np.testing.assert_allclose(image, scaled(array), atol=1e-6)


def test_a_16_bit_png_keeps_its_full_depth(tmp_path):
    array = gradient((10, 16), low=0, high=1000, dtype=np.uint16)
    array[7, 2] = 65535
    path = write_png(tmp_path / "x16.png", array)
    with Image.open(path) as written:
        assert written.mode in ("I;16", "I")  # Pillow < 10.3 opens a 16-bit PNG as 32-bit "I": both keep the depth
    image = read_xray(path)
    assert_unit_range(image, (10, 16))
    assert np.unravel_index(image.argmax(), image.shape) == (7, 2)
    # 1000/65535 is far below one 8-bit level: a read through 8 bits would lose the ramp
    np.testing.assert_allclose(image, scaled(array), atol=1e-6)
    assert 0 < image[0, 1] < 1 / 255


def test_a_colour_png_is_converted_to_luminance(tmp_path):
    rgb = np.zeros((9, 11, 3), dtype=np.uint8)
    rgb[..., :] = 30
    rgb[0, 0] = (255, 0, 0)
    rgb[4, 5] = (0, 255, 0)
    rgb[8, 10] = (255, 255, 255)
    image = read_xray(write_png(tmp_path / "rgb.png", rgb))
    assert_unit_range(image, (9, 11))
    assert image[8, 10] == 1.0
    assert image[0, 0] > 0 and image[4, 5] > image[0, 0]  # green is brighter than red to the eye
    expected = scaled(np.asarray(Image.fromarray(rgb).convert("L")))
    np.testing.assert_allclose(image, expected, atol=1e-6)


def test_a_dicom_goes_through_the_modality_lut(tmp_path):
    raw = gradient((12, 16), low=100, high=3000, dtype=np.uint16)
    raw[2, 13] = 4000
    image = read_xray(write_dicom(tmp_path / "x.dcm", raw, slope=2.0, intercept=-100.0))
    assert_unit_range(image, (12, 16))
    assert np.unravel_index(image.argmax(), image.shape) == (2, 13)
    # a positive linear LUT leaves the image the same after scaling by its own range
    np.testing.assert_allclose(image, scaled(raw), atol=1e-6)


def test_monochrome1_is_inverted_so_bone_is_bright_in_both(tmp_path):
    raw = gradient((10, 12), low=0, high=2000, dtype=np.uint16)
    raw[5, 6] = 4000
    mono2 = read_xray(write_dicom(tmp_path / "m2.dcm", raw, "MONOCHROME2"))
    mono1 = read_xray(write_dicom(tmp_path / "m1.dcm", raw, "MONOCHROME1"))
    assert mono2[5, 6] == 1.0 and mono1[5, 6] == 0.0
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_a_dicom_is_recognised_by_its_preamble_without_the_extension(tmp_path):
    raw = gradient((8, 10), low=0, high=500, dtype=np.uint16)
    path = write_dicom(tmp_path / "radiograph", raw, slope=2.0, intercept=-100.0)
    with open(path, "rb") as f:
        assert f.read(132)[128:] == b"DICM"
    np.testing.assert_allclose(read_xray(path), scaled(raw), atol=1e-6)


def test_a_constant_image_becomes_zeros(tmp_path):
    image = read_xray(write_png(tmp_path / "flat.png", np.full((10, 10), 77, dtype=np.uint8)))
    assert image.shape == (10, 10)
    assert np.all(image == 0.0)


def test_a_corrupt_file_is_named(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(DataListError, match=re.escape(f"cannot read image {path}")):
        read_xray(str(path))


def test_a_file_named_dcm_that_is_not_dicom_is_named(tmp_path):
    path = tmp_path / "fake.dcm"
    path.write_bytes(b"not a dicom file at all" * 10)
    with pytest.raises(DataListError, match=re.escape(f"cannot read image {path}")):
        read_xray(str(path))


def test_a_missing_image_is_named(tmp_path):
    path = tmp_path / "gone.png"
    with pytest.raises(DataListError, match=re.escape(f"cannot read image {path}")):
        read_xray(str(path))


@pytest.mark.parametrize("shape", [(4, 4), (7, 30), (30, 7)])
def test_a_too_small_image_is_named(tmp_path, shape):
    path = write_png(tmp_path / "tiny.png", gradient(shape))
    with pytest.raises(DataListError, match=re.escape(f"image {path} must be one 2D greyscale image of at least 8x8")):
        read_xray(path)


def test_a_multi_frame_dicom_of_one_repeated_image_is_read(tmp_path):
    import pydicom

    raw = gradient((8, 10), low=0, high=900, dtype=np.uint16)
    path = write_dicom(tmp_path / "x.dcm", raw)
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(path, enforce_file_format=True)
    np.testing.assert_allclose(read_xray(path), scaled(raw), atol=1e-6)


# --- image paths stay inside the data root ---------------------------------------------------


@pytest.mark.parametrize(
    "image",
    ["../outside.png", "images/../../outside.png", "{tmp}/outside.png", "images/link.png"],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink"],
)
def test_an_image_outside_the_data_root_is_refused_naming_the_line_and_case(tmp_path, image):
    from medflare.data.data_root_paths import DataPathError

    root = tmp_path / "site"
    (root / "images").mkdir(parents=True)
    outside = write_png(tmp_path / "outside.png", gradient())
    (root / "images" / "link.png").symlink_to(outside)
    write_png(root / "images" / "a.png", gradient())
    rows = [list(GOOD_ROWS[0]), list(GOOD_ROWS[1])]
    rows[1][2] = image.format(tmp=tmp_path)
    table = write_table(root / "table.csv", rows)
    with pytest.raises(DataPathError) as raised:
        load_outcome_table(table, str(root), CLINICAL, LABELS, image_column="image")
    text = str(raised.value)
    assert text.startswith(f"{table} line 3 (case 'b'): column 'image': ")
    assert f"resolves to {os.path.realpath(outside)}" in text and f"outside the data root {os.path.realpath(root)}" in text


# --- check_outcome_table: what the site install reads -----------------------------------------


def _install_site(tmp_path, rows, header=HEADER):
    (tmp_path / "images").mkdir(exist_ok=True)
    for name in ("a", "b"):
        write_png(tmp_path / "images" / f"{name}.png", gradient())
    return write_table(tmp_path / "table.csv", rows, header)


def test_check_outcome_table_counts_cases_and_reads_every_image(tmp_path):
    from medflare.data.outcome_table import check_outcome_table

    table = _install_site(tmp_path, GOOD_ROWS)
    assert check_outcome_table(table, str(tmp_path)) == {"train": 1, "test": 1, "images": 1 + 1}


@pytest.mark.parametrize(
    "rows, prepare, message",
    [
        (replace(1, "spo2", "nan"), None, "line 3 (case 'b'): column 'spo2' is not finite: 'nan'"),
        (replace(0, "age", "-inf"), None, "line 2 (case 'a'): column 'age' is not finite: '-inf'"),
        (replace(0, "o2_24h", "Infinity"), None, "line 2 (case 'a'): column 'o2_24h' is not finite: 'Infinity'"),
        (replace(1, "image", "../x.png"), None, "line 3 (case 'b'): column 'image': '../x.png' resolves to"),
        (replace(1, "image", "/etc/hostname"), None, "line 3 (case 'b'): column 'image': '/etc/hostname' resolves to /etc/hostname"),
        (GOOD_ROWS, lambda root: (root / "images" / "b.png").write_bytes(b""), "line 3 (case 'b'): cannot read image {root}/images/b.png"),
        (GOOD_ROWS, lambda root: write_png(root / "images" / "a.png", gradient((4, 40))), "line 2 (case 'a'): image {root}/images/a.png must be one 2D greyscale image of at least 8x8, got shape (4, 40)"),
    ],
    ids=["nan", "minus-inf", "infinity", "dotdot", "absolute", "empty-png", "too-small-png"],
)
def test_check_outcome_table_refuses_naming_the_file_line_and_case(tmp_path, rows, prepare, message):
    from medflare.data.outcome_table import check_outcome_table

    table = _install_site(tmp_path, rows)
    if prepare:
        prepare(tmp_path)
    with pytest.raises(DataListError) as raised:
        check_outcome_table(table, str(tmp_path))
    assert str(raised.value).startswith(table)
    assert message.format(root=tmp_path) in str(raised.value)


def test_check_outcome_table_leaves_text_and_empty_cells_to_the_job(tmp_path):
    from medflare.data.outcome_table import check_outcome_table

    rows = [row + extra for row, extra in zip(GOOD_ROWS, (["F", ""], ["nanny", "3"]))]
    table = _install_site(tmp_path, rows, HEADER + ["sex", "unused"])
    assert check_outcome_table(table, str(tmp_path))["images"] == 2


def test_an_rgb_dicom_is_refused_naming_the_file(tmp_path):
    import pydicom

    path = write_dicom(tmp_path / "x.dcm", gradient((8, 8), dtype=np.uint16))
    ds = pydicom.dcmread(path)
    ds.SamplesPerPixel = 3
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DataListError, match=re.escape(f"image {path} must be a greyscale DICOM (SamplesPerPixel 1)")):
        read_xray(path)


@pytest.mark.parametrize("mode", ["LA", "RGBA", "P"])
def test_other_png_modes_become_one_greyscale_plane(tmp_path, mode):
    array = np.stack([gradient((10, 12))] * {"LA": 2, "RGBA": 4, "P": 1}[mode], axis=-1).squeeze()
    path = tmp_path / f"{mode}.png"
    Image.fromarray(array).convert(mode).save(path)
    assert read_xray(str(path)).shape == (10, 12)


def test_count_cases_counts_splits_without_reading_images_and_refuses_a_bad_split(tmp_path):
    from medflare.data.brats_layout import DataListError
    from medflare.data.outcome_table import count_cases

    table = tmp_path / "t.csv"
    table.write_text("case_id,split,image\na,train,missing.png\nb,train,missing.png\nc,test,missing.png\n")
    assert count_cases(str(table)) == {"train": 2, "test": 1}  # the images do not exist: not read
    table.write_text("case_id,split\na,train\nb,validation\n")
    with pytest.raises(DataListError, match=r"line 3: split must be one of \['train', 'test'\], got 'validation'"):
        count_cases(str(table))
    with pytest.raises(DataListError):
        count_cases(str(tmp_path / "none.csv"))


# --- DICOM: VOI LUT, multi-frame files, series folders, JPEG -----------------------------------


def write_dicom_frames(path, frames, photometric="MONOCHROME2", series_uid="1.2.3.4", instance=1, **attributes):
    """A 16-bit greyscale DICOM of one frame ``(H, W)`` or several ``(F, H, W)``, with any
    further ``attributes`` (WindowCenter, VOILUTSequence, ...) set on it."""
    frames = np.asarray(frames)
    write_dicom(path, frames.reshape(-1, frames.shape[-1]), photometric)
    import pydicom

    ds = pydicom.dcmread(str(path))
    ds.Rows, ds.Columns = frames.shape[-2:]
    if frames.ndim == 3:
        ds.NumberOfFrames = frames.shape[0]
    ds.SeriesInstanceUID = series_uid
    if instance is not None:
        ds.InstanceNumber = instance
    del ds.RescaleSlope, ds.RescaleIntercept
    for name, value in attributes.items():
        setattr(ds, name, value)
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def window_ramp():
    """8x10 raw values around a window of centre 100, width 101 (PS3.3 C.11.2.1.2.1: below
    49.5 is y_min, above 149.5 is y_max, between is ((x - 99.5) / 100 + 0.5) of the range)."""
    raw = np.zeros((8, 10), dtype=np.uint16)
    raw[0, :6] = [0, 49, 50, 100, 149, 150]
    raw[1, 0] = 4000
    return raw


def test_a_dicom_window_is_applied_after_the_modality_lut_by_the_standards_formula(tmp_path):
    raw = window_ramp()
    image = read_xray(write_dicom_frames(tmp_path / "w.dcm", raw, WindowCenter=100, WindowWidth=101))
    # hand-computed: 0 and 49 below the window, 150 and 4000 above it
    np.testing.assert_allclose(image[0, :6], [0.0, 0.0, 0.005, 0.505, 0.995, 1.0], atol=1e-6)
    assert image[1, 0] == 1.0  # 4000 is clipped to the top of the window, not the image's maximum
    # the window acts on the modality values: raw r -> x = 2r - 100
    modality = raw.copy()
    modality[0, :6] = [0, 74, 75, 100, 124, 125]  # x = -100, 48, 50, 100, 148, 150
    shifted = write_dicom_frames(tmp_path / "m.dcm", modality, WindowCenter=100, WindowWidth=101, RescaleSlope=2, RescaleIntercept=-100)
    np.testing.assert_allclose(read_xray(shifted)[0, :6], [0.0, 0.0, 0.005, 0.505, 0.985, 1.0], atol=1e-6)


def test_the_first_of_several_windows_is_used(tmp_path):
    raw = window_ramp()
    image = read_xray(write_dicom_frames(tmp_path / "w.dcm", raw, WindowCenter=[100, 2000], WindowWidth=[101, 4000]))
    np.testing.assert_allclose(image[0, :6], [0.0, 0.0, 0.005, 0.505, 0.995, 1.0], atol=1e-6)


def test_a_voi_lut_sequence_maps_each_value_through_the_table(tmp_path):
    from pydicom.dataset import Dataset

    raw = np.full((8, 8), 5, dtype=np.uint16)
    raw[0, :6] = [5, 10, 11, 12, 13, 20]
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 10, 8])  # LUT Descriptor: 4 entries, the first for value 10, 8 bits
    item.add_new(0x00283006, "US", [0, 10, 200, 255])  # LUT Data
    image = read_xray(write_dicom_frames(tmp_path / "lut.dcm", raw, VOILUTSequence=[item]))
    # below the first mapped value: the first entry; above the last: the last entry
    np.testing.assert_allclose(image[0, :6], [0, 0, 10 / 255, 200 / 255, 1, 1], atol=1e-6)


def test_monochrome1_is_inverted_after_the_window(tmp_path):
    raw = window_ramp()
    image = read_xray(write_dicom_frames(tmp_path / "w.dcm", raw, "MONOCHROME1", WindowCenter=100, WindowWidth=101))
    np.testing.assert_allclose(image[0, :6], [1.0, 1.0, 0.995, 0.495, 0.005, 0.0], atol=1e-6)


def test_pydicoms_own_mr_file_reads_as_its_window_by_hand(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600.0, 1600.0)
    x = ds.pixel_array.astype(np.float64)
    c, w = 600 - 0.5, 1600 - 1
    y = np.clip((x - c) / w + 0.5, 0, 1)
    y[x <= c - w / 2] = 0
    y[x > c + w / 2] = 1
    np.testing.assert_allclose(read_xray(path), (y - y.min()) / (y.max() - y.min()), atol=1e-5)


def test_a_zero_window_width_is_refused_naming_the_file(tmp_path):
    path = write_dicom_frames(tmp_path / "w.dcm", window_ramp(), WindowCenter=100, WindowWidth=0)
    with pytest.raises(DataListError, match=re.escape(f"cannot read image {path}: ValueError") + ".*Window Width"):
        read_xray(path)


def two_images():
    first = gradient((8, 10), low=0, high=900, dtype=np.uint16)
    second = first[:, ::-1].copy()
    return first, second


def test_a_multi_frame_dicom_of_different_images_needs_a_frame_number(tmp_path):
    first, second = two_images()
    path = write_dicom_frames(tmp_path / "mf.dcm", np.stack([first, second, first]))
    with pytest.raises(DataListError, match=re.escape(f"image {path} holds 3 different images (frame 1 and frame 2 differ)")):
        read_xray(path)
    np.testing.assert_allclose(read_xray(path, frame=1), scaled(first), atol=1e-6)
    np.testing.assert_allclose(read_xray(path, frame=2), scaled(second), atol=1e-6)
    with pytest.raises(DataListError, match="has 3 frame\\(s\\); frame 4 was asked for"):
        read_xray(path, frame=4)


@pytest.mark.parametrize("frame", [0, -1, 1.0, True, "1"])
def test_a_bad_frame_number_is_the_callers_fault(tmp_path, frame):
    with pytest.raises(ValueError, match=re.escape(f"frame must be null or an int >= 1 (DICOM counts frames from 1), got {frame!r}")) as raised:
        read_xray(str(tmp_path / "none.dcm"), frame=frame)
    assert not isinstance(raised.value, DataListError)


def write_series(folder, images, numbers, uids=None, names=None):
    folder.mkdir()
    for k, (image, number) in enumerate(zip(images, numbers)):
        name = names[k] if names else f"f{k}.dcm"
        write_dicom_frames(folder / name, image, series_uid=(uids or ["1.2.3"] * len(images))[k], instance=number)
    return str(folder)


def test_a_series_folder_is_ordered_by_instance_number_not_by_file_name(tmp_path):
    first, second = two_images()
    third = first + 50
    # file names sort a, b, c; instance numbers say c, a, b
    folder = write_series(tmp_path / "series", [second, third, first], [2, 3, 1], names=["a.dcm", "b.dcm", "c.dcm"])
    np.testing.assert_allclose(read_xray(folder, frame=1), scaled(first), atol=1e-6)
    np.testing.assert_allclose(read_xray(folder, frame=2), scaled(second), atol=1e-6)
    with pytest.raises(DataListError, match=re.escape("holds 3 different images (instance 1 (c.dcm) and instance 2 (a.dcm) differ)")):
        read_xray(folder)


def test_a_series_of_one_image_or_repeats_of_it_reads_without_a_frame(tmp_path):
    first, _ = two_images()
    np.testing.assert_allclose(read_xray(write_series(tmp_path / "one", [first], [7])), scaled(first), atol=1e-6)
    np.testing.assert_allclose(read_xray(write_series(tmp_path / "two", [first, first], [1, 2])), scaled(first), atol=1e-6)


def test_a_series_folder_mixing_two_series_names_both_uids(tmp_path):
    first, second = two_images()
    folder = write_series(tmp_path / "mixed", [first, second], [1, 2], uids=["1.2.3.9", "1.2.3.10"])
    with pytest.raises(DataListError) as raised:
        read_xray(folder)
    assert str(raised.value) == (
        f"image series {folder} mixes series: SeriesInstanceUID 1.2.3.10 (f1.dcm) and 1.2.3.9 (f0.dcm); "
        "one folder must hold one series"
    )


def _no_instance(folder):
    import pydicom

    ds = pydicom.dcmread(folder / "f1.dcm")
    del ds.InstanceNumber
    ds.save_as(folder / "f1.dcm", enforce_file_format=True)


@pytest.mark.parametrize(
    "prepare, message",
    [
        (lambda f: _no_instance(f), "f1.dcm has no InstanceNumber to order the series by"),
        (lambda f: (f / "notes.txt").write_text("hello"), "cannot read image"),
        (lambda f: (f / "sub").mkdir(), "'sub' is not a file inside the folder"),
        (lambda f: (f / "link.dcm").symlink_to(f.parent / "outside.dcm"), "'link.dcm' is not a file inside the folder"),
        (lambda f: write_dicom_frames(f / "f9.dcm", gradient((8, 10), dtype=np.uint16), series_uid="1.2.3", instance=2), "InstanceNumber 2 is repeated (f1.dcm, f9.dcm)"),
        (lambda f: write_dicom_frames(f / "f9.dcm", gradient((9, 10), dtype=np.uint16), series_uid="1.2.3", instance=5), "instance 5 (f9.dcm) is (9, 10), instance 1 is (8, 10)"),
        (lambda f: write_dicom_frames(f / "f9.dcm", np.stack([gradient((8, 10), dtype=np.uint16)] * 2), series_uid="1.2.3", instance=5), "f9.dcm is multi-frame"),
    ],
    ids=["no-instance-number", "not-dicom", "subfolder", "symlink-out", "repeated-number", "other-shape", "multi-frame-inside"],
)
def test_a_bad_series_folder_is_refused_naming_the_folder_and_file(tmp_path, prepare, message):
    first, _ = two_images()
    write_dicom_frames(tmp_path / "outside.dcm", first)
    folder = write_series(tmp_path / "series", [first, first], [1, 2])
    prepare(tmp_path / "series")
    with pytest.raises(DataListError) as raised:
        read_xray(folder)
    assert folder in str(raised.value) and message in str(raised.value)


def test_an_empty_series_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataListError, match=re.escape(f"image series {tmp_path / 'empty'} is an empty folder")):
        read_xray(str(tmp_path / "empty"))


def test_an_enhanced_dicom_with_its_window_in_functional_groups_is_refused(tmp_path):
    from pydicom.dataset import Dataset

    voi, group = Dataset(), Dataset()
    voi.WindowCenter, voi.WindowWidth = 100, 101
    group.FrameVOILUTSequence = [voi]
    path = write_dicom_frames(tmp_path / "e.dcm", window_ramp(), SharedFunctionalGroupsSequence=[group])
    with pytest.raises(DataListError, match=re.escape(f"image {path} is an enhanced multi-frame DICOM") + ".*FrameVOILUTSequence"):
        read_xray(path)


def test_a_colour_photometric_interpretation_is_refused(tmp_path):
    path = write_dicom_frames(tmp_path / "p.dcm", window_ramp(), "PALETTE COLOR")
    with pytest.raises(DataListError, match=re.escape(f"image {path} must be a greyscale DICOM (MONOCHROME1/2), got 'PALETTE COLOR'")):
        read_xray(path)


def test_a_jpeg_is_read_as_greyscale(tmp_path):
    array = np.zeros((16, 16), dtype=np.uint8)
    array[:, 8:] = 200
    path = tmp_path / "view1_frontal.jpg"
    Image.fromarray(array).save(path, quality=95)
    image = read_xray(str(path))
    assert image.shape == (16, 16) and image.dtype == np.float32
    assert image[:, :6].max() < 0.05 and image[:, 10:].min() > 0.95  # lossy, but the two halves stay apart


def test_a_table_may_name_a_series_folder_as_the_image(tmp_path):
    first, _ = two_images()
    (tmp_path / "images").mkdir()
    write_series(tmp_path / "images" / "a", [first], [1])
    write_png(tmp_path / "images" / "b.png", gradient())
    rows = [["a", "train", "images/a", 71, 88.0, 1], ["b", "test", "images/b.png", 45, 97.5, 0]]
    table = write_table(tmp_path / "table.csv", rows)
    cases = load_outcome_table(table, str(tmp_path), CLINICAL, LABELS, image_column="image")
    assert cases["train"][0].image == str(tmp_path / "images" / "a")
    np.testing.assert_allclose(read_xray(cases["train"][0].image), scaled(first), atol=1e-6)
    from medflare.data.outcome_table import check_outcome_table

    assert check_outcome_table(table, str(tmp_path))["images"] == 2
