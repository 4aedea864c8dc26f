"""A site's chest X-ray table as it ships: medflare's own CSV, CheXpert, or MIMIC-CXR-JPG.

:func:`load_site_table` finds which table the site's ``datalist`` is (:func:`detect_table_format`)
and turns it into the ``{"train": [OutcomeCase], "test": [...]}`` that
:func:`medflare.data.outcome_table.load_outcome_table` returns, so the outcome trainer is the
same for all three. The job's choices (label policy, blank labels, views, split) are
:class:`~medflare.data.chest_xray_options.ChestXrayTableOptions`.

**CheXpert** [1]: ``datalist`` is ``train.csv`` (or the folder holding it). Columns ``Path``
(``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``, relative to
``data_root``, the folder *holding* ``CheXpert-v1.0-small``), ``Sex``, ``Age``,
``Frontal/Lateral``, ``AP/PA`` and the 14 observations (1.0, 0.0, -1.0 uncertain, blank not
mentioned). The patient is the path's ``patientNNNNN`` part. ``valid.csv`` beside it, when
present, is the test split (the official one); without it, a seeded patient split of
``train.csv``. Clinical columns: ``Age`` (years) and ``Sex`` (``Male`` 0, ``Female`` 1;
``Unknown`` is refused when the job uses ``Sex``), or any other numeric column.

**MIMIC-CXR-JPG** [2]: ``datalist`` is ``mimic-cxr-2.0.0-chexpert.csv`` or
``mimic-cxr-2.0.0-negbio.csv`` (or the folder holding one), labels per study
(``subject_id, study_id`` + the 14 observations); ``mimic-cxr-2.0.0-metadata.csv`` beside it
gives the images (``dicom_id, subject_id, study_id, ViewPosition``), found at
``data_root/files/p10/p10000032/s50414267/<dicom_id>.jpg``. ``mimic-cxr-2.0.0-split.csv``
beside it, when present, is the official patient-level split; its ``validate`` images are
test cases (medflare has no third split and a site scores on held-out patients). Images of
a study without a label row (a few in the release) are left out and counted. The tables
carry no clinical values (age and sex live in MIMIC-IV: join them into a medflare table).

Each case is one image: ``case_id`` is CheXpert's ``Path`` or MIMIC's ``dicom_id``,
``patient_id`` the patient. A patient has several images, so patient-level DP-SGD (one case
is one patient) does not hold for these tables as they are.

The job's ``image_column`` only says whether the model takes an image; these tables name
their images themselves. Steps, in order: read and check every row; split by patient; keep
the views asked for; drop cases whose every label is ignored (they carry nothing to learn or
score); refuse a split left empty, naming the step that emptied it; check the kept images.

References:
    1. Irvin J. et al., CheXpert, AAAI 2019. https://stanfordmlgroup.github.io/competitions/chexpert/
    2. Johnson A. E. W. et al., MIMIC-CXR-JPG, arXiv:1901.07042 (2019); PhysioNet mimic-cxr-jpg 2.0.0.
"""

from __future__ import annotations

import csv
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from medflare.data.chest_xray_options import (
    CHEXPERT_OBSERVATIONS,
    FRONTAL_VIEWS,
    ChestXrayTableOptions,
    apply_label_policy,
    split_test_patients,
)
from medflare.data.data_errors import DataListError
from medflare.data.data_root_paths import path_in_data_root
from medflare.data.outcome_table import IGNORE_LABEL, SPLITS, OutcomeCase, check_columns, load_outcome_table

__all__ = ["SEX_CODES", "SiteTable", "UnknownTableError", "check_site_table", "detect_table_format", "load_site_table"]

#: how CheXpert's ``Sex`` becomes a clinical value
SEX_CODES = {"Male": 0.0, "Female": 1.0}

CHEXPERT_TRAIN, CHEXPERT_VALID = "train.csv", "valid.csv"
MIMIC_LABELS = ("mimic-cxr-2.0.0-chexpert.csv", "mimic-cxr-2.0.0-negbio.csv")
MIMIC_METADATA, MIMIC_SPLIT = "mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-split.csv"
MIMIC_SPLITS = {"train": "train", "validate": "test", "test": "test"}
_PATIENT = re.compile(r"patient\d+")
_ID = re.compile(r"[0-9]+")
_DICOM_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z.-]*")


