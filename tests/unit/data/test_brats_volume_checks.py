"""Hostile BraTS subjects: each bad volume is refused naming the subject, the file, what was
found and what is allowed; good ones (integer-valued float labels, affines within tolerance) pass,
and a file that passed is not read again."""

from __future__ import annotations

import gzip
import os
import re

import nibabel as nib
import numpy as np
import pytest

import medflare.data.brats_volume_checks as checks
from medflare.data.brats_layout import MODALITIES, DataListError
from medflare.data.brats_volume_checks import (
    AFFINE_TOLERANCE,
    VolumeCheckError,
    check_brats_subject,
    check_brats_subjects,
    forget_checked_files,
)

SHAPE = (12, 12, 10)
AFFINE = np.array([[1.0, 0, 0, -5.5], [0, 1.0, 0, -5.5], [0, 0, 1.2, -5.4], [0, 0, 0, 1]])
ROLES = (*MODALITIES, "label")


@pytest.fixture(autouse=True)
def _fresh_cache():
    forget_checked_files()
    yield
    forget_checked_files()


def good_arrays() -> dict:
    rng = np.random.default_rng(0)
    arrays = {m: rng.uniform(0, 100, SHAPE).astype(np.float32) for m in MODALITIES}
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[3:6, 3:6, 3:6] = 2
    label[4, 4, 4] = 1
    label[5, 5, 5] = 4
    arrays["label"] = label
    return arrays


def write_subject(root, arrays=None, affines=None, sid="BraTS2021_00007") -> dict:
    """A subject folder from ``{role: array}`` (defaults: good_arrays) and ``{role: affine}``
    (default AFFINE); returns its entry as load_datalist would."""
    arrays = {**good_arrays(), **(arrays or {})}
    affines = affines or {}
    folder = os.path.join(str(root), sid)
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for role in ROLES:
        name = f"{sid}_{'seg' if role == 'label' else role}.nii.gz"
        paths[role] = os.path.join(folder, name)
        nib.save(nib.Nifti1Image(arrays[role], affines.get(role, AFFINE)), paths[role])
    return {"image": [paths[m] for m in MODALITIES], "label": paths["label"]}


def path_of(entry, role):
    return entry["label"] if role == "label" else entry["image"][MODALITIES.index(role)]


def with_voxel(role, value, dtype=None, at=(1, 2, 3)):
    array = good_arrays()[role].astype(dtype or good_arrays()[role].dtype)
    array[at] = value
    return {role: array}


def float_label(values):
    label = good_arrays()["label"].astype(np.float32)
    label.flat[: len(values)] = values
    return {"label": label}


def shifted(role, by):
    affine = AFFINE.copy()
    affine[0, 3] += by
    return {role: affine}


def rotated(role):
    affine = AFFINE.copy()
    affine[:2, :2] = [[0.0, -1.0], [1.0, 0.0]]
    return {role: affine}


# role at fault, arrays, affines, message (regex, after the subject and file)
REFUSED = [
    ("label", with_voxel("label", 3), None, r"value\(s\) \[3\] in 1 voxel\(s\), outside the BraTS labels \[0, 1, 2, 4\]"),
    ("label", with_voxel("label", 5), None, r"value\(s\) \[5\] in 1 voxel\(s\), outside the BraTS labels"),
    ("label", with_voxel("label", 255), None, r"value\(s\) \[255\]"),
    ("label", with_voxel("label", -1, np.int16), None, r"value\(s\) \[-1\] in 1 voxel\(s\), outside"),
    ("label", float_label([3.0, 3.0, 7.0]), None, r"value\(s\) \[3, 7\] in 3 voxel\(s\), outside"),
    ("label", float_label([0.5]), None, r"1 non-integer voxel\(s\), values such as \[0\.5\]; labels must be integers"),
    ("label", float_label([1.9999, 2.5]), None, r"2 non-integer voxel\(s\)"),
    ("label", float_label([np.nan]), None, r"1 NaN and 0 infinite voxel\(s\), the first at voxel \(0, 0, 0\); labels must"),
    ("label", float_label([0, np.inf]), None, r"0 NaN and 1 infinite voxel\(s\)"),
    ("label", {"label": good_arrays()["label"][:, :, :9]}, None, r"shape \(12, 12, 9\), but modality t1 image .* has \(12, 12, 10\)"),
    ("label", {"label": good_arrays()["label"][None]}, None, r"shape \(1, 12, 12, 10\) \(4-D\); a 3-D volume is expected"),
    ("t2", {"t2": good_arrays()["t2"][:, :11]}, None, r"modality t2 image .* shape \(12, 11, 10\), but modality t1 image"),
    ("t1", {"t1": good_arrays()["t1"][:, :, :, None].repeat(2, 3)}, None, r"modality t1 image .* \(12, 12, 10, 2\) \(4-D\)"),
    ("t1ce", {"t1ce": good_arrays()["t1ce"][:, :, 0]}, None, r"modality t1ce image .* \(12, 12\) \(2-D\)"),
    ("t1", {"t1": np.zeros((0, 12, 10), np.float32)}, None, r"shape \(0, 12, 10\), an empty volume"),
    ("flair", None, shifted("flair", 0.01), r"modality flair image .* affine .*largest difference 0\.01, allowed 0\.001"),
    ("label", None, shifted("label", 1.0), r"label .*largest difference 1, allowed"),
    ("t2", None, rotated("t2"), r"modality t2 image .* affine"),
    ("t1ce", with_voxel("t1ce", np.nan), None, r"modality t1ce image .* 1 NaN and 0 infinite voxel\(s\), the first at voxel \(1, 2, 3\); every image voxel must be finite"),
    ("flair", with_voxel("flair", -np.inf), None, r"modality flair image .* 0 NaN and 1 infinite voxel\(s\)"),
    ("t2", with_voxel("t2", np.inf, np.float64, at=(11, 11, 9)), None, r"infinite voxel\(s\), the first at voxel \(11, 11, 9\)"),
    ("t1", {"t1": good_arrays()["t1"].astype(np.complex64)}, None, r"voxel type complex64; real numbers are expected"),
]


