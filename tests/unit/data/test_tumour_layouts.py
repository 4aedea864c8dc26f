"""Each brain-tumour layout detected, counted and turned into a datalist that loads and passes
the volume checks; hostile folders (empty, partial, mixed, mislabelled, escaping dataset.json)
refused naming the folder or file and what was found."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from tumour_layout_fixtures import (
    MSD_LABELS,
    MSD_MODALITY,
    brats2023_subject,
    label_volume,
    legacy_subject,
    msd_task,
    save,
)

from medflare.data.brats_layout import DataListError, load_datalist
from medflare.data.brats_volume_checks import VolumeCheckError, check_brats_subjects, forget_checked_files
from medflare.data.data_root_paths import DataPathError
from medflare.data.tumour_layouts import detect_tumour_layout, write_tumour_datalist


@pytest.fixture(autouse=True)
def _fresh_cache():
    forget_checked_files()
    yield
    forget_checked_files()


def legacy_root(tmp_path):
    """BraTS 2021: 4 labelled, 1 unlabelled, 1 folder missing flair (left out)."""
    root = tmp_path / "BraTS2021_Training_Data"
    for i in range(4):
        legacy_subject(root, f"BraTS2021_{i:05d}")
    legacy_subject(root, "BraTS2021_00099", with_label=False)
    legacy_subject(root, "BraTS2021_00098", modalities=("t1", "t1ce", "t2"))
    return str(root)


def brats2023_root(tmp_path):
    """BraTS 2023: GLI x2, MEN, MET, PED labelled; SSA without label; 6 subjects in all."""
    root = tmp_path / "ASNR-MICCAI-BraTS2023"
    for sid in ("BraTS-GLI-00000-000", "BraTS-GLI-00002-000", "BraTS-MEN-00004-000", "BraTS-MET-00001-000", "BraTS-PED-00010-000"):
        brats2023_subject(root / sid[6:9], sid)
    brats2023_subject(root / "SSA", "BraTS-SSA-00126-000", with_label=False)
    return str(root)


def test_brats_2018_2021_layout_is_detected_and_counted(tmp_path):
    report = detect_tumour_layout(legacy_root(tmp_path))
    assert (report.kind, report.label_convention) == ("brats2018-2021", "brats2021")
    assert (report.subject_count, report.unlabelled_count) == (5, 1)
    assert [os.path.basename(p) for p in report.incomplete] == ["BraTS2021_00098"]
    assert any("miss a modality" in line and "BraTS2021_00098" in line for line in report.summary())


def test_brats_2023_layout_maps_modalities_and_counts_cohorts(tmp_path):
    report = detect_tumour_layout(brats2023_root(tmp_path))
    assert (report.kind, report.label_convention) == ("brats2023", "brats2023")
    assert (report.subject_count, report.unlabelled_count) == (6, 1)
    assert report.cohorts == {"GLI": 2, "MEN": 1, "MET": 1, "PED": 1, "SSA": 1}
    first = report.subjects[0]
    assert first.subject_id == "BraTS-GLI-00000-000"
    # channel order t1, t1ce, t2, flair from t1n, t1c, t2w, t2f
    assert [os.path.basename(p)[-10:] for p in first.images] == ["t1n.nii.gz", "t1c.nii.gz", "t2w.nii.gz", "t2f.nii.gz"]


def test_msd_task01_layout_reads_modality_and_labels_from_dataset_json(tmp_path):
    msd_task(tmp_path, n_train=3, n_test=2)
    report = detect_tumour_layout(str(tmp_path))
    assert (report.kind, report.label_convention) == ("msd_task01", "msd_task01")
    assert (report.subject_count, report.unlabelled_count) == (5, 2)
    assert report.modality == MSD_MODALITY
    assert all(len(s.images) == 1 for s in report.subjects)


@pytest.mark.parametrize("layout", ["legacy", "brats2023", "msd"])
def test_written_datalist_records_the_convention_and_loads_with_it(tmp_path, layout):
    if layout == "legacy":
        root, convention, n_labelled, labels = legacy_root(tmp_path), "brats2021", 4, {"0": "background", "1": "necrotic core", "2": "oedema", "4": "enhancing tumour"}
    elif layout == "brats2023":
        root, convention, n_labelled, labels = brats2023_root(tmp_path), "brats2023", 5, {"0": "background", "1": "necrotic core", "2": "oedema", "3": "enhancing tumour"}
    else:
        msd_task(tmp_path, n_train=3, n_test=2)
        root, convention, n_labelled, labels = str(tmp_path), "msd_task01", 3, MSD_LABELS
    lines = []
    report, datalist, config = write_tumour_datalist(root, val_fraction=0.34, seed=0, log=lines.append)
    assert lines[0].startswith(f"{report.root}: {report.kind} layout, label convention {convention}")
    content = json.loads(open(datalist).read())
    assert content["label_convention"] == convention and content["labels"] == labels and content["layout"] == report.kind
    assert json.loads(open(config).read()) == {"data_root": ".", "datalist": "datalist.json"}
    train, val = load_datalist(datalist, root)
    assert len(train) + len(val) == n_labelled and len(val) == round(0.34 * n_labelled)  # 1, 2, 1
    assert {e["label_convention"] for e in train + val} == {convention}
    if layout == "msd":
        assert all(isinstance(e["image"], str) and e["channel_order"] == [1, 2, 3, 0] for e in train + val)
    else:
        assert all(len(e["image"]) == 4 and "channel_order" not in e for e in train + val)
    check_brats_subjects(train + val)  # the trainer's and site install's checks accept them


def test_an_existing_datalist_is_not_overwritten_without_force(tmp_path):
    root = legacy_root(tmp_path)
    write_tumour_datalist(root)
    with pytest.raises(ValueError, match=r"datalist.json exists; pass force=True"):
        write_tumour_datalist(root)
    _, datalist, _ = write_tumour_datalist(root, out=str(tmp_path / "elsewhere" / "list.json"), force=True)
    config = json.loads(open(tmp_path / "elsewhere" / "data_config.json").read())
    assert config == {"data_root": root, "datalist": "list.json"}
    assert len(load_datalist(datalist, root)[0]) == 3


# labels disagreeing with the layout's convention ----------------------------------------------


def test_a_brats_2021_folder_whose_labels_hold_3_is_refused_naming_file_and_values(tmp_path):
    root = tmp_path / "d"
    legacy_subject(root, "BraTS2021_00000")
    legacy_subject(root, "BraTS2021_00001", label_values=(1, 2, 3))
    with pytest.raises(DataListError, match=r"BraTS2021_00001_seg.nii.gz holds value\(s\) \[3\] outside the brats2021 labels \[0, 1, 2, 4\].*fit \['brats2023', 'msd_task01'\]"):
        write_tumour_datalist(str(root))
    assert not os.path.exists(root / "datalist.json")


def test_a_brats_2023_folder_with_label_4_is_refused(tmp_path):
    root = tmp_path / "d"
    brats2023_subject(root, "BraTS-GLI-00000-000")
    brats2023_subject(root, "BraTS-GLI-00001-000", label_values=(1, 2, 3, 4))  # BraTS 2024's resection cavity
    with pytest.raises(DataListError, match=r"BraTS-GLI-00001-000-seg.nii.gz holds value\(s\) \[4\] outside the brats2023 labels"):
        write_tumour_datalist(str(root))


def test_a_brats2021_datalist_whose_volumes_hold_3_is_refused_by_the_volume_checks(tmp_path):
    root = tmp_path / "d"
    for i in range(2):
        brats2023_subject(root, f"BraTS-GLI-0000{i}-000")
    _, datalist, _ = write_tumour_datalist(str(root))
    content = json.loads(open(datalist).read())
    content["label_convention"], content["labels"] = "brats2021", {"0": "background", "1": "NCR", "2": "ED", "4": "ET"}
    with open(datalist, "w") as f:
        json.dump(content, f)
    train, val = load_datalist(datalist, str(root))
    with pytest.raises(VolumeCheckError, match=r"-seg.nii.gz has value\(s\) \[3\] in 8 voxel\(s\), outside the BraTS labels \[0, 1, 2, 4\]"):
        check_brats_subjects(train + val)


# nothing, several or broken layouts ------------------------------------------------------------


def test_an_empty_folder_is_refused_saying_nothing_was_found(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataListError, match=r"no brain-tumour data layout found in .*empty: found no .nii/.nii.gz files \(1 other file\(s\)\)\. Expected one of"):
        detect_tumour_layout(str(tmp_path / "empty"))
    with pytest.raises(DataListError, match=r"tumour data folder not found: .*nowhere"):
        detect_tumour_layout(str(tmp_path / "nowhere"))


def test_folders_with_some_modalities_only_are_named_with_what_is_missing(tmp_path):
    for i in range(3):
        legacy_subject(tmp_path / "d", f"S{i}", modalities=("t1", "t2"))
    with pytest.raises(DataListError) as err:
        detect_tumour_layout(str(tmp_path / "d"))
    message = str(err.value)
    assert "found 3 folder(s) with .nii/.nii.gz files, names ending in " in message
    assert "*_t1 (3)" in message and "*_seg (3)" in message
    assert "BraTS 2018-2021: no folder has *_t1ce, *_flair" in message


def test_brats_2023_files_missing_a_modality_are_named(tmp_path):
    brats2023_subject(tmp_path / "d", "BraTS-GLI-00000-000", suffixes=("t1n", "t1c", "t2w"))
    with pytest.raises(DataListError, match=r"BraTS 2023: no folder has \*-t2f"):
        detect_tumour_layout(str(tmp_path / "d"))


@pytest.mark.parametrize(
    "second, named",
    [
        ("brats2023", r"brats2018-2021: 2 subject folders such as .*; brats2023: 1 subject folders such as .*BraTS-GLI-00000-000"),
        ("msd", r"brats2018-2021: 2 subject folders .*; msd_task01: .*Task01_BrainTumour/dataset.json"),
    ],
)
def test_a_mixed_layout_is_refused_naming_both(tmp_path, second, named):
    root = tmp_path / "d"
    legacy_subject(root, "BraTS2021_00000")
    legacy_subject(root, "BraTS2021_00001")
    if second == "brats2023":
        brats2023_subject(root, "BraTS-GLI-00000-000")
    else:
        msd_task(root, n_train=2, n_test=0)
    with pytest.raises(DataListError, match=rf"holds more than one tumour data layout: {named}"):
        detect_tumour_layout(str(root))


def test_one_brats_2023_folder_holding_two_subjects_is_refused(tmp_path):
    folder = brats2023_subject(tmp_path / "d", "BraTS-GLI-00000-000")
    save(os.path.join(folder, "BraTS-GLI-00001-000-seg.nii.gz"), label_volume((1,)))
    with pytest.raises(DataListError, match=r"holds the files of several BraTS subjects \['BraTS-GLI-00000-000', 'BraTS-GLI-00001-000'\]"):
        detect_tumour_layout(str(tmp_path / "d"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"modality": None}, r"has no 'modality'"),
        ({"labels": None}, r"has no 'labels'"),
        ({"training": None}, r"has no 'training'"),
        ({"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd"}}, r"'modality' must name 4 channels \['0', '1', '2', '3'\]"),
        ({"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "DWI"}}, r"must name each of \['t1', 't1ce', 't2', 'flair'\] once; not recognised: \['DWI'\]"),
        ({"modality": {"0": "FLAIR", "1": "T1w", "2": "T1w", "3": "T2w"}}, r"must name each of .* once"),
        ({"modality": ["FLAIR", "T1w", "t1gd", "T2w"]}, r"'modality' must be a map"),
        ({"labels": {"0": "background", "1": "tumour"}}, r"the 'labels' map \{'0': 'background', '1': 'tumour'\} matches no known tumour label convention"),
        ({"labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "4": "enhancing tumour"}}, r"matches no known"),
        ({"labels": {"zero": "background"}}, r"'labels' must map integer values to names"),
        ({"training": []}, r"'training' must be a non-empty list"),
        ({"training": ["./imagesTr/BRATS_001.nii.gz"]}, r"training\[0\] must be \{'image': path, 'label': path\}"),
        ({"training": [{"image": "../../../etc/passwd", "label": "./labelsTr/BRATS_001.nii.gz"}]}, r"training\[0\] image: '../../../etc/passwd' resolves to .*, outside the data root"),
        ({"training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "/etc/hostname"}]}, r"training\[0\] label: '/etc/hostname' resolves to /etc/hostname, outside"),
        ({"training": [{"image": "./imagesTr/BRATS_404.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}]}, r"training\[0\] image names a missing file: .*BRATS_404.nii.gz"),
        ({"test": "./imagesTs"}, r"'test' must be a list"),
        ({"test": [3]}, r"test\[0\] must be an image path"),
    ],
)
def test_a_hostile_dataset_json_is_refused_naming_it(tmp_path, overrides, message):
    task = msd_task(tmp_path, n_train=2, n_test=1, **overrides)
    with pytest.raises(DataListError, match=message) as err:
        detect_tumour_layout(str(tmp_path))
    assert os.path.join(task, "dataset.json") in str(err.value)


def test_a_path_escape_in_dataset_json_is_a_data_path_error(tmp_path):
    msd_task(tmp_path, n_train=2, n_test=0, training=[{"image": "../outside.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}])
    save(str(tmp_path / "outside.nii.gz"), np.zeros((2, 2, 2)))
    with pytest.raises(DataPathError, match="outside the data root"):
        detect_tumour_layout(str(tmp_path))


def test_a_dataset_json_that_is_not_json_is_named(tmp_path):
    task = msd_task(tmp_path, n_train=2, n_test=0)
    with open(os.path.join(task, "dataset.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(DataListError, match=r"MSD dataset.json .*dataset.json is not readable JSON"):
        detect_tumour_layout(str(tmp_path))


def test_a_4d_image_with_3_channels_is_refused_before_a_datalist_is_written(tmp_path):
    msd_task(tmp_path, n_train=2, n_test=0, channels=3)
    with pytest.raises(DataListError, match=r"subject BRATS_001: 4-D image .*BRATS_001.nii.gz has shape \(12, 12, 12, 3\); \(x, y, z, 4\)"):
        write_tumour_datalist(str(tmp_path))
    assert not os.path.exists(tmp_path / "datalist.json")


def test_msd_labels_holding_4_are_refused(tmp_path):
    msd_task(tmp_path, n_train=2, n_test=0, label_values=(1, 2, 4))
    with pytest.raises(DataListError, match=r"holds value\(s\) \[4\] outside the msd_task01 labels \[0, 1, 2, 3\].*fit \['brats2021'\]"):
        write_tumour_datalist(str(tmp_path))


def test_msd_labels_spelled_otherwise_are_matched_case_insensitively(tmp_path):
    msd_task(tmp_path, labels={"0": "Background", "1": "EDEMA", "2": "Non-Enhancing Tumor", "3": "Enhancing-Tumor"})
    assert detect_tumour_layout(str(tmp_path)).label_convention == "msd_task01"


def test_the_seen_line_of_a_found_layout_carries_no_refusal_hints(tmp_path):
    report = detect_tumour_layout(brats2023_root(tmp_path))
    assert report.seen.startswith("found 6 folder(s) with .nii/.nii.gz files, names ending in ") and "no folder has" not in report.seen
