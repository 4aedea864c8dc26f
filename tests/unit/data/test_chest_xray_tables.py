"""CheXpert and MIMIC-CXR-JPG tables read as a site ships them: label policies, patient splits, views."""

from __future__ import annotations

import csv
import os
import re

import numpy as np
import pytest
from PIL import Image

from medflare.data.chest_xray_options import CHEXPERT_OBSERVATIONS, ChestXrayTableOptions, split_test_patients
from medflare.data.chest_xray_tables import detect_table_format, load_site_table
from medflare.data.data_errors import DataListError
from medflare.data.data_root_paths import DataPathError
from medflare.data.outcome_table import IGNORE_LABEL, load_outcome_table

CARDIO, EDEMA = "Cardiomegaly", "Edema"
CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS]


def jpg(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.tile(np.arange(16, dtype=np.uint8) * 15, (16, 1))).save(path)


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


# (patient, study, view file, Frontal/Lateral, AP/PA, Sex, Age, Cardiomegaly, Edema); "" is blank
CHEXPERT_TRAIN = [
    (1, 1, 1, "Frontal", "PA", "Male", 68, "1.0", "-1.0"),
    (1, 1, 2, "Lateral", "", "Male", 68, "1.0", "-1.0"),
    (1, 2, 1, "Frontal", "AP", "Male", 69, "-1.0", ""),
    (2, 1, 1, "Frontal", "AP", "Female", 87, "0.0", "1.0"),
    (2, 1, 2, "Lateral", "", "Female", 87, "0.0", "1.0"),
    (3, 1, 1, "Frontal", "PA", "Female", 41, "", "0.0"),
    (3, 2, 1, "Frontal", "PA", "Female", 42, "-1.0", "-1.0"),
    (4, 1, 1, "Frontal", "AP", "Male", 55, "1.0", ""),
    (4, 1, 2, "Lateral", "", "Male", 55, "1.0", ""),
    (5, 1, 1, "Frontal", "PA", "Female", 30, "", ""),
    (5, 1, 2, "Lateral", "", "Female", 30, "-1.0", "0.0"),
    (5, 2, 1, "Frontal", "AP", "Female", 31, "0.0", "-1.0"),
]
CHEXPERT_VALID = [
    (64541, 1, 1, "Frontal", "PA", "Male", 73, "1.0", "0.0"),
    (64541, 1, 2, "Lateral", "", "Male", 73, "1.0", "0.0"),
    (64542, 1, 1, "Frontal", "AP", "Female", 70, "0.0", "1.0"),
]


def chexpert_rows(rows, folder):
    out = []
    for patient, study, view, orientation, appa, sex, age, cardio, edema in rows:
        path = f"CheXpert-v1.0-small/{folder}/patient{patient:05d}/study{study}/view{view}_{orientation.lower()}.jpg"
        labels = {CARDIO: cardio, EDEMA: edema}
        out.append([path, sex, age, orientation, appa, *(labels.get(o, "") for o in CHEXPERT_OBSERVATIONS)])
    return out


def make_chexpert(root, valid=True, train_rows=None, valid_rows=None):
    """``root`` holds CheXpert-v1.0-small/{train,valid}.csv and their 16x16 JPGs."""
    folder = root / "CheXpert-v1.0-small"
    folder.mkdir(parents=True)
    train = chexpert_rows(CHEXPERT_TRAIN, "train") if train_rows is None else train_rows
    write_csv(folder / "train.csv", CHEXPERT_HEADER, train)
    tables = [train]
    if valid:
        rows = chexpert_rows(CHEXPERT_VALID, "valid") if valid_rows is None else valid_rows
        write_csv(folder / "valid.csv", CHEXPERT_HEADER, rows)
        tables.append(rows)
    for rows in tables:
        for row in rows:
            if not row[0].startswith(("/", "..")):
                jpg(root / row[0])
    return str(folder / "train.csv")


def load(table, root, labels=(CARDIO,), clinical=(), image="image", **options):
    return load_site_table(table, str(root), list(clinical), list(labels), image, ChestXrayTableOptions(**options))


def labels_of(site, split, k=0):
    return [c.labels[k] for c in site.cases[split]]


# --- CheXpert -------------------------------------------------------------------------------


