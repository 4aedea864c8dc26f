import json
import os

import pytest

from medflare.data.brats_layout import (
    MODALITIES,
    DataListError,
    find_brats_subjects,
    load_datalist,
    make_datalist,
)
from medflare.data.data_root_paths import DataPathError


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()


def _subject(root, sid, ext=".nii.gz", label_name=None, with_label=True):
    folder = os.path.join(root, sid)
    for m in MODALITIES:
        _touch(os.path.join(folder, f"{sid}_{m}{ext}"))
    if with_label:
        _touch(os.path.join(folder, label_name or f"{sid}_seg{ext}"))
    return folder


def test_reads_brats_2018_2019_hgg_lgg_layout(tmp_path):
    root = tmp_path / "MICCAI_BraTS_2019_Data_Training"
    _subject(str(root / "HGG"), "BraTS19_2013_2_1")
    _subject(str(root / "LGG"), "BraTS19_2013_0_1")
    subjects = find_brats_subjects(str(root))
    assert [s.subject_id for s in subjects] == ["BraTS19_2013_0_1", "BraTS19_2013_2_1"]
    assert [os.path.basename(p) for p in subjects[0].images] == [f"BraTS19_2013_0_1_{m}.nii.gz" for m in MODALITIES]


def test_reads_brats_2020_uncompressed_with_misnamed_label(tmp_path):
    root = str(tmp_path / "MICCAI_BraTS2020_TrainingData")
    _subject(root, "BraTS20_Training_001", ext=".nii")
    _subject(root, "BraTS20_Training_355", ext=".nii", label_name="W39_1998.09.19_Segm.nii")
    subjects = find_brats_subjects(root)
    assert len(subjects) == 2
    assert subjects[1].label.endswith("W39_1998.09.19_Segm.nii")
    assert subjects[0].images[1].endswith("BraTS20_Training_001_t1ce.nii")


def test_reads_brats_2021_layout_and_validation_without_labels(tmp_path):
    root = str(tmp_path / "RSNA_ASNR_MICCAI_BraTS2021")
    _subject(root, "BraTS2021_00000")
    _subject(root, "BraTS2021_00002", with_label=False)
    _touch(os.path.join(root, "BraTS2021_00003", "BraTS2021_00003_t1.nii.gz"))  # incomplete: not a subject
    subjects = find_brats_subjects(root)
    assert [(s.subject_id, s.label is not None) for s in subjects] == [
        ("BraTS2021_00000", True),
        ("BraTS2021_00002", False),
    ]


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DataListError, match="not found: .*nowhere"):
        find_brats_subjects(str(tmp_path / "nowhere"))


def test_datalist_split_is_seeded_relative_and_skips_unlabelled(tmp_path):
    root = str(tmp_path)
    for i in range(10):
        _subject(root, f"BraTS2021_{i:05d}")
    _subject(root, "BraTS2021_99999", with_label=False)
    subjects = find_brats_subjects(root)
    a = make_datalist(subjects, base_dir=root, val_fraction=0.2, seed=1)
    b = make_datalist(subjects, base_dir=root, val_fraction=0.2, seed=1)
    c = make_datalist(subjects, base_dir=root, val_fraction=0.2, seed=2)
    assert a == b and a["validation"] != c["validation"]
    assert len(a["training"]) == 8 and len(a["validation"]) == 2
    names = {e["subject"] for e in a["training"] + a["validation"]}
    assert "BraTS2021_99999" not in names and len(names) == 10
    assert all(not os.path.isabs(p) for e in a["training"] for p in e["image"] + [e["label"]])


def test_datalist_needs_two_labelled_subjects(tmp_path):
    _subject(str(tmp_path), "BraTS2021_00000")
    with pytest.raises(DataListError, match="at least 2 labelled"):
        make_datalist(find_brats_subjects(str(tmp_path)), base_dir=str(tmp_path))


def test_load_datalist_resolves_against_root(tmp_path):
    root = str(tmp_path)
    for i in range(3):
        _subject(root, f"S{i}")
    path = tmp_path / "list.json"
    path.write_text(json.dumps(make_datalist(find_brats_subjects(root), base_dir=root, val_fraction=0.34)))
    train, val = load_datalist(str(path), root)
    assert len(train) == 2 and len(val) == 1
    assert all(os.path.isabs(p) and os.path.exists(p) for e in train + val for p in e["image"] + [e["label"]])


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not readable JSON"),
        ("[]", "must hold a JSON object"),
        (json.dumps({"training": []}), "non-empty list under 'training'"),
        (json.dumps({"training": [{"image": ["a"], "label": "b"}], "validation": [1]}), r"training\[0\] must have"),
    ],
)
def test_malformed_datalist_is_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "datalist.json"
    path.write_text(content)
    with pytest.raises(DataListError, match=message) as err:
        load_datalist(str(path), str(tmp_path))
    assert str(path) in str(err.value)


