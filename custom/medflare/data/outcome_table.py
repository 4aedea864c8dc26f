"""A site's outcome data: a CSV of clinical values and labels, with a chest X-ray per case if used.

This is the form a hospital's own data takes for the outcome executor, and what
``medflare data heart`` and ``medflare data cxr`` write (CheXpert and MIMIC-CXR-JPG tables are
read by :mod:`medflare.data.chest_xray_tables` into the same cases)::

    case_id,split,image,age,spo2,...,o2_24h,o2_72h
    s1-0001,train,images/s1-0001.png,71,88.0,...,1,1
    s1-0002,test,images/s1-0002.dcm,45,97.5,...,0,0

* ``case_id``: unique per row; ``split``: ``train`` or ``test``.
* image column (named by the job, absent for table-only models): a path relative to the site's
  ``data_root``, to a greyscale PNG (8 or 16 bit), a JPEG, a DICOM file or a folder holding one
  DICOM series. DICOM pixel values go through the modality LUT (``RescaleSlope`` /
  ``RescaleIntercept``), the VOI LUT (window or LUT sequence), and ``MONOCHROME1`` is
  inverted, so bone is bright in both photometric interpretations
  (:mod:`medflare.data.dicom_radiograph`, which also gives the rule for multi-frame files).
* clinical columns (named by the job): numbers. An empty cell is an error naming the case and
  the column: imputing is a clinical decision the site makes when it prepares the table.
* label columns (named by the job): 0 or 1 each (one column: binary; several: multi-label).

The job names the columns (they are the model's inputs and outputs); where the table lives is
the site's business (:mod:`medflare.data.site_data_config`). Every problem is reported as a
:class:`~medflare.data.brats_layout.DataListError` naming the file, the row or case, and the
column.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from medflare.data.data_errors import DataListError
from medflare.data.data_root_paths import path_in_data_root

__all__ = ["IGNORE_LABEL", "OutcomeCase", "SPLITS", "check_columns", "check_outcome_table", "count_cases", "load_outcome_table", "non_finite_cells", "read_xray"]

SPLITS = ("train", "test")

#: a label value meaning "leave this label of this case out of the loss and the metrics"
IGNORE_LABEL = -1


@dataclass(frozen=True)
class OutcomeCase:
    """One row of the table: clinical values and labels as read, the image as an absolute path.

    ``labels`` holds 0 or 1 per label, or :data:`IGNORE_LABEL` (-1) where the label is to be
    left out of the loss and the metrics (an uncertain or unmentioned CheXpert observation under
    the ``ignore`` policy, :mod:`medflare.data.chest_xray_tables`); medflare's own tables never
    hold it. ``patient_id`` is None when one case is one patient (medflare's own tables), else the
    patient the image belongs to (CheXpert, MIMIC-CXR: several images per patient).
    """

    case_id: str
    split: str
    image: Optional[str]
    clinical: tuple[float, ...]
    labels: tuple[int, ...]
    patient_id: Optional[str] = None


def check_columns(name: str, columns, allow_empty: bool) -> list[str]:
    """``columns`` as a list, refused (ValueError naming ``name``) unless it is a list of distinct
    non-empty column names, non-empty unless ``allow_empty``."""
    if not isinstance(columns, (list, tuple)) or any(not isinstance(c, str) or not c for c in columns):
        raise ValueError(f"{name} must be a list of column names, got {columns!r}")
    if not columns and not allow_empty:
        raise ValueError(f"{name} must name at least one column, got {columns!r}")
    if len(set(columns)) != len(columns):
        raise ValueError(f"{name} names a column twice: {columns!r}")
    return list(columns)


def load_outcome_table(
    path: str,
    data_root: str,
    clinical_columns: Sequence[str],
    label_columns: Sequence[str],
    image_column: Optional[str] = None,
) -> dict[str, list[OutcomeCase]]:
    """Read and check a site's table.

    Args:
        path: the CSV file.
        data_root: folder that image paths are relative to.
        clinical_columns: the clinical inputs, in the model's order (may be empty with an image).
        label_columns: the outcome labels, in the model's order.
        image_column: the column of image paths, or None for a table-only model.

    Returns:
        ``{"train": [...], "test": [...]}``, each non-empty, in file order.

    Raises:
        ValueError: bad column arguments (the job's fault).
        DataListError: the file is missing or unreadable, a column is absent, a value is not a
            number (or not finite) or not 0/1, a case id repeats, a split is unknown or empty, an
            image is missing or resolves outside ``data_root`` (``DataPathError``). The images'
            content is checked when they are read (:func:`read_xray`).
    """
    clinical_columns = check_columns("clinical_columns", clinical_columns, allow_empty=image_column is not None)
    label_columns = check_columns("label_columns", label_columns, allow_empty=False)
    if image_column is not None and (not isinstance(image_column, str) or not image_column):
        raise ValueError(f"image_column must be a column name or null, got {image_column!r}")
    overlap = set(clinical_columns) & set(label_columns)
    if overlap:
        raise ValueError(f"columns {sorted(overlap)} are named both as clinical inputs and as labels")
    needed = ["case_id", "split", *([image_column] if image_column else []), *clinical_columns, *label_columns]
    rows = _read_rows(path, needed)

    cases: dict[str, list[OutcomeCase]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        case_id = (row["case_id"] or "").strip()
        where = f"{path} line {line} (case {case_id!r})"
        if not case_id:
            raise DataListError(f"{where}: empty case_id")
        if case_id in seen:
            raise DataListError(f"{where}: case_id appears twice")
        seen.add(case_id)
        split = (row["split"] or "").strip()
        if split not in SPLITS:
            raise DataListError(f"{where}: split must be one of {list(SPLITS)}, got {split!r}")
        clinical = tuple(_number(row[c], c, where) for c in clinical_columns)
        labels = tuple(_binary(row[c], c, where) for c in label_columns)
        image = None
        if image_column:
            relative = (row[image_column] or "").strip()
            if not relative:
                raise DataListError(f"{where}: no image in column {image_column!r}")
            image = path_in_data_root(data_root, relative, f"{where}: column {image_column!r}")
            if not _image_exists(image):
                raise DataListError(f"{where}: image {image} does not exist")
        cases[split].append(OutcomeCase(case_id, split, image, clinical, labels))
    for split, found in cases.items():
        if not found:
            raise DataListError(f"outcome table {path} has no {split!r} cases")
    return cases


def _image_exists(image: str) -> bool:
    """A file, or a folder (a DICOM series, :mod:`medflare.data.dicom_radiograph`)."""
    return os.path.isfile(image) or os.path.isdir(image)


def _read_rows(path: str, needed: Sequence[str]) -> list[dict]:
    """The table's rows, refused (DataListError naming the file) when it cannot be read, has no
    cases or lacks one of the ``needed`` columns."""
    try:
        # utf-8-sig: a table saved as "CSV UTF-8" by a spreadsheet starts with a byte-order mark
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise DataListError(f"outcome table {path} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataListError(f"cannot read outcome table {path}: {e}") from None
    if not rows:
        raise DataListError(f"outcome table {path} has no cases")
    header = list(rows[0].keys())
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataListError(f"outcome table {path} lacks column(s) {missing}; it has {header}")
    return rows


def count_cases(path: str) -> dict[str, int]:
    """``{"train": n, "test": m}`` from the table's ``split`` column, without reading an image
    (what a plan needs; :func:`check_outcome_table` checks the contents).

    Raises:
        DataListError: the table cannot be read, or a split is unknown, naming the file and line.
    """
    counts = dict.fromkeys(SPLITS, 0)
    for line, row in enumerate(_read_rows(path, ["case_id", "split"]), start=2):
        split = (row["split"] or "").strip()
        if split not in SPLITS:
            raise DataListError(f"{path} line {line}: split must be one of {list(SPLITS)}, got {split!r}")
        counts[split] += 1
    return counts


def check_outcome_table(path: str, data_root: str, image_column: str = "image") -> dict[str, int]:
    """What a site admin's install can check without a job: every case has an id and a known
    split, both splits have cases, no cell holds a non-finite number (``nan``, ``inf``), and
    every image named in ``image_column`` (when the table has that column) lies inside
    ``data_root`` and reads as a radiograph (:func:`read_xray`: one 2-D greyscale image of at
    least 8x8, finite). Which columns are numbers and labels is checked when a job names them.

    Returns:
        ``{"train": n, "test": m, "images": k}``.

    Raises:
        DataListError: as :func:`load_outcome_table` and :func:`read_xray`, naming the file, the
            line and the case.
    """
    rows = _read_rows(path, ["case_id", "split"])
    header = list(rows[0].keys())
    counts = {"train": 0, "test": 0, "images": 0}
    for line, row in enumerate(rows, start=2):
        where = f"{path} line {line} (case {(row['case_id'] or '').strip()!r})"
        split = (row["split"] or "").strip()
        if split not in SPLITS:
            raise DataListError(f"{where}: split must be one of {list(SPLITS)}, got {split!r}")
        counts[split] += 1
        _check_finite_cells(row, [c for c in header if c not in ("case_id", "split", image_column)], where)
        if image_column in header:
            image = path_in_data_root(data_root, (row[image_column] or "").strip(), f"{where}: column {image_column!r}")
            if not _image_exists(image):
                raise DataListError(f"{where}: image {image} does not exist")
            try:
                read_xray(image)
            except DataListError as e:
                raise DataListError(f"{where}: {e}") from None
            counts["images"] += 1
    for split in SPLITS:
        if not counts[split]:
            raise DataListError(f"outcome table {path} has no {split!r} cases")
    return counts


def non_finite_cells(row: dict, columns: Sequence[str]) -> list[tuple[str, str]]:
    """``(column, text)`` of each cell of ``columns`` that reads as a number but is not finite
    (``nan``, ``inf``); text and empty cells are left to the job's column checks (an empty cell
    may be in a column no job uses)."""
    found = []
    for column in columns:
        text = (row.get(column) or "").strip()
        try:
            value = float(text)
        except ValueError:
            continue
        if not math.isfinite(value):
            found.append((column, text))
    return found


def _check_finite_cells(row: dict, columns: Sequence[str], where: str) -> None:
    """Refuse the first cell :func:`non_finite_cells` finds."""
    for column, text in non_finite_cells(row, columns)[:1]:
        raise DataListError(f"{where}: column {column!r} is not finite: {text!r}")


def _number(text: Optional[str], column: str, where: str) -> float:
    text = (text or "").strip()
    if not text:
        raise DataListError(f"{where}: column {column!r} is empty (impute or drop the case before training)")
    try:
        value = float(text)
    except ValueError:
        raise DataListError(f"{where}: column {column!r} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise DataListError(f"{where}: column {column!r} is not finite: {text!r}")
    return value


def _binary(text: Optional[str], column: str, where: str) -> int:
    text = (text or "").strip()
    if text in ("0", "1", "0.0", "1.0"):
        return int(float(text))
    raise DataListError(f"{where}: label {column!r} must be 0 or 1, got {text!r}")


def _is_dicom(path: str) -> bool:
    if os.path.isdir(path):  # a series folder
        return True
    if path.lower().endswith((".dcm", ".dicom")):
        return True
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def read_xray(path: str, frame: Optional[int] = None) -> np.ndarray:
    """A greyscale radiograph as float32 ``(H, W)`` scaled to [0, 1] by its own range.

    Read: PNG (8/16-bit greyscale) and JPEG (what CheXpert and MIMIC-CXR-JPG ship); colour is
    converted to luminance. DICOM: a file or a folder of one series, through the modality LUT,
    the VOI LUT (window or LUT sequence) and MONOCHROME1 inversion; a multi-frame file or a
    series is one radiograph when its frames are equal, else ``frame`` must say which
    (:mod:`medflare.data.dicom_radiograph`). Scaling each image by its own minimum and maximum
    removes the bit depth and the vendor's value range; what differs between sites beyond that
    is left to the model.

    Args:
        path: the image file, or a DICOM series folder.
        frame: None, or the DICOM frame number (from 1) of a multi-frame file or series.

    Raises:
        ValueError: ``frame`` is not None or an int >= 1.
        DataListError: naming the file when it cannot be read or is not a single greyscale image.
    """
    from medflare.data.dicom_radiograph import check_frame, read_dicom_radiograph

    check_frame(frame)
    try:
        if _is_dicom(path):
            pixels = read_dicom_radiograph(path, frame)
        else:
            from PIL import Image

            with Image.open(path) as image:
                if getattr(image, "n_frames", 1) != 1:
                    raise DataListError(f"image {path} holds {image.n_frames} frames; a radiograph is one image")
                if image.mode not in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
                    image = image.convert("L")
                pixels = np.asarray(image, dtype=np.float32)
    except DataListError:
        raise
    except Exception as e:
        raise DataListError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    if pixels.ndim != 2 or min(pixels.shape) < 8:
        raise DataListError(f"image {path} must be one 2D greyscale image of at least 8x8, got shape {pixels.shape}")
    pixels = pixels.astype(np.float32, copy=False)
    if not np.all(np.isfinite(pixels)):
        raise DataListError(f"image {path} has non-finite pixel values")
    low, high = float(pixels.min()), float(pixels.max())
    return (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