# Cardiomegaly of the 8 frontal training images in file order: 1, -1, 0, blank, -1, 1, blank, 0
@pytest.mark.parametrize(
    "policy, blank, expected",
    [
        ("u_ones", "negative", [1, 1, 0, 0, 1, 1, 0, 0]),
        ("u_zeros", "negative", [1, 0, 0, 0, 0, 1, 0, 0]),
        ("ignore", "negative", [1, 0, 0, 1, 0, 0]),  # the two uncertain cases carry no label: dropped
        ("ignore", "ignore", [1, 0, 1, 0]),
        ("u_ones", "ignore", [1, 1, 0, 1, 1, 0]),
    ],
)
def test_chexpert_labels_follow_the_policy(tmp_path, policy, blank, expected):
    site = load(make_chexpert(tmp_path), tmp_path, label_policy=policy, blank_labels=blank)
    assert site.table_format == "chexpert"
    assert labels_of(site, "train") == expected
    assert labels_of(site, "test") == [1, 0]  # valid.csv's two frontal images
    assert site.counts["train"]["rows"] == 12 and site.counts["train"]["views"] == 8
    assert site.counts["train"]["labelled"] == len(expected)


def test_chexpert_with_two_labels_keeps_partly_ignored_cases_marked(tmp_path):
    site = load(make_chexpert(tmp_path), tmp_path, labels=(CARDIO, EDEMA), label_policy="ignore")
    # p1s1 (1, -1), p1s2 (-1, 0), p2 (0, 1), p3s1 (0, 0), p3s2 (-1, -1) dropped, p4 (1, 0), p5s1 (0, 0), p5s2 (0, -1)
    assert [c.labels for c in site.cases["train"]] == [(1, -1), (-1, 0), (0, 1), (0, 0), (1, 0), (0, 0), (0, -1)]
    assert IGNORE_LABEL == -1


def test_chexpert_cases_carry_patient_image_and_clinical_values(tmp_path):
    site = load(make_chexpert(tmp_path), tmp_path, clinical=("Age", "Sex"), label_policy="u_ones")
    first = site.cases["train"][0]
    assert first.case_id == "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    assert first.patient_id == "patient00001"
    assert first.image == os.path.join(str(tmp_path), first.case_id) and os.path.isfile(first.image)
    assert [c.clinical for c in site.cases["train"][:4]] == [(68.0, 0.0), (69.0, 0.0), (87.0, 1.0), (41.0, 1.0)]  # Male 0, Female 1
    assert [c.clinical for c in site.cases["test"]] == [(73.0, 0.0), (70.0, 1.0)]


def test_chexpert_valid_csv_is_the_test_split_and_patients_stay_apart(tmp_path):
    site = load(make_chexpert(tmp_path), tmp_path, label_policy="u_ones", views="all")
    train = {c.patient_id for c in site.cases["train"]}
    test = {c.patient_id for c in site.cases["test"]}
    assert train == {f"patient0000{k}" for k in range(1, 6)} and test == {"patient64541", "patient64542"}
    assert len(site.cases["train"]) == 12 and len(site.cases["test"]) == 3
    assert "train.csv / valid.csv" in site.description


@pytest.mark.parametrize(
    "views, train, test",
    [(None, 8, 2), ("all", 12, 3), (["PA"], 4, 1), (["ap"], 4, 1), (["LATERAL"], 4, 1), (["PA", "AP"], 8, 2)],
)
def test_chexpert_view_filter_counts(tmp_path, views, train, test):
    site = load(make_chexpert(tmp_path), tmp_path, label_policy="u_ones", views=views)
    assert (len(site.cases["train"]), len(site.cases["test"])) == (train, test)


def test_without_valid_csv_the_split_is_seeded_by_patient(tmp_path):
    table = make_chexpert(tmp_path, valid=False)
    site = load(table, tmp_path, label_policy="u_ones", views="all", test_fraction=0.4, split_seed=3)
    train = {c.patient_id for c in site.cases["train"]}
    test = {c.patient_id for c in site.cases["test"]}
    assert not train & test and len(test) == 2 and len(train | test) == 5  # round(0.4 * 5) patients
    assert len(site.cases["train"]) + len(site.cases["test"]) == 12  # every image of a patient on its side
    again = load(table, tmp_path, label_policy="u_ones", views="all", test_fraction=0.4, split_seed=3)
    assert [c.case_id for c in again.cases["test"]] == [c.case_id for c in site.cases["test"]]
    assert "split_seed 3" in site.description