@pytest.mark.parametrize("role, arrays, affines, message", REFUSED, ids=[f"{r[0]}:{r[3][:30]}" for r in REFUSED])
def test_a_bad_volume_is_refused_naming_subject_file_found_and_allowed(tmp_path, role, arrays, affines, message):
    entry = write_subject(tmp_path, arrays, affines)
    with pytest.raises(VolumeCheckError, match=message) as raised:
        check_brats_subject(entry)
    text = str(raised.value)
    assert text.startswith("subject BraTS2021_00007: ")
    assert path_of(entry, role) in text
    assert isinstance(raised.value, DataListError)  # what the executor, the CLI and the install catch


def test_a_truncated_nii_gz_is_named(tmp_path):
    entry = write_subject(tmp_path)
    path = entry["image"][2]
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(VolumeCheckError, match=rf"subject BraTS2021_00007: cannot read .*modality t2 image {re.escape(path)}: "):
        check_brats_subject(entry)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a nifti file at all", gzip.compress(b"\0" * 100)],
    ids=["empty", "text", "gzip-of-nothing"],
)
def test_a_file_that_is_not_nifti_is_named(tmp_path, content):
    entry = write_subject(tmp_path)
    with open(entry["label"], "wb") as f:
        f.write(content)
    with pytest.raises(VolumeCheckError, match=rf"cannot read .*label {re.escape(entry['label'])}: \w+"):
        check_brats_subject(entry)


def test_a_missing_file_is_named(tmp_path):
    entry = write_subject(tmp_path)
    os.remove(entry["image"][3])
    with pytest.raises(VolumeCheckError, match=rf"cannot read modality flair image {re.escape(entry['image'][3])}"):
        check_brats_subject(entry)


@pytest.mark.parametrize(
    "arrays, affines",
    [
        (float_label([0.0, 1.0, 2.0, 4.0]), None),  # float labels, integer-valued: what many tools write
        ({"label": good_arrays()["label"].astype(np.int16)}, None),
        ({"label": np.zeros(SHAPE, np.uint8)}, None),  # no tumour at all
        ({m: np.rint(good_arrays()[m]).astype(np.int16) for m in MODALITIES}, None),  # integer images
        (None, shifted("flair", AFFINE_TOLERANCE / 10)),  # float32 round-off between tools
    ],
    ids=["float-label", "int16-label", "empty-label", "int16-images", "affine-within-tolerance"],
)
def test_good_subjects_pass(tmp_path, arrays, affines):
    check_brats_subject(write_subject(tmp_path, arrays, affines))


def test_the_subject_id_of_the_datalist_is_used_when_given(tmp_path):
    entry = write_subject(tmp_path, with_voxel("label", 3))
    with pytest.raises(VolumeCheckError, match=r"^subject case-17: label"):
        check_brats_subject({**entry, "subject": "case-17"})


def test_headers_are_compared_before_any_voxel_is_read(tmp_path, monkeypatch):
    entry = write_subject(tmp_path, {"label": good_arrays()["label"][:, :, :9]})
    read = []
    monkeypatch.setattr(checks, "_voxels", lambda role, path, subject, image: read.append(path))
    with pytest.raises(VolumeCheckError, match="shape"):
        check_brats_subject(entry)
    assert read == []


def test_every_subject_of_a_list_is_checked_and_the_first_bad_one_named(tmp_path):
    good = write_subject(tmp_path, sid="S1")
    bad = write_subject(tmp_path, with_voxel("t1", np.nan), sid="S2")
    worse = write_subject(tmp_path, with_voxel("label", 9), sid="S3")
    with pytest.raises(VolumeCheckError, match=rf"^subject S2: modality t1 image {re.escape(bad['image'][0])}"):
        check_brats_subjects([good, bad, worse])


