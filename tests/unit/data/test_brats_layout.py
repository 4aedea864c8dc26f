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


# label conventions and 4-D images -------------------------------------------------------------

BRATS2021_LABELS = {"0": "background", "1": "necrotic core", "2": "oedema", "4": "enhancing tumour"}


def test_make_datalist_records_the_convention_and_its_labels(tmp_path):
    root = str(tmp_path)
    for i in range(3):
        _subject(root, f"S{i}")
    old = make_datalist(find_brats_subjects(root), base_dir=root)
    assert (old["label_convention"], old["labels"]) == ("brats2021", BRATS2021_LABELS)
    new = make_datalist(find_brats_subjects(root), base_dir=root, label_convention="brats2023")
    assert new["labels"] == {"0": "background", "1": "necrotic core", "2": "oedema", "3": "enhancing tumour"}
    path = tmp_path / "list.json"
    path.write_text(json.dumps(new))
    train, val = load_datalist(str(path), root)
    assert {e["label_convention"] for e in train + val} == {"brats2023"}


def test_make_datalist_writes_one_path_for_a_4d_image(tmp_path):
    from medflare.data.brats_layout import BratsSubject

    subjects = [BratsSubject(f"B{i}", (str(tmp_path / f"B{i}.nii.gz"),), str(tmp_path / f"B{i}_seg.nii.gz")) for i in range(2)]
    content = make_datalist(subjects, str(tmp_path), label_convention="msd_task01", modality={"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"})
    assert {e["image"] for e in content["training"] + content["validation"]} == {"B0.nii.gz", "B1.nii.gz"}
    assert content["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"val_fraction": True}, r"val_fraction must be a number in \(0, 1\), got True"),
        ({"val_fraction": float("nan")}, r"val_fraction must be a number in \(0, 1\), got nan"),
        ({"val_fraction": 1.0}, r"got 1.0"),
        ({"val_fraction": "0.2"}, r"got '0.2'"),
        ({"seed": -1}, r"seed must be an int >= 0, got -1"),
        ({"seed": True}, r"seed must be an int >= 0, got True"),
        ({"seed": 1.5}, r"got 1.5"),
        ({"label_convention": "BraTS2021"}, r"label_convention must be one of \['brats2021', 'brats2023', 'msd_task01'\], got 'BraTS2021'"),
        ({"label_convention": None}, r"label_convention must be one of"),
    ],
)
def test_make_datalist_refuses_bad_arguments_naming_them(tmp_path, kwargs, message):
    for i in range(3):
        _subject(str(tmp_path), f"S{i}")
    with pytest.raises(ValueError, match=message):
        make_datalist(find_brats_subjects(str(tmp_path)), base_dir=str(tmp_path), **kwargs)


def test_make_datalist_refuses_mixed_image_forms_and_a_4d_image_without_modality(tmp_path):
    from medflare.data.brats_layout import BratsSubject

    four = BratsSubject("A", tuple(str(tmp_path / f"A_{m}.nii.gz") for m in MODALITIES), str(tmp_path / "A_seg.nii.gz"))
    one = BratsSubject("B", (str(tmp_path / "B.nii.gz"),), str(tmp_path / "B_seg.nii.gz"))
    with pytest.raises(ValueError, match=r"all have 4 image paths or all one 4-D image path, got \[1, 4\]"):
        make_datalist([four, one], str(tmp_path))
    with pytest.raises(ValueError, match=r"modality must name the channels of a 4-D image, got None"):
        make_datalist([one, one], str(tmp_path), label_convention="msd_task01")
    with pytest.raises(ValueError, match=r"modality: .*must name 4 channels"):
        make_datalist([one, one], str(tmp_path), modality={"0": "FLAIR"})


@pytest.mark.parametrize(
    "top, convention",
    [
        ({}, "brats2021"),  # a datalist written before conventions were recorded
        ({"labels": BRATS2021_LABELS}, "brats2021"),
        ({"labels": {"0": "Background", "1": "NCR", "2": "SNFH", "3": "ET"}}, "brats2023"),
        ({"label_convention": "msd_task01"}, "msd_task01"),
        ({"label_convention": "brats2023", "labels": {"0": "background", "1": "NCR", "2": "ED", "3": "ET"}}, "brats2023"),
    ],
)
def test_each_loaded_entry_carries_the_datalists_convention(tmp_path, top, convention):
    _subject(str(tmp_path), "S0")
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({**top, "training": [_entry("S0/S0")], "validation": [_entry("S0/S0")]}))
    train, val = load_datalist(str(path), str(tmp_path))
    assert [e["label_convention"] for e in train + val] == [convention, convention]
    assert set(train[0]) == {"image", "label", "label_convention"}


@pytest.mark.parametrize(
    "top, message",
    [
        ({"labels": {"0": "background", "1": "tumour"}}, r"the 'labels' map \{'0': 'background', '1': 'tumour'\} matches no known tumour label convention"),
        ({"label_convention": "brats2099"}, r"label_convention must be one of .*got 'brats2099'"),
        ({"label_convention": "brats2023", "labels": BRATS2021_LABELS}, r"'label_convention' is 'brats2023' but the 'labels' map .* is that of 'brats2021'"),
        ({"labels": "brats2021"}, r"'labels' must be a non-empty map"),
    ],
)
def test_a_datalist_with_an_unknown_or_contradicting_convention_is_refused_naming_it(tmp_path, top, message):
    _subject(str(tmp_path), "S0")
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({**top, "training": [_entry("S0/S0")], "validation": [_entry("S0/S0")]}))
    with pytest.raises(DataListError, match=message) as err:
        load_datalist(str(path), str(tmp_path))
    assert str(err.value).startswith(f"datalist {path}: ")


def test_a_4d_entry_gets_the_channel_order_of_the_datalists_modality_map(tmp_path):
    for name in ("imagesTr/B1.nii.gz", "labelsTr/B1.nii.gz"):
        _touch(str(tmp_path / name))
    entry = {"image": "imagesTr/B1.nii.gz", "label": "labelsTr/B1.nii.gz"}
    path = tmp_path / "datalist.json"
    content = {"label_convention": "msd_task01", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}, "training": [entry], "validation": [entry]}
    path.write_text(json.dumps(content))
    train, _ = load_datalist(str(path), str(tmp_path))
    assert train[0] == {
        "image": str(tmp_path / "imagesTr/B1.nii.gz"), "label": str(tmp_path / "labelsTr/B1.nii.gz"),
        "label_convention": "msd_task01", "channel_order": [1, 2, 3, 0],
    }
    for modality, message in ((None, r"'modality' must be a map"), ({"0": "T1", "1": "T1", "2": "T2", "3": "FLAIR"}, "once")):
        path.write_text(json.dumps({**content, "modality": modality}))
        with pytest.raises(DataListError, match=message):
            load_datalist(str(path), str(tmp_path))
    path.write_text(json.dumps({**content, "training": [{**entry, "image": "../../etc/passwd"}]}))
    with pytest.raises(DataPathError, match=r"training\[0\] image: '../../etc/passwd' resolves to"):
        load_datalist(str(path), str(tmp_path))