def test_the_patient_split_rule_by_hand():
    patients = ["b", "a", "c", "a", "d"]
    # sorted a, b, c, d; default_rng(0).permutation(4) is [2, 0, 1, 3] -> the first round(0.5 * 4) = 2: c, a
    assert list(np.random.default_rng(0).permutation(4)) == [2, 0, 1, 3]
    assert split_test_patients(patients, 0.5, 0) == {"c", "a"}
    assert len(split_test_patients(patients, 0.01, 0)) == 1  # at least one test patient
    assert len(split_test_patients(patients, 0.99, 0)) == 3  # at least one training patient
    with pytest.raises(ValueError, match="at least 2 patients, got 1"):
        split_test_patients(["a", "a"], 0.5, 0)


def test_a_folder_datalist_finds_train_csv(tmp_path):
    make_chexpert(tmp_path)
    folder = str(tmp_path / "CheXpert-v1.0-small")
    assert detect_table_format(folder) == ("chexpert", os.path.join(folder, "train.csv"))
    assert len(load(folder, tmp_path, label_policy="u_zeros").cases["train"]) == 8


def replace_cell(rows, index, column, value):
    rows = [list(r) for r in rows]
    rows[index][CHEXPERT_HEADER.index(column)] = value
    return rows


TRAIN = chexpert_rows(CHEXPERT_TRAIN, "train")


@pytest.mark.parametrize(
    "rows, message",
    [
        (replace_cell(TRAIN, 2, CARDIO, "2.0"), "train.csv line 4: column 'Cardiomegaly' must be 1.0, 0.0, -1.0 (uncertain) or blank (not mentioned), got '2.0'"),
        (replace_cell(TRAIN, 0, CARDIO, "yes"), "train.csv line 2: column 'Cardiomegaly' must be 1.0, 0.0, -1.0 (uncertain) or blank (not mentioned), got 'yes'"),
        (replace_cell(TRAIN, 0, CARDIO, "nan"), "got 'nan'"),
        (replace_cell(TRAIN, 3, "Frontal/Lateral", "Oblique"), "train.csv line 5: column 'Frontal/Lateral' must be 'Frontal' or 'Lateral', got 'Oblique'"),
        (replace_cell(TRAIN, 1, "Path", "CheXpert-v1.0-small/train/study1/view2.jpg"), "train.csv line 3: column 'Path' must name one patientNNNNN folder"),
        (replace_cell(TRAIN, 1, "Path", TRAIN[0][0]), "train.csv line 3: image 'CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg' is listed twice (first at"),
        (TRAIN + [TRAIN[0][:5]], "train.csv line 14: 19 columns in the header, a different number in this row"),
    ],
    ids=["label-2.0", "label-yes", "label-nan", "orientation", "no-patient", "duplicate-path", "ragged-row"],
)
def test_bad_chexpert_rows_name_file_line_and_column(tmp_path, rows, message):
    table = make_chexpert(tmp_path, train_rows=rows)
    with pytest.raises(DataListError) as raised:
        load(table, tmp_path, label_policy="u_ones")
    assert message in str(raised.value) and table in str(raised.value)


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("Sex", "Unknown", "line 2: column 'Sex' must be one of ['Male', 'Female'] to be a clinical input, got 'Unknown'"),
        ("Age", "nan", "line 2: column 'Age' must be a finite number >= 0, got 'nan'"),
        ("Age", "-3", "line 2: column 'Age' must be a finite number >= 0, got '-3'"),
        ("Age", "old", "line 2: column 'Age' is not a number: 'old'"),
    ],
)
def test_bad_clinical_values_name_the_line(tmp_path, column, value, message):
    table = make_chexpert(tmp_path, train_rows=replace_cell(TRAIN, 0, column, value))
    with pytest.raises(DataListError, match=re.escape(message)):
        load(table, tmp_path, clinical=("Age", "Sex"), label_policy="u_ones")


