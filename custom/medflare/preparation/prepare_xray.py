"""``medflare prepare xray``: a site's outcome table's radiographs prepared into a new data root.

The table (:mod:`medflare.data.outcome_table`: ``case_id``, ``split``, an image column, clinical
and label columns) is read row by row; each row's radiograph is checked and written by
:mod:`.xray_steps`. The output folder then holds ``table.csv`` (the rows that passed, in input
order, every column as it was except the image column, which names the prepared PNG),
``data_config.json`` (``{"data_root": ".", "datalist": "table.csv"}``) and the manifest. A row
whose case id repeats, whose split is unknown, whose cells hold a non-finite number or whose
image fails is left out and listed in the manifest with its reasons.
"""

from __future__ import annotations

import csv
import os

from medflare.data.brats_layout import write_data_config
from medflare.data.data_errors import DataListError
from medflare.data.data_root_paths import DataPathError, path_in_data_root
from medflare.data.outcome_table import SPLITS, non_finite_cells
from medflare.preparation.case_qc import CaseVerdict
from medflare.preparation.file_hashes import sha256_file
from medflare.preparation.manifest import MANIFEST_NAME, build_manifest, write_manifest
from medflare.preparation.output_folder import claim_output_folder
from medflare.preparation.prepare_segmentation import SAFE_CASE_ID, PreparationResult
from medflare.preparation.recipe import XrayPreparation
from medflare.preparation.xray_steps import input_sha256, prepare_xray_case

__all__ = ["prepare_xray"]


def _read_table(path: str, image_column: str) -> tuple[list, list]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except FileNotFoundError:
        raise DataListError(f"outcome table {path} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataListError(f"cannot read outcome table {path}: {e}") from None
    missing = [c for c in ("case_id", "split", image_column) if c not in header]
    if missing:
        raise DataListError(f"outcome table {path} lacks column(s) {missing}; it has {header}")
    if not rows:
        raise DataListError(f"outcome table {path} has no cases")
    return header, rows


def _check_row(row: dict, header: list, image_column: str, where: str, seen: set, verdict: CaseVerdict) -> bool:
    """Table-level checks of one row; False (``verdict`` failed) when its image is not to be read."""
    if None in row:
        verdict.fail("malformed_entry", f"{where}: more cells than the header's {len(header)} columns")
    if not SAFE_CASE_ID.fullmatch(verdict.case_id):
        verdict.fail("malformed_entry", f"{where}: case id {verdict.case_id!r} is not safe as a file name (letters, digits, '_', '-', '.')")
    elif verdict.case_id in seen:
        verdict.fail("duplicate_case", f"{where}: case id {verdict.case_id!r} appears twice")
    seen.add(verdict.case_id)
    split = (row.get("split") or "").strip()
    if split not in SPLITS:
        verdict.fail("unknown_split", f"{where}: split must be one of {list(SPLITS)}, got {split!r}")
    for column, text in non_finite_cells(row, [c for c in header if c not in ("case_id", "split", image_column)]):
        verdict.fail("non_finite", f"{where}: column {column!r} is not finite: {text!r}")
    return not verdict.failures


def _prepare_rows(header: list, rows: list, table: str, data_root: str, out: str, recipe: XrayPreparation) -> tuple[list, list]:
    records, kept, seen = [], [], set()
    for line, row in enumerate(rows, start=2):
        verdict = CaseVerdict((row.get("case_id") or "").strip())
        where = f"{table} line {line} (case {verdict.case_id!r})"
        inputs, record = [], {"shape": None, "spacing": None, "output_shape": None, "output_spacing": None, "outputs": []}
        if _check_row(row, header, recipe.image_column, where, seen, verdict):
            try:
                image = path_in_data_root(data_root, (row.get(recipe.image_column) or "").strip(), f"{where}: column {recipe.image_column!r}")
            except DataPathError as e:
                verdict.fail("path_outside_data_root", str(e))
            else:
                inputs = [{"path": os.path.relpath(image, data_root), "sha256": input_sha256(image)}]
                if not os.path.exists(image):
                    verdict.fail("missing_file", f"{where}: image {image} does not exist")
                else:
                    record = prepare_xray_case(verdict.case_id, image, recipe, out, verdict)
        split = (row.get("split") or "").strip()
        records.append({"case_id": verdict.case_id, "split": split, **verdict.as_json(), "inputs": inputs, **record})
        if verdict.verdict == "pass":
            kept.append({**{c: row.get(c) for c in header}, recipe.image_column: record["outputs"][0]["path"]})
    return records, kept


def prepare_xray(table: str, data_root: str, out: str, recipe: XrayPreparation) -> PreparationResult:
    """Prepare the radiograph of every row of ``table`` (image paths relative to ``data_root``) into ``out``.

    Raises:
        ValueError: bad ``recipe`` or ``out``.
        DataListError: the table is missing, unreadable, empty or lacks ``case_id``, ``split`` or
            the image column.
    """
    if not isinstance(recipe, XrayPreparation):
        raise ValueError(f"recipe must be an XrayPreparation, got {recipe!r}")
    if not isinstance(data_root, str) or not os.path.isdir(data_root):
        raise DataListError(f"data root not found: {data_root!r}")
    header, rows = _read_table(table, recipe.image_column)
    out = claim_output_folder(out, data_root, table, MANIFEST_NAME)
    records, kept = _prepare_rows(header, rows, table, data_root, out, recipe)
    table_out = os.path.join(out, "table.csv")
    with open(table_out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
    config = write_data_config(out, ".", "table.csv")
    prepared = {
        "datalist": {"path": "table.csv", "sha256": sha256_file(table_out)},
        "data_config": {"path": os.path.basename(config), "sha256": sha256_file(config)},
        "image_column": recipe.image_column,
    }
    manifest = build_manifest(recipe, data_root, table, sha256_file(table), records, prepared)
    return PreparationResult(out, write_manifest(out, manifest), table_out, config, manifest)