def test_missing_datalist_and_missing_image_are_named(tmp_path):
    with pytest.raises(DataListError, match="datalist not found: .*absent.json"):
        load_datalist(str(tmp_path / "absent.json"), str(tmp_path))
    entry = {"image": [f"x_{m}.nii.gz" for m in MODALITIES], "label": "x_seg.nii.gz"}
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": [entry], "validation": [entry]}))
    with pytest.raises(DataListError, match="missing file: .*x_t1.nii.gz"):
        load_datalist(str(path), str(tmp_path))


def _entry(prefix):
    return {"image": [f"{prefix}_{m}.nii.gz" for m in MODALITIES], "label": f"{prefix}_seg.nii.gz"}


def _write_datalist(path, training, validation=None):
    path.write_text(json.dumps({"training": training, "validation": [_entry("S0/S0")] if validation is None else validation}))
    return str(path)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"label": "../../etc/passwd"}, r"training\[0\] label: '../../etc/passwd' resolves to /.*/etc/passwd, outside"),
        ({"label": "../" * 30 + "etc/passwd"}, r"training\[0\] label: '(\.\./)+etc/passwd' resolves to /etc/passwd, outside"),
        ({"label": "/etc/passwd"}, r"training\[0\] label: '/etc/passwd' resolves to /etc/passwd"),
        ({"image": ["S0/S0_t1.nii.gz", "../../etc/hosts", "S0/S0_t2.nii.gz", "S0/S0_flair.nii.gz"]}, r"training\[0\] image t1ce: '../../etc/hosts'"),
        ({"image": ["S0/../../S0_t1.nii.gz", "S0/S0_t1ce.nii.gz", "S0/S0_t2.nii.gz", "S0/S0_flair.nii.gz"]}, r"training\[0\] image t1: "),
        ({"label": ""}, r"training\[0\] label: a path must be a non-empty string, got ''"),
    ],
)
def test_a_datalist_path_leaving_the_data_root_is_refused_naming_the_entry(tmp_path, change, named):
    root = tmp_path / "data"
    _subject(str(root), "S0")
    datalist = _write_datalist(root / "datalist.json", [{**_entry("S0/S0"), **change}])
    with pytest.raises(DataPathError, match=named) as err:
        load_datalist(datalist, str(root))
    assert str(err.value).startswith(f"datalist {datalist}: ")


def test_a_symlink_out_of_the_data_root_is_refused_even_when_the_file_exists(tmp_path):
    root = tmp_path / "data"
    _subject(str(root), "S0")
    elsewhere = tmp_path / "elsewhere_seg.nii.gz"
    elsewhere.write_bytes(b"")
    os.remove(root / "S0" / "S0_seg.nii.gz")
    (root / "S0" / "S0_seg.nii.gz").symlink_to(elsewhere)
    datalist = _write_datalist(root / "datalist.json", [_entry("S0/S0")])
    with pytest.raises(DataPathError, match=rf"training\[0\] label: 'S0/S0_seg.nii.gz' resolves to {elsewhere}"):
        load_datalist(datalist, str(root))


@pytest.mark.parametrize(
    "training, validation, message",
    [
        ([{"image": _entry("S0/S0")["image"]}], None, r"training\[0\] must have 'image' .* and 'label'"),
        ([{**_entry("S0/S0"), "label": None}], None, r"training\[0\] must have"),
        ([_entry("S0/S0")], [{"image": _entry("S0/S0")["image"][:3], "label": "S0/S0_seg.nii.gz"}], r"validation\[0\] must have 'image' \(a list of 4"),
        ([], None, "needs a non-empty list under 'training'"),
        ([_entry("S0/S0")], [], "needs a non-empty list under 'validation'"),
        (["S0/S0_t1.nii.gz"], None, r"training\[0\] must have"),
    ],
    ids=["no-label", "null-label", "three-modalities", "empty-training", "empty-validation", "a-string"],
)
def test_incomplete_entries_and_empty_lists_are_refused_naming_the_file(tmp_path, training, validation, message):
    _subject(str(tmp_path), "S0")
    datalist = _write_datalist(tmp_path / "datalist.json", training, validation)
    with pytest.raises(DataListError, match=message) as err:
        load_datalist(datalist, str(tmp_path))
    assert datalist in str(err.value)