def test_a_patient_in_train_and_valid_is_refused(tmp_path):
    valid = chexpert_rows(CHEXPERT_VALID, "valid")
    valid[2][0] = "CheXpert-v1.0-small/valid/patient00003/study9/view1_frontal.jpg"
    table = make_chexpert(tmp_path, valid_rows=valid)
    with pytest.raises(DataListError, match=r"valid.csv line 4: patient patient00003 is in both official splits \(also at .*train.csv line 7\)"):
        load(table, tmp_path, label_policy="u_ones")


@pytest.mark.parametrize("path", ["../outside/patient00009/study1/view1_frontal.jpg", "/etc/patient00009/x.jpg"])
def test_a_path_escaping_the_data_root_is_refused(tmp_path, path):
    table = make_chexpert(tmp_path / "site", train_rows=replace_cell(TRAIN, 4, "Path", path))
    with pytest.raises(DataPathError, match=re.escape("train.csv line 6: column 'Path': ") + ".*outside the data root"):
        load(table, tmp_path / "site", label_policy="u_ones", image=None, clinical=("Age",))


def test_a_missing_image_is_named_with_the_data_root_hint(tmp_path):
    table = make_chexpert(tmp_path)
    os.remove(tmp_path / TRAIN[3][0])
    with pytest.raises(DataListError, match=r"train.csv line 5: image .*patient00002/study1/view1_frontal.jpg does not exist \(CheXpert paths"):
        load(table, tmp_path, label_policy="u_ones")
    # a table-only model reads no image
    assert len(load(table, tmp_path, clinical=("Age",), image=None, label_policy="u_ones").cases["train"]) == 8


def test_the_step_that_empties_a_split_is_named(tmp_path):
    table = make_chexpert(tmp_path)
    with pytest.raises(DataListError, match=re.escape("the view filter ['LL'] left no 'train' cases (12 images, views {'AP': 4, 'LATERAL': 4, 'PA': 4})")):
        load(table, tmp_path, label_policy="u_ones", views=["LL"])
    # Pleural Other is blank everywhere: ignoring blanks leaves nothing
    with pytest.raises(DataListError, match=re.escape("every label of every 'train' case is ignored (label_policy 'ignore', blank_labels 'ignore')")):
        load(table, tmp_path, labels=("Pleural Other",), label_policy="ignore", blank_labels="ignore")


def test_missing_columns_are_listed_with_a_suggestion(tmp_path):
    (tmp_path / "t").mkdir()
    header = [c if c != "Frontal/Lateral" else "Frontal_Lateral" for c in CHEXPERT_HEADER]
    table = write_csv(tmp_path / "t" / "train.csv", header, TRAIN)
    with pytest.raises(DataListError) as raised:  # no longer CheXpert's header: read as medflare's, whose message leads
        load(table, tmp_path, label_policy="u_ones")
    assert re.search(r"outcome table .*train.csv lacks column\(s\) \['case_id', 'split'.*\(cannot tell which table", str(raised.value))
    header = [c if c != CARDIO else "Cardiomegally" for c in CHEXPERT_HEADER if c != "AP/PA"]
    table = write_csv(tmp_path / "t" / "train.csv", header, [r[:4] + r[5:] for r in TRAIN])
    with pytest.raises(DataListError, match=re.escape("lacks column(s) ['AP/PA', 'Cardiomegaly']") + ".*did you mean 'Cardiomegally'"):
        load(table, tmp_path, label_policy="u_ones")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "the job must choose label_policy ('u_ones', 'u_zeros' or 'ignore')"),
        ({"label_policy": "u_ones", "table_format": "mimic_cxr"}, "table_format is 'mimic_cxr' but the site's datalist"),
        ({"label_policy": "u_ones", "labels": ("cardiomegaly",)}, "label_columns ['cardiomegaly'] are not CheXpert observations"),
    ],
)
def test_the_jobs_mistakes_are_value_errors_not_data_errors(tmp_path, kwargs, message):
    table = make_chexpert(tmp_path)
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        load(table, tmp_path, **kwargs)
    assert not isinstance(raised.value, DataListError)


# --- MIMIC-CXR-JPG ----------------------------------------------------------------------------

