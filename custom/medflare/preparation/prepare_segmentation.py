"""``medflare prepare segmentation``: a site's BraTS-like datalist prepared into a new data root.

Every case of the input datalist (``training`` and ``validation``; extra keys kept; four
image paths or one 4-D path; the datalist's ``"modality"`` map gives the channel order and its
label convention the allowed label values, :mod:`medflare.data.tumour_label_conventions`) is
checked and, when it passes, written by :mod:`.segmentation_steps`. The output folder then holds
``datalist.json`` (cases that passed, in input order, paths relative to it), ``data_config.json``
(``{"data_root": ".", "datalist": "datalist.json"}``, the form a site installs) and the
manifest (:mod:`.manifest`). A failing case is left out of the datalist and listed in the
manifest with its reasons; nothing is dropped silently.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from medflare.data.brats_layout import MODALITIES, datalist_convention, read_json_object, write_data_config
from medflare.data.data_errors import DataListError
from medflare.data.data_root_paths import DataPathError, path_in_data_root
from medflare.data.modality_names import channel_order
from medflare.data.tumour_label_conventions import get_convention
from medflare.preparation.case_qc import CaseFailed, CaseVerdict
from medflare.preparation.file_hashes import sha256_file
from medflare.preparation.manifest import MANIFEST_NAME, build_manifest, write_manifest
from medflare.preparation.output_folder import claim_output_folder
from medflare.preparation.recipe import SegmentationPreparation
from medflare.preparation.segmentation_steps import SegmentationCase, prepare_segmentation_case

__all__ = ["PreparationResult", "SAFE_CASE_ID", "prepare_segmentation"]

SPLIT_KEYS = ("training", "validation")
#: a case id that is safe as a folder and file name
SAFE_CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_LABEL_NAME = re.compile(r"^(?P<sid>.+?)[_-](seg|segm|label)\.nii(\.gz)?$", re.IGNORECASE)


@dataclass(frozen=True)
class PreparationResult:
    """Where the preparation wrote, and its manifest (``manifest["counts"]``, ``["cases"]``)."""

    out: str
    manifest_path: str
    datalist: str
    data_config: str
    manifest: dict

    @property
    def failed_cases(self) -> list:
        return [c for c in self.manifest["cases"] if c["verdict"] == "fail"]


def _case_id(item, split: str, n: int) -> str:
    if isinstance(item, dict):
        subject = item.get("subject")
        if isinstance(subject, str) and subject:
            return subject
        label = item.get("label")
        if isinstance(label, str):
            m = _LABEL_NAME.match(os.path.basename(label))
            if m:
                return m.group("sid")
    return f"{split}-{n:04d}"


def _entry_case(item, split: str, n: int, data_root: str, where: str, order, verdict: CaseVerdict):
    """The :class:`SegmentationCase` of one entry, or None with ``verdict`` failed."""
    try:
        if not SAFE_CASE_ID.fullmatch(verdict.case_id):
            raise CaseFailed("malformed_entry", f"{where}: case id {verdict.case_id!r} is not safe as a file name (letters, digits, '_', '-', '.')")
        if not isinstance(item, dict):
            raise CaseFailed("malformed_entry", f"{where} must be an object with 'image' and 'label', got {item!r}")
        images, label = item.get("image"), item.get("label")
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not images or not isinstance(label, str):
            raise CaseFailed("malformed_entry", f"{where} must have 'image' (paths) and 'label' (a path), got {item!r}")
        allowed = None
        if "label_convention" in item:
            try:
                allowed = get_convention(item["label_convention"]).values
            except ValueError as e:
                raise CaseFailed("malformed_entry", f"{where}: {e}") from None
        paths = [path_in_data_root(data_root, p, f"{where} image") for p in images] + [path_in_data_root(data_root, label, f"{where} label")]
        for path in paths:
            if not os.path.isfile(path):
                raise CaseFailed("missing_file", f"{where} names a missing file: {path}")
    except DataPathError as e:
        verdict.fail("path_outside_data_root", str(e))
        return None, None, []
    except CaseFailed as e:
        verdict.failures.append(e.finding)
        return None, None, []
    extra = {k: v for k, v in item.items() if k not in ("image", "label", "subject")}
    return SegmentationCase(verdict.case_id, split, paths[:-1], paths[-1], order, extra), allowed, paths


def _channel_order(content: dict, where: str):
    modality = content.get("modality")
    return None if modality is None else channel_order(modality, where)


def _input_record(paths: list, data_root: str) -> list:
    records = []
    for path in paths:
        try:
            digest = sha256_file(path)
        except OSError:
            digest = None
        records.append({"path": os.path.relpath(path, data_root), "sha256": digest})
    return records


def _prepare_cases(content: dict, datalist: str, data_root: str, out: str, recipe: SegmentationPreparation) -> tuple[list, dict]:
    where = f"datalist {datalist}"
    convention = get_convention(datalist_convention(content, where))
    order = _channel_order(content, where)
    records, prepared, seen = [], {k: [] for k in SPLIT_KEYS if isinstance(content.get(k), list)}, set()
    for split in prepared:
        for n, item in enumerate(content[split]):
            verdict = CaseVerdict(_case_id(item, split, n))
            case, allowed, paths = (None, None, [])
            if verdict.case_id in seen:
                verdict.fail("duplicate_case", f"{where}: {split}[{n}] repeats case id {verdict.case_id!r}")
            else:
                seen.add(verdict.case_id)
                case, allowed, paths = _entry_case(item, split, n, data_root, f"{where}: {split}[{n}]", order, verdict)
            record = {"shape": None, "spacing": None, "output_shape": None, "output_spacing": None, "outputs": []}
            if case is not None:
                verdict, record = prepare_segmentation_case(case, recipe, allowed or convention.values, out)
            records.append({"case_id": verdict.case_id, "split": split, **verdict.as_json(), "inputs": _input_record(paths, data_root), **record})
            if verdict.verdict == "pass":
                outputs = [o["path"] for o in record["outputs"]]
                prepared[split].append({"subject": case.case_id, "image": outputs[:-1], "label": outputs[-1], **case.extra})
    return records, {"convention": convention, "lists": prepared}


def prepare_segmentation(datalist: str, data_root: str, out: str, recipe: SegmentationPreparation) -> PreparationResult:
    """Prepare every case of ``datalist`` (paths relative to ``data_root``) into ``out``.

    Returns:
        A :class:`PreparationResult`; ``manifest["counts"]`` says how many passed and why others failed.

    Raises:
        ValueError: bad ``recipe`` or ``out`` (see :func:`~.output_folder.claim_output_folder`).
        DataListError: the datalist is missing, unreadable, has no ``training`` or ``validation``
            list, or an unknown label convention or modality map (every case would fail alike).
    """
    if not isinstance(recipe, SegmentationPreparation):
        raise ValueError(f"recipe must be a SegmentationPreparation, got {recipe!r}")
    if not isinstance(data_root, str) or not os.path.isdir(data_root):
        raise DataListError(f"data root not found: {data_root!r}")
    content = read_json_object(datalist, "datalist")
    if not any(isinstance(content.get(k), list) for k in SPLIT_KEYS):
        raise DataListError(f"datalist {datalist} has no {' or '.join(repr(k) for k in SPLIT_KEYS)} list")
    out = claim_output_folder(out, data_root, datalist, MANIFEST_NAME)
    records, prepared = _prepare_cases(content, datalist, data_root, out, recipe)
    convention = prepared["convention"]
    listing = {
        "name": content.get("name", "BraTS") if isinstance(content.get("name"), str) else "BraTS",
        "label_convention": convention.name,
        "labels": convention.labels_map(),
        "modality": {str(i): m.upper() for i, m in enumerate(MODALITIES)},
        "preparation": {"name": recipe.name, "version": recipe.version, "parameters_hash": recipe.parameters_hash()},
        **prepared["lists"],
    }
    datalist_out = os.path.join(out, "datalist.json")
    with open(datalist_out, "w") as f:
        json.dump(listing, f, indent=2)
        f.write("\n")
    config = write_data_config(out, ".", "datalist.json")
    prepared_files = {
        "datalist": {"path": "datalist.json", "sha256": sha256_file(datalist_out)},
        "data_config": {"path": os.path.basename(config), "sha256": sha256_file(config)},
    }
    manifest = build_manifest(recipe, data_root, datalist, sha256_file(datalist), records, prepared_files)
    return PreparationResult(out, write_manifest(out, manifest), datalist_out, config, manifest)