@dataclass(frozen=True)
class SiteTable:
    """What :func:`load_site_table` read: the cases per split, the format found, and the
    number of cases after each step per split (``rows``, ``views``, ``labelled``)."""

    cases: dict
    table_format: str
    description: str
    counts: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Image:
    case_id: str
    patient: str
    view: str
    frontal: bool
    labels: tuple
    clinical: tuple
    image: str  # relative to data_root, as written or built
    where: str  # "file line N"
    split: Optional[str]  # the official split, or None


# --- detection ------------------------------------------------------------------------------


def detect_table_format(path: str) -> tuple[str, str]:
    """``(format, table file)`` of a site's ``datalist``: ``medflare``, ``chexpert`` or ``mimic_cxr``.

    A folder is looked into for ``train.csv`` (CheXpert) or a MIMIC labels file; a file is
    known by its header.

    Raises:
        DataListError: naming the path and what was found when it is none of them.
    """
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        mimic = [n for n in MIMIC_LABELS if n in names]
        if len(mimic) > 1:
            raise DataListError(f"{path} holds both MIMIC label files {mimic}: name the one to train on as the datalist")
        if mimic:
            return "mimic_cxr", os.path.join(path, mimic[0])
        if CHEXPERT_TRAIN in names:
            return "chexpert", os.path.join(path, CHEXPERT_TRAIN)
        raise DataListError(
            f"{path} is a folder holding neither CheXpert's {CHEXPERT_TRAIN} nor a MIMIC-CXR labels file {list(MIMIC_LABELS)}; "
            f"it holds {names[:20]}"
        )
    header = _header(path)
    if "case_id" in header and "split" in header:
        return "medflare", path
    if "Path" in header and "Frontal/Lateral" in header:
        if os.path.basename(path) == CHEXPERT_VALID:
            raise DataListError(
                f"{path} is CheXpert's validation table: name {CHEXPERT_TRAIN} as the datalist "
                f"({CHEXPERT_VALID} beside it is the test split)"
            )
        return "chexpert", path
    if "dicom_id" in header and "ViewPosition" in header:
        raise DataListError(
            f"{path} is MIMIC-CXR's metadata table: name the labels table {' or '.join(MIMIC_LABELS)} beside it as the datalist"
        )
    if "subject_id" in header and "study_id" in header and any(c in header for c in CHEXPERT_OBSERVATIONS):
        return "mimic_cxr", path
    raise UnknownTableError(
        f"cannot tell which table {path} is: its header is {header[:20]}. medflare's own has case_id and split; "
        "CheXpert's has Path and Frontal/Lateral; MIMIC-CXR's labels have subject_id, study_id and the 14 observations"
    )


class UnknownTableError(DataListError):
    """A datalist file whose header is none of the three formats'."""