MIMIC_LABEL_ROWS = [  # subject, study, Cardiomegaly, Edema
    ("10000032", "50414267", "1.0", "-1.0"),
    ("10000032", "53189527", "-1.0", ""),
    ("10000764", "57375967", "0.0", "1.0"),
    ("10000898", "50771383", "", "0.0"),
    ("10001038", "58224233", "1.0", "1.0"),
]
MIMIC_IMAGES = [  # dicom_id, subject, study, ViewPosition
    ("d1-aa", "10000032", "50414267", "PA"),
    ("d2-aa", "10000032", "50414267", "LATERAL"),
    ("d3-aa", "10000032", "53189527", "AP"),
    ("d4-aa", "10000764", "57375967", "PA"),
    ("d5-aa", "10000764", "57375967", "LL"),
    ("d6-aa", "10000898", "50771383", "AP"),
    ("d7-aa", "10000898", "50771383", ""),
    ("d8-aa", "10001038", "58224233", "PA"),
    ("d9-aa", "10001038", "59999999", "PA"),  # a study without a label row
]
MIMIC_SPLIT = {"10000032": "train", "10000764": "train", "10000898": "validate", "10001038": "test"}


def make_mimic(root, split=True, labels=None, images=None, split_rows=None, name="mimic-cxr-2.0.0-chexpert.csv"):
    root.mkdir(parents=True, exist_ok=True)
    label_rows = [[s, t, *({CARDIO: c, EDEMA: e}.get(o, "") for o in CHEXPERT_OBSERVATIONS)] for s, t, c, e in (labels or MIMIC_LABEL_ROWS)]
    table = write_csv(root / name, ["subject_id", "study_id", *CHEXPERT_OBSERVATIONS], label_rows)
    images = images or MIMIC_IMAGES
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv", ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition"],
              [[d, s, t, "CHEST (PA AND LAT)", v] for d, s, t, v in images])
    if split:
        rows = split_rows or [[d, t, s, MIMIC_SPLIT[s]] for d, s, t, _ in images]
        write_csv(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"], rows)
    for d, s, t, _ in images:
        jpg(root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{t}" / f"{d}.jpg")
    return table


@pytest.mark.parametrize(
    "policy, blank, train, test",
    [
        ("u_ones", "negative", [1, 1, 0], [0, 1]),
        ("u_zeros", "negative", [1, 0, 0], [0, 1]),
        ("ignore", "negative", [1, 0], [0, 1]),
        ("ignore", "ignore", [1, 0], [1]),
    ],
)
def test_mimic_labels_follow_the_policy_on_the_official_split(tmp_path, policy, blank, train, test):
    site = load(make_mimic(tmp_path), tmp_path, label_policy=policy, blank_labels=blank)
    assert site.table_format == "mimic_cxr"
    assert labels_of(site, "train") == train and labels_of(site, "test") == test
    assert "1 image(s) of studies without a label row left out" in site.description
    case = site.cases["train"][0]
    assert (case.case_id, case.patient_id) == ("d1-aa", "10000032")
    assert case.image == os.path.join(str(tmp_path), "files/p10/p10000032/s50414267/d1-aa.jpg")


@pytest.mark.parametrize(
    "views, train, test",
    [(None, ["d1-aa", "d3-aa", "d4-aa"], ["d6-aa", "d8-aa"]), ("all", ["d1-aa", "d2-aa", "d3-aa", "d4-aa", "d5-aa"], ["d6-aa", "d7-aa", "d8-aa"]), (["PA"], ["d1-aa", "d4-aa"], ["d8-aa"])],
)
def test_mimic_views_and_validate_as_test(tmp_path, views, train, test):
    site = load(make_mimic(tmp_path), tmp_path, label_policy="u_ones", views=views)
    assert [c.case_id for c in site.cases["train"]] == train
    assert [c.case_id for c in site.cases["test"]] == test  # 10000898's "validate" images are test cases


def test_mimic_without_a_split_file_is_split_by_subject(tmp_path):
    site = load(make_mimic(tmp_path, split=False), tmp_path, label_policy="u_ones", views="all", test_fraction=0.5, split_seed=1)
    train = {c.patient_id for c in site.cases["train"]}
    test = {c.patient_id for c in site.cases["test"]}
    assert not train & test and len(test) == 2 and len(train | test) == 4
    assert sum(len(c) for c in site.cases.values()) == 8  # the unlabelled study's image is left out


def test_mimic_folder_datalist_and_negbio(tmp_path):
    make_mimic(tmp_path / "a")
    assert detect_table_format(str(tmp_path / "a"))[0] == "mimic_cxr"
    table = make_mimic(tmp_path / "b", name="mimic-cxr-2.0.0-negbio.csv")
    assert len(load(str(tmp_path / "b"), tmp_path / "b", label_policy="u_zeros").cases["test"]) == 2
    write_csv(tmp_path / "b" / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id"], [["1"]])
    with pytest.raises(DataListError, match="holds both MIMIC label files"):
        detect_table_format(str(tmp_path / "b"))
    assert detect_table_format(table)[0] == "mimic_cxr"


def split_rows_with(subject, split):
    return [[d, t, s, split if s == subject and d == "d2-aa" else MIMIC_SPLIT[s]] for d, s, t, _ in MIMIC_IMAGES]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split_rows": split_rows_with("10000032", "test")}, "split.csv line 3: patient 10000032 is in split 'test' here and 'train' at"),
        ({"split_rows": split_rows_with("10000032", "valid")}, "split.csv line 3: column 'split' must be one of ['train', 'validate', 'test'], got 'valid'"),
        ({"split_rows": [[d, t, s, MIMIC_SPLIT[s]] for d, s, t, _ in MIMIC_IMAGES[1:]]}, "metadata.csv line 2: dicom_id d1-aa is not in the split table"),
        ({"labels": MIMIC_LABEL_ROWS + [("10000032", "50414267", "0.0", "0.0")]}, "chexpert.csv line 7: study 50414267 of subject 10000032 has a second label row"),
        ({"labels": [("10000032", "50414267", "2.0", "")] + MIMIC_LABEL_ROWS[1:]}, "chexpert.csv line 2: column 'Cardiomegaly' must be 1.0, 0.0, -1.0 (uncertain) or blank (not mentioned), got '2.0'"),
        ({"labels": [("../10000032", "50414267", "1.0", "")] + MIMIC_LABEL_ROWS[1:]}, "chexpert.csv line 2: column 'subject_id' must be digits, got '../10000032'"),
        ({"images": MIMIC_IMAGES + [("../../x", "10001038", "58224233", "PA")], "split": False}, "metadata.csv line 11: column 'dicom_id' must be letters, digits, '.' and '-', got '../../x'"),
        ({"images": MIMIC_IMAGES + [MIMIC_IMAGES[0]], "split": False}, "metadata.csv line 11: dicom_id d1-aa appears twice (first at"),
    ],
    ids=["patient-two-splits", "unknown-split", "not-in-split", "two-label-rows", "label-2.0", "subject-escape", "dicom-escape", "dicom-twice"],
)
def test_bad_mimic_tables_name_file_line_and_column(tmp_path, kwargs, message):
    table = make_mimic(tmp_path, **kwargs)
    with pytest.raises(DataListError) as raised:
        load(table, tmp_path, label_policy="u_ones")
    assert message in str(raised.value)


def test_mimic_missing_image_metadata_and_clinical_columns(tmp_path):
    table = make_mimic(tmp_path)
    os.remove(tmp_path / "files/p10/p10000764/s57375967/d4-aa.jpg")
    with pytest.raises(DataListError, match=r"metadata.csv line 5: image .*d4-aa.jpg does not exist"):
        load(table, tmp_path, label_policy="u_ones")
    with pytest.raises(ValueError, match=re.escape("clinical_columns ['Age'] given, but a MIMIC-CXR-JPG table")):
        load(table, tmp_path, clinical=("Age",), label_policy="u_ones")
    os.remove(tmp_path / "mimic-cxr-2.0.0-metadata.csv")
    with pytest.raises(DataListError, match=r"MIMIC-CXR metadata table .*metadata.csv does not exist"):
        load(table, tmp_path, label_policy="u_ones")


def test_mimic_views_that_empty_the_test_split_are_named(tmp_path):
    with pytest.raises(DataListError, match=re.escape("the view filter ['LATERAL', 'LL'] left no 'test' cases (3 images, views {'(blank)': 1, 'AP': 1, 'PA': 1})")):
        load(make_mimic(tmp_path), tmp_path, label_policy="u_ones", views=["lateral", "LL"])


# --- detection and medflare's own table -------------------------------------------------------


def test_a_medflare_table_reads_exactly_as_load_outcome_table(tmp_path):
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "a.png")
    table = write_csv(tmp_path / "t.csv", ["case_id", "split", "image", "age", "y"], [["a", "train", "a.png", 3, 1], ["b", "test", "a.png", 4, 0]])
    site = load_site_table(table, str(tmp_path), ["age"], ["y"], "image")
    assert site.table_format == "medflare"
    assert site.cases == load_outcome_table(table, str(tmp_path), ["age"], ["y"], "image")
    with pytest.raises(ValueError, match="table_format is 'chexpert' but the site's datalist .* is a 'medflare' table"):
        load_site_table(table, str(tmp_path), ["age"], ["y"], "image", ChestXrayTableOptions(table_format="chexpert"))


