"""``medflare_preparation.json``: what a site's prepared data is, and the proof of each file.

Written by every preparation into its output folder (the site's new ``data_root``)::

    {"format": 1, "name": "medflare-brats-prep", "version": "1.0.0",
     "parameters": {...}, "parameters_hash": "<sha256 of the parameters' canonical JSON>",
     "tools": {"medflare": "0.1.0", "monai": "1.6.1", "nibabel": "5.4.2", "numpy": "2.4.6", ...},
     "created": "2026-12-02T17:40:00Z", "input_root": "/data/brats", "input_list": "/data/brats/datalist.json",
     "input_list_sha256": "...",
     "prepared": {"datalist": {"path": "datalist.json", "sha256": "..."},
                  "data_config": {"path": "data_config.json", "sha256": "..."}},
     "counts": {"cases": 3, "passed": 1, "failed": 2, "warned": 0,
                "failed_by_reason": {"unreadable_file": 1, ...}, "warnings_by_reason": {}},
     "cases": [{"case_id": ..., "split": ..., "verdict": "pass" | "fail", "reasons": [{code, message}],
                "warnings": [...], "inputs": [{role, path, sha256}], "outputs": [{role, path, sha256}],
                "shape": [...], "spacing": [...], "output_shape": [...], "output_spacing": [...]}]}

Paths in ``outputs`` and ``prepared`` are relative to the manifest's folder, so the folder can
move; input paths are relative to ``input_root``. It stays at the site like the data.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

from medflare.data.data_errors import DataListError

__all__ = ["MANIFEST_FORMAT", "MANIFEST_NAME", "build_manifest", "count_verdicts", "manifest_outputs", "read_manifest", "tool_versions", "write_manifest"]

MANIFEST_NAME = "medflare_preparation.json"
MANIFEST_FORMAT = 1
_TOOLS = ("medflare", "monai", "nibabel", "numpy", "torch", "pillow", "pydicom")
_REQUIRED = ("format", "name", "version", "parameters", "parameters_hash", "cases", "counts")


def tool_versions() -> dict:
    """The installed versions of the packages the steps use (``"not installed"`` when absent)."""
    import medflare

    found = {"medflare": medflare.__version__}
    for package in _TOOLS[1:]:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def count_verdicts(cases: list) -> dict:
    failed = Counter(r["code"] for c in cases for r in c["reasons"])
    warned = Counter(w["code"] for c in cases for w in c["warnings"])
    return {
        "cases": len(cases),
        "passed": sum(c["verdict"] == "pass" for c in cases),
        "failed": sum(c["verdict"] == "fail" for c in cases),
        "warned": sum(bool(c["warnings"]) for c in cases),
        "failed_by_reason": dict(sorted(failed.items())),
        "warnings_by_reason": dict(sorted(warned.items())),
    }


def build_manifest(recipe, input_root: str, input_list: str, input_list_sha256: str, cases: list, prepared: dict, created: Optional[float] = None) -> dict:
    """The manifest of a preparation by ``recipe`` (a ``SegmentationPreparation`` or ``XrayPreparation``)."""
    created = time.time() if created is None else created
    return {
        "format": MANIFEST_FORMAT,
        "name": recipe.name,
        "version": recipe.version,
        "parameters": recipe.parameters(),
        "parameters_hash": recipe.parameters_hash(),
        "tools": tool_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
        "input_root": os.path.abspath(input_root),
        "input_list": os.path.abspath(input_list),
        "input_list_sha256": input_list_sha256,
        "prepared": prepared,
        "counts": count_verdicts(cases),
        "cases": cases,
    }


def write_manifest(out: str, manifest: dict) -> str:
    """Write ``manifest`` whole (a temporary file renamed over it) into ``out``; its path."""
    path = os.path.join(out, MANIFEST_NAME)
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump(manifest, f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(partial, path)
    return path


def read_manifest(path: str) -> dict:
    """Read and shape-check a manifest.

    Raises:
        DataListError: naming ``path`` when it is missing ("this site has not prepared its data
            with medflare prepare"), unreadable, or lacks a field.
    """
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DataListError(
            f"this site has not prepared its data with medflare prepare: no {MANIFEST_NAME} in {os.path.dirname(path) or '.'}; "
            "run `medflare prepare segmentation|xray ... --out DIR` and point the site's data configuration at DIR"
        ) from None
    except (OSError, ValueError) as e:
        raise DataListError(f"preparation manifest {path} is unreadable ({type(e).__name__}: {e}); re-run `medflare prepare`") from None
    if not isinstance(manifest, dict):
        raise DataListError(f"preparation manifest {path} must hold a JSON object, got {type(manifest).__name__}; re-run `medflare prepare`")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise DataListError(f"preparation manifest {path} lacks {missing}; re-run `medflare prepare`")
    if manifest["format"] != MANIFEST_FORMAT:
        raise DataListError(f"preparation manifest {path} has format {manifest['format']!r}; this medflare reads format {MANIFEST_FORMAT}")
    if not isinstance(manifest["cases"], list) or not isinstance(manifest["parameters"], dict):
        raise DataListError(f"preparation manifest {path}: 'cases' must be a list and 'parameters' an object; re-run `medflare prepare`")
    return manifest


def manifest_outputs(manifest: dict, path: str) -> dict:
    """``{relative path: sha256}`` of every prepared file the manifest lists (passed cases).

    Raises:
        DataListError: a case or output entry is malformed (naming ``path``).
    """
    outputs = {}
    for n, case in enumerate(manifest["cases"]):
        entries = case.get("outputs") if isinstance(case, dict) else None
        if not isinstance(entries, list):
            raise DataListError(f"preparation manifest {path}: cases[{n}] has no 'outputs' list; re-run `medflare prepare`")
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(entry.get("sha256"), str):
                raise DataListError(f"preparation manifest {path}: cases[{n}] has a malformed output {entry!r}; re-run `medflare prepare`")
            outputs[os.path.normpath(entry["path"])] = entry["sha256"]
    return outputs