def _header(path: str) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f), [])
    except FileNotFoundError:
        raise DataListError(f"outcome table {path} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataListError(f"cannot read outcome table {path}: {e}") from None


def _read_csv(path: str, needed: Sequence[str], what: str) -> list[tuple[int, dict]]:
    """``(line, row)`` pairs of a CSV, refused naming it when it is unreadable, empty or lacks
    a ``needed`` column."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [(reader.line_num, row) for row in reader]
            header = list(reader.fieldnames or [])
    except FileNotFoundError:
        raise DataListError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataListError(f"cannot read {what} {path}: {e}") from None
    missing = [c for c in needed if c not in header]
    if missing:
        hints = [f"{c!r}: did you mean {close[0]!r}?" for c in missing for close in [difflib.get_close_matches(c, header, 1)] if close]
        raise DataListError(f"{what} {path} lacks column(s) {missing}; it has {header}" + (f" ({'; '.join(hints)})" if hints else ""))
    if not rows:
        raise DataListError(f"{what} {path} has no rows")
    for line, row in rows:
        if None in row or any(v is None for v in row.values()):
            raise DataListError(f"{path} line {line}: {len(header)} columns in the header, a different number in this row")
    return rows


# --- loading ------------------------------------------------------------------------------


def load_site_table(
    path: str,
    data_root: str,
    clinical_columns: Sequence[str],
    label_columns: Sequence[str],
    image_column: Optional[str] = None,
    options: Optional[ChestXrayTableOptions] = None,
) -> SiteTable:
    """Read a site's table of any of the three formats into train and test cases.

    Args:
        path: the site's ``datalist`` (a table file, or a folder holding CheXpert or MIMIC tables).
        data_root: the folder images are relative to.
        clinical_columns, label_columns, image_column: the job's columns, as for
            :func:`~medflare.data.outcome_table.load_outcome_table`.
        options: the job's choices; default :class:`ChestXrayTableOptions()`.

    Returns:
        A :class:`SiteTable` whose ``cases`` are ``{"train": [...], "test": [...]}``, both non-empty.

    Raises:
        ValueError: the job's arguments (a bad column list; no ``label_policy`` for a CheXpert
            or MIMIC table; ``table_format`` naming another format than the site's).
        DataListError: the site's data, naming the file, line and column.
    """
    options = options or ChestXrayTableOptions()
    clinical_columns = check_columns("clinical_columns", clinical_columns, allow_empty=image_column is not None)
    label_columns = check_columns("label_columns", label_columns, allow_empty=False)
    try:
        found, table = detect_table_format(path)
    except UnknownTableError as unknown:
        if options.table_format not in ("auto", "medflare"):
            raise
        try:  # as medflare's own table, for the message a site has always had (its missing columns)
            load_outcome_table(path, data_root, clinical_columns, label_columns, image_column)
        except DataListError as e:
            raise DataListError(f"{e} ({unknown})") from None
        raise
    if options.table_format not in ("auto", found):
        raise ValueError(f"table_format is {options.table_format!r} but the site's datalist {path} is a {found!r} table")
    if found == "medflare":
        cases = load_outcome_table(path, data_root, clinical_columns, label_columns, image_column)
        counts = {s: {"rows": len(c), "views": len(c), "labelled": len(c)} for s, c in cases.items()}
        return SiteTable(cases, found, f"medflare outcome table {path}", counts)
    if options.label_policy is None:
        raise ValueError(
            f"the site's datalist {path} is a {found!r} table with uncertain labels: the job must choose "
            "label_policy ('u_ones', 'u_zeros' or 'ignore')"
        )
    unknown = [c for c in label_columns if c not in CHEXPERT_OBSERVATIONS]
    if unknown:
        raise ValueError(f"label_columns {unknown} are not CheXpert observations; a {found!r} table has {list(CHEXPERT_OBSERVATIONS)}")
    if found == "chexpert":
        images, description = _chexpert_images(table, data_root, clinical_columns, label_columns, options)
    else:
        if clinical_columns:
            raise ValueError(
                f"clinical_columns {clinical_columns} given, but a MIMIC-CXR-JPG table {table} carries no clinical values "
                "(age and sex are in MIMIC-IV: join them into a medflare table)"
            )
        images, description = _mimic_images(table, label_columns, options)
    return _assemble(images, found, description, data_root, image_column is not None, options)


def check_site_table(path: str, data_root: str) -> dict:
    """What a site admin's install can check without a job, for any of the three formats.

    medflare's own table: :func:`~medflare.data.outcome_table.check_outcome_table`. CheXpert
    and MIMIC: every row of every table is read as a job reading all 14 observations, all
    views and ``u_ones`` would, and every image is read (:func:`read_xray`).

    Returns:
        ``{"format": ..., "train": n, "test": m, "images": k}``.

    Raises:
        DataListError: as :func:`load_site_table` and :func:`read_xray`, naming the file and line.
    """
    from medflare.data.outcome_table import check_outcome_table, read_xray

    found, _ = detect_table_format(path)
    if found == "medflare":
        return {"format": found, **check_outcome_table(path, data_root)}
    options = ChestXrayTableOptions(label_policy="u_ones", views="all")
    table = load_site_table(path, data_root, [], list(CHEXPERT_OBSERVATIONS), "image", options)
    for case in table.cases["train"] + table.cases["test"]:
        try:
            read_xray(case.image)
        except DataListError as e:
            raise DataListError(f"{table.description}: case {case.case_id}: {e}") from None
    counts = {split: len(cases) for split, cases in table.cases.items()}
    return {"format": found, **counts, "images": counts["train"] + counts["test"]}


def _labels(row: dict, label_columns, options, where: str) -> tuple:
    labels = []
    for column in label_columns:
        value = apply_label_policy(row[column], options)
        if value is None:
            raise DataListError(
                f"{where}: column {column!r} must be 1.0, 0.0, -1.0 (uncertain) or blank (not mentioned), got {row[column]!r}"
            )
        labels.append(value)
    return tuple(labels)


def _clinical(row: dict, columns, where: str) -> tuple:
    values = []
    for column in columns:
        text = (row[column] or "").strip()
        if column == "Sex":
            if text not in SEX_CODES:
                raise DataListError(f"{where}: column 'Sex' must be one of {list(SEX_CODES)} to be a clinical input, got {text!r}")
            values.append(SEX_CODES[text])
            continue
        try:
            value = float(text)
        except ValueError:
            raise DataListError(f"{where}: column {column!r} is not a number: {text!r}") from None
        if not math.isfinite(value) or (column == "Age" and value < 0):
            raise DataListError(f"{where}: column {column!r} must be a finite number{' >= 0' if column == 'Age' else ''}, got {text!r}")
        values.append(value)
    return tuple(values)


def _chexpert_images(train: str, data_root, clinical_columns, label_columns, options) -> tuple[list[_Image], str]:
    needed = ["Path", "Frontal/Lateral", "AP/PA", *clinical_columns, *label_columns]
    valid = os.path.join(os.path.dirname(train), CHEXPERT_VALID)
    sources = [(train, "train")] + ([(valid, "test")] if os.path.isfile(valid) else [])
    images, seen, patients = [], {}, {}
    for path, split in sources:
        for line, row in _read_csv(path, needed, "CheXpert table"):
            where = f"{path} line {line}"
            relative = (row["Path"] or "").strip()
            if relative in seen:
                raise DataListError(f"{where}: image {relative!r} is listed twice (first at {seen[relative]})")
            seen[relative] = where
            parts = [p for p in re.split(r"[\\/]", relative) if _PATIENT.fullmatch(p)]
            if len(parts) != 1:
                raise DataListError(f"{where}: column 'Path' must name one patientNNNNN folder, got {relative!r}")
            patient = parts[0]
            if patients.setdefault(patient, (split, where))[0] != split:
                first = patients[patient][1]
                raise DataListError(
                    f"{where}: patient {patient} is in both official splits (also at {first}); the split must be by patient"
                )
            orientation = (row["Frontal/Lateral"] or "").strip()
            if orientation not in ("Frontal", "Lateral"):
                raise DataListError(f"{where}: column 'Frontal/Lateral' must be 'Frontal' or 'Lateral', got {orientation!r}")
            frontal = orientation == "Frontal"
            view = (row["AP/PA"] or "").strip().upper() if frontal else "LATERAL"
            path_in_data_root(data_root, relative, f"{where}: column 'Path'")
            labels = _labels(row, label_columns, options, where)
            clinical = _clinical(row, clinical_columns, where)
            official = split if len(sources) > 1 else None
            images.append(_Image(relative, patient, view, frontal, labels, clinical, relative, where, official))
    official = "train.csv / valid.csv" if len(sources) > 1 else f"no {CHEXPERT_VALID}: a patient split of {CHEXPERT_TRAIN}"
    return images, f"CheXpert table {train} ({official})"


def _mimic_images(labels_path: str, label_columns, options) -> tuple[list[_Image], str]:
    folder = os.path.dirname(labels_path)
    studies = {}
    for line, row in _read_csv(labels_path, ["subject_id", "study_id", *label_columns], "MIMIC-CXR labels table"):
        where = f"{labels_path} line {line}"
        key = (_mimic_id(row, "subject_id", where), _mimic_id(row, "study_id", where))
        if key in studies:
            raise DataListError(f"{where}: study {key[1]} of subject {key[0]} has a second label row (first at {studies[key][1]})")
        studies[key] = (_labels(row, label_columns, options, where), where)
    split_of = _mimic_split(os.path.join(folder, MIMIC_SPLIT))
    metadata = os.path.join(folder, MIMIC_METADATA)
    images, seen, unlabelled = [], {}, 0
    for line, row in _read_csv(metadata, ["dicom_id", "subject_id", "study_id", "ViewPosition"], "MIMIC-CXR metadata table"):
        where = f"{metadata} line {line}"
        dicom = (row["dicom_id"] or "").strip()
        if not _DICOM_ID.fullmatch(dicom):
            raise DataListError(f"{where}: column 'dicom_id' must be letters, digits, '.' and '-', got {dicom!r}")
        if dicom in seen:
            raise DataListError(f"{where}: dicom_id {dicom} appears twice (first at {seen[dicom]})")
        seen[dicom] = where
        subject, study = _mimic_id(row, "subject_id", where), _mimic_id(row, "study_id", where)
        split = None
        if split_of is not None:
            if dicom not in split_of:
                raise DataListError(f"{where}: dicom_id {dicom} is not in the split table {os.path.join(folder, MIMIC_SPLIT)}")
            split, split_subject, split_where = split_of[dicom]
            if split_subject != subject:
                raise DataListError(f"{where}: dicom_id {dicom} is subject {subject} here and {split_subject} at {split_where}")
        if (subject, study) not in studies:
            unlabelled += 1
            continue
        view = (row["ViewPosition"] or "").strip().upper()
        relative = f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
        images.append(_Image(dicom, subject, view, view in FRONTAL_VIEWS, studies[(subject, study)][0], (), relative, where, split))
    official = "the official split table" if split_of is not None else f"no {MIMIC_SPLIT}: a patient split"
    left_out = f"; {unlabelled} image(s) of studies without a label row left out" if unlabelled else ""
    return images, f"MIMIC-CXR-JPG table {labels_path} ({official}{left_out})"


def _mimic_id(row: dict, column: str, where: str) -> str:
    text = (row[column] or "").strip()
    if not _ID.fullmatch(text):
        raise DataListError(f"{where}: column {column!r} must be digits, got {text!r}")
    return text


def _mimic_split(path: str) -> Optional[dict]:
    """``{dicom_id: (split, subject, where)}`` of the official split table, None when absent; a
    subject in two splits is refused."""
    if not os.path.exists(path):
        return None
    result, subject_split = {}, {}
    for line, row in _read_csv(path, ["dicom_id", "subject_id", "split"], "MIMIC-CXR split table"):
        where = f"{path} line {line}"
        dicom, subject = (row["dicom_id"] or "").strip(), _mimic_id(row, "subject_id", where)
        written = (row["split"] or "").strip()
        if written not in MIMIC_SPLITS:
            raise DataListError(f"{where}: column 'split' must be one of {list(MIMIC_SPLITS)}, got {written!r}")
        split = MIMIC_SPLITS[written]
        if subject_split.setdefault(subject, (written, where))[0] != written:
            first = subject_split[subject]
            raise DataListError(f"{where}: patient {subject} is in split {written!r} here and {first[0]!r} at {first[1]}")
        if dicom in result:
            raise DataListError(f"{where}: dicom_id {dicom} appears twice (first at {result[dicom][2]})")
        result[dicom] = (split, subject, where)
    return result


def _assemble(images: list[_Image], table_format, description, data_root, with_image: bool, options) -> SiteTable:
    """Split, filter and check (the module docstring's steps) into a :class:`SiteTable`."""
    if all(image.split is not None for image in images):
        split_of = {image.case_id: image.split for image in images}
    else:
        try:
            test = split_test_patients([image.patient for image in images], options.test_fraction, options.split_seed)
        except ValueError as e:
            raise DataListError(f"{description}: {e}") from None
        split_of = {image.case_id: "test" if image.patient in test else "train" for image in images}
        description += f", test_fraction {options.test_fraction}, split_seed {options.split_seed}"
    counts = {s: {"rows": 0, "views": 0, "labelled": 0} for s in SPLITS}
    views_seen = {s: {} for s in SPLITS}
    cases = {s: [] for s in SPLITS}
    for image in images:
        split = split_of[image.case_id]
        counts[split]["rows"] += 1
        views_seen[split][image.view or "(blank)"] = views_seen[split].get(image.view or "(blank)", 0) + 1
        if not options.keeps_view(image.view, image.frontal):
            continue
        counts[split]["views"] += 1
        if all(label == IGNORE_LABEL for label in image.labels):
            continue
        counts[split]["labelled"] += 1
        path = None
        if with_image:
            path = path_in_data_root(data_root, image.image, f"{image.where}: image")
            if not os.path.isfile(path):
                hint = ""
                if table_format == "chexpert":
                    hint = " (CheXpert paths start with the data set's folder: data_root is the folder holding it)"
                raise DataListError(f"{image.where}: image {path} does not exist{hint}")
        cases[split].append(OutcomeCase(image.case_id, split, path, image.clinical, image.labels, image.patient))
    for split in SPLITS:
        step = counts[split]
        if not step["rows"]:
            raise DataListError(f"{description}: no {split!r} images at all")
        if not step["views"]:
            raise DataListError(
                f"{description}: the view filter {options.views_text} left no {split!r} cases "
                f"({step['rows']} images, views {dict(sorted(views_seen[split].items()))})"
            )
        if not step["labelled"]:
            raise DataListError(
                f"{description}: every label of every {split!r} case is ignored (label_policy {options.label_policy!r}, "
                f"blank_labels {options.blank_labels!r}): no {split!r} cases left of {step['views']}"
            )
    return SiteTable(cases, table_format, description, counts)