@pytest.mark.parametrize(
    "name, header, message",
    [
        ("t.csv", ["a", "b"], "cannot tell which table {path} is: its header is ['a', 'b']"),
        ("mimic-cxr-2.0.0-metadata.csv", ["dicom_id", "subject_id", "ViewPosition"], "is MIMIC-CXR's metadata table: name the labels table"),
        ("valid.csv", CHEXPERT_HEADER, "is CheXpert's validation table: name train.csv as the datalist"),
    ],
)
def test_detection_says_what_it_found(tmp_path, name, header, message):
    path = write_csv(tmp_path / name, header, [])
    with pytest.raises(DataListError, match=re.escape(message.format(path=path))):
        detect_table_format(path)


def test_detection_of_a_folder_holding_neither_and_of_a_missing_file(tmp_path):
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(DataListError, match=re.escape("holding neither CheXpert's train.csv nor a MIMIC-CXR labels file") + r".*\['x.txt'\]"):
        detect_table_format(str(tmp_path))
    with pytest.raises(DataListError, match="outcome table .*none.csv does not exist"):
        detect_table_format(str(tmp_path / "none.csv"))
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00garbage\x81")
    with pytest.raises(DataListError, match="cannot read outcome table"):
        detect_table_format(str(tmp_path / "bin.csv"))