def test_a_file_that_passed_is_not_read_again_until_it_changes(tmp_path, monkeypatch):
    entry = write_subject(tmp_path)
    loads = []
    real_load = checks._load
    monkeypatch.setattr(checks, "_load", lambda role, path, subject: loads.append(path) or real_load(role, path, subject))
    check_brats_subject(entry)
    assert len(loads) == 5
    check_brats_subjects([entry, entry])  # the site-only trainer, a rebuilt trainer: nothing read
    assert len(loads) == 5

    nan = good_arrays()["t2"]
    nan[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, AFFINE), entry["image"][2])
    stat = os.stat(entry["image"][2])
    os.utime(entry["image"][2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(VolumeCheckError, match="NaN"):
        check_brats_subject(entry)
    assert loads[5:] == [entry["image"][2]]


def test_a_failed_file_is_checked_again(tmp_path):
    entry = write_subject(tmp_path, with_voxel("label", 3))
    for _ in range(2):
        with pytest.raises(VolumeCheckError, match="outside the BraTS labels"):
            check_brats_subject(entry)


def test_a_subject_without_one_image_per_modality_is_refused(tmp_path):
    entry = write_subject(tmp_path)
    with pytest.raises(VolumeCheckError, match=r"subject BraTS2021_00007: 3 image\(s\) .*_t1.nii.gz.*; one per modality"):
        check_brats_subject({**entry, "image": entry["image"][:3]})


# label conventions and 4-D images (BraTS 2023, MSD Task01) -----------------------------------


@pytest.mark.parametrize(
    "convention, value, accepted",
    [
        ("brats2023", 3, True),
        ("brats2023", 4, False),
        ("msd_task01", 3, True),
        ("msd_task01", 4, False),
        ("brats2021", 4, True),
        ("brats2021", 3, False),
    ],
)
def test_the_label_values_allowed_are_the_entrys_convention(tmp_path, convention, value, accepted):
    label = good_arrays()["label"]
    label[label == 4] = 0
    label[5, 5, 5] = value
    entry = {**write_subject(tmp_path, {"label": label}), "label_convention": convention}
    if accepted:
        check_brats_subject(entry)
    else:
        with pytest.raises(VolumeCheckError, match=rf"value\(s\) \[{value}\] in 1 voxel\(s\), outside the .* labels .*\(label_convention '{convention}'\)"):
            check_brats_subject(entry)


def test_a_label_that_passed_under_one_convention_is_checked_again_under_another(tmp_path):
    label = good_arrays()["label"]
    label[label == 4] = 3
    entry = write_subject(tmp_path, {"label": label})
    check_brats_subject({**entry, "label_convention": "brats2023"})
    with pytest.raises(VolumeCheckError, match=r"value\(s\) \[3\] in 1 voxel\(s\), outside the BraTS labels \[0, 1, 2, 4\]"):
        check_brats_subject({**entry, "label_convention": "brats2021"})


@pytest.mark.parametrize("bad", ["brats2099", 4, None])
def test_an_unknown_convention_is_refused_naming_the_subject(tmp_path, bad):
    entry = write_subject(tmp_path)
    with pytest.raises(VolumeCheckError, match=r"subject BraTS2021_00007: label_convention must be one of"):
        check_brats_subject({**entry, "label_convention": bad})


def write_4d_subject(root, channels=4, image_shape=None):
    image = np.random.default_rng(1).uniform(0, 9, image_shape or SHAPE + (channels,)).astype(np.float32)
    label = good_arrays()["label"]
    label[label == 4] = 3
    os.makedirs(os.path.join(str(root), "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(str(root), "labelsTr"), exist_ok=True)
    paths = [os.path.join(str(root), d, "BRATS_001.nii.gz") for d in ("imagesTr", "labelsTr")]
    nib.save(nib.Nifti1Image(image, AFFINE), paths[0])
    nib.save(nib.Nifti1Image(label, AFFINE), paths[1])
    return {"image": paths[0], "label": paths[1], "label_convention": "msd_task01", "channel_order": [1, 2, 3, 0], "subject": "BRATS_001"}


def test_a_4d_msd_image_is_accepted(tmp_path):
    check_brats_subject(write_4d_subject(tmp_path))


@pytest.mark.parametrize(
    "channels, image_shape, message",
    [
        (3, None, r"subject BRATS_001: 4-D image \(4 channels\) .*BRATS_001.nii.gz has shape \(12, 12, 10, 3\); a 4-D image \(x, y, z, 4\)"),
        (4, SHAPE, r"has shape \(12, 12, 10\); a 4-D image \(x, y, z, 4\)"),
        (4, (12, 12, 9, 4), r"label .* has shape \(12, 12, 10\), but 4-D image \(4 channels\) .* has \(12, 12, 9, 4\)"),
    ],
)
def test_a_bad_4d_image_is_refused(tmp_path, channels, image_shape, message):
    with pytest.raises(VolumeCheckError, match=message):
        check_brats_subject(write_4d_subject(tmp_path, channels, image_shape))


def test_a_4d_image_with_a_nan_voxel_is_refused(tmp_path):
    entry = write_4d_subject(tmp_path)
    image = np.asanyarray(nib.load(entry["image"]).dataobj).copy()
    image[0, 1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(image, AFFINE), entry["image"])
    with pytest.raises(VolumeCheckError, match=r"4-D image .* 1 NaN and 0 infinite voxel\(s\), the first at voxel \(0, 1, 2, 3\)"):
        check_brats_subject(entry)