# --- the options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"table_format": "csv"}, "table_format must be one of ['auto', 'medflare', 'chexpert', 'mimic_cxr'], got 'csv'"),
        ({"label_policy": "u_multiclass"}, "label_policy must be one of ['u_ones', 'u_zeros', 'ignore'], got 'u_multiclass'"),
        ({"label_policy": 1}, "label_policy must be one of"),
        ({"blank_labels": "zero"}, "blank_labels must be one of ['negative', 'ignore'], got 'zero'"),
        ({"views": "frontal"}, "views must be null (frontal), 'all' or a non-empty list"),
        ({"views": []}, "views must be null (frontal), 'all' or a non-empty list"),
        ({"views": ["PA", 1]}, "views must be null"),
        ({"views": ["PA", "front"]}, "views names unknown view position(s) ['front']"),
        ({"views": ["PA", "pa"]}, "views names a view twice"),
        ({"test_fraction": 0}, "test_fraction must be a number in (0, 1), got 0"),
        ({"test_fraction": 1.0}, "got 1.0"),
        ({"test_fraction": float("nan")}, "got nan"),
        ({"test_fraction": True}, "got True"),
        ({"test_fraction": "0.2"}, "got '0.2'"),
        ({"split_seed": -1}, "split_seed must be an int >= 0, got -1"),
        ({"split_seed": True}, "got True"),
        ({"split_seed": 1.0}, "got 1.0"),
    ],
)
def test_bad_options_are_refused_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ChestXrayTableOptions(**kwargs)


def test_check_site_table_reads_every_image_of_each_format(tmp_path):
    from medflare.data.chest_xray_tables import check_site_table

    table = make_chexpert(tmp_path / "c")
    assert check_site_table(table, str(tmp_path / "c")) == {"format": "chexpert", "train": 12, "test": 3, "images": 15}
    mimic = make_mimic(tmp_path / "m")
    assert check_site_table(mimic, str(tmp_path / "m")) == {"format": "mimic_cxr", "train": 5, "test": 3, "images": 8}
    (tmp_path / "m" / "files/p10/p10000764/s57375967/d5-aa.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataListError, match=r"case d5-aa: cannot read image .*d5-aa.jpg"):
        check_site_table(mimic, str(tmp_path / "m"))
