"""What a job checks before it trains: the site's data is the preparation it requires, unchanged.

A job names ``required_preparation``: ``{"name": "medflare-brats-prep", "version": ">=1.0,<2"
[, "parameters_hash": "<sha256>"]}``. :func:`verify_preparation` refuses, with a
:class:`PreparationMismatch` (a :class:`~medflare.data.data_errors.DataListError`) that says
what to do, when

* the data root holds no manifest ("this site has not prepared its data with medflare
  prepare"), or one that is unreadable or inconsistent (its parameters do not hash to its
  ``parameters_hash``);
* the preparation's name differs, its version is outside the required range, or its
  parameters hash differs;
* a file the datalist (or ``files``) names is not in the manifest, or its sha256 differs from
  the manifest's (the data changed after preparation); the datalist or table the preparation
  wrote is itself checked (a table's clinical values and labels are data too), another
  datalist naming prepared files only file by file.

Versions are ``MAJOR[.MINOR[.PATCH]]`` compared as integer triples (missing parts are 0); a
requirement is one exact version or comma-separated clauses ``>=``, ``>``, ``<=``, ``<``,
``==``, ``!=`` (all must hold). Checksums are full sha256 of every named file, remembered per
process by file state (:mod:`.file_hashes`): one full read per job run.
"""

from __future__ import annotations

import csv
import json
import os
import re
from typing import Iterable, Mapping, Optional

from medflare.data.data_errors import DataListError
from medflare.preparation.file_hashes import sha256_files
from medflare.preparation.manifest import MANIFEST_NAME, manifest_outputs, read_manifest
from medflare.preparation.recipe import parameters_hash

__all__ = ["PreparationMismatch", "check_required_preparation", "datalist_files", "version_satisfies", "verify_preparation"]

_VERSION = re.compile(r"\d+(\.\d+){0,2}")
_CLAUSE = re.compile(r"\s*(>=|<=|==|!=|>|<)?\s*(\S+)\s*")
_HASH = re.compile(r"[0-9a-f]{64}")
_KEYS = ("name", "version", "parameters_hash")


class PreparationMismatch(DataListError):
    """The site's data is not the preparation the job requires (or has changed since)."""


def _version(text: str, what: str) -> tuple:
    if not isinstance(text, str) or not _VERSION.fullmatch(text.strip()):
        raise ValueError(f"{what} must be a version MAJOR[.MINOR[.PATCH]] (e.g. 1.0.0), got {text!r}")
    parts = [int(p) for p in text.strip().split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def _clauses(spec, what: str) -> list:
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{what} must be a version ('1.0.0') or a range ('>=1.0,<2'), got {spec!r}")
    clauses = []
    for part in spec.split(","):
        m = _CLAUSE.fullmatch(part)
        if not m:
            raise ValueError(f"{what} must be a version ('1.0.0') or a range ('>=1.0,<2'), got {spec!r}")
        clauses.append((m.group(1) or "==", _version(m.group(2), f"{what} ({spec!r})")))
    return clauses


def version_satisfies(version: str, spec: str) -> bool:
    """Whether ``version`` meets every clause of ``spec`` (see the module docstring).

    Raises:
        ValueError: either is malformed.
    """
    have = _version(version, "version")
    tests = {">=": have.__ge__, ">": have.__gt__, "<=": have.__le__, "<": have.__lt__, "==": have.__eq__, "!=": have.__ne__}
    return all(tests[op](want) for op, want in _clauses(spec, "required version"))


def check_required_preparation(value, name: str = "required_preparation") -> Optional[dict]:
    """``value`` when it is null or a valid requirement; else ValueError naming ``name``.

    A requirement: ``{"name": non-empty string, "version": version or range[, "parameters_hash": 64 hex digits]}``.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be null or {{'name': ..., 'version': ...[, 'parameters_hash': ...]}}, got {value!r}")
    unknown = sorted(set(value) - set(_KEYS))
    if unknown:
        raise ValueError(f"{name} has unknown key(s) {unknown}; allowed: {list(_KEYS)}")
    if not isinstance(value.get("name"), str) or not value["name"].strip():
        raise ValueError(f"{name}['name'] must be a preparation name (e.g. 'medflare-brats-prep'), got {value.get('name')!r}")
    _clauses(value.get("version"), f"{name}['version']")
    digest = value.get("parameters_hash")
    if "parameters_hash" in value and (not isinstance(digest, str) or not _HASH.fullmatch(digest)):
        raise ValueError(f"{name}['parameters_hash'] must be 64 lower-case hex digits (sha256), got {digest!r}")
    return dict(value)


def datalist_files(datalist: str, data_root: str, manifest: Mapping) -> list:
    """Every file a prepared datalist (JSON: ``image``/``label`` of each list's entries) or table
    (CSV: the manifest's ``image_column``) names, as absolute paths.

    Raises:
        PreparationMismatch: the datalist cannot be read or an entry is malformed.
    """
    where = f"datalist {datalist}"
    files = []
    try:
        if datalist.lower().endswith(".csv"):
            column = (manifest.get("prepared") or {}).get("image_column", "image")
            with open(datalist, newline="", encoding="utf-8-sig") as f:
                for row in csv.DictReader(f):
                    files.append((row.get(column) or "").strip())
        else:
            with open(datalist) as f:
                content = json.load(f)
            for key, items in content.items() if isinstance(content, dict) else []:
                if not isinstance(items, list):
                    continue
                for item in items:
                    if isinstance(item, dict):
                        images = item.get("image")
                        files += [images] if isinstance(images, str) else [p for p in images or [] if isinstance(p, str)]
                        if isinstance(item.get("label"), str):
                            files.append(item["label"])
    except (OSError, ValueError, csv.Error, TypeError) as e:
        raise PreparationMismatch(f"{where} cannot be read to verify its preparation: {type(e).__name__}: {e}") from None
    return [os.path.normpath(os.path.join(data_root, p)) for p in files if p]


def _check_identity(manifest: dict, required: dict, path: str) -> None:
    recorded = manifest.get("parameters_hash")
    try:
        consistent = parameters_hash(manifest["parameters"]) == recorded
    except (TypeError, ValueError):
        consistent = False
    if not consistent:
        raise PreparationMismatch(
            f"preparation manifest {path}: its parameters do not hash to its parameters_hash {recorded!r} (edited by hand?); "
            "re-run `medflare prepare`"
        )
    name, have = manifest.get("name"), manifest.get("version")
    if name != required["name"]:
        raise PreparationMismatch(
            f"site prepared its data with {name!r}, the job requires {required['name']!r}; run `medflare prepare` for that "
            "preparation and point the site's data configuration at its output"
        )
    try:
        ok = version_satisfies(have, required["version"])
    except ValueError:
        ok = False
    if not ok:
        raise PreparationMismatch(
            f"site prepared with version {have} of {name}, the job requires {required['version']}; re-run "
            f"`medflare prepare` with a medflare whose preparation version is {required['version']}"
        )
    want = required.get("parameters_hash")
    if want is not None and want != recorded:
        raise PreparationMismatch(
            f"site prepared {name} {have} with parameters {json.dumps(manifest['parameters'], sort_keys=True)} "
            f"(hash {recorded[:12]}...), the job requires parameters hash {want[:12]}...; re-run `medflare prepare` "
            "with the job's parameters"
        )


def verify_preparation(location: str, required, files: Optional[Iterable[str]] = None, datalist: Optional[str] = None) -> dict:
    """Check that the data at ``location`` is the required preparation, unchanged.

    Args:
        location: the manifest file, or the prepared data root holding it.
        required: ``{"name", "version"[, "parameters_hash"]}`` (:func:`check_required_preparation`).
        files: files to check (absolute, or relative to the manifest's folder).
        datalist: a prepared datalist or table whose files are checked too
            (:func:`datalist_files`). With neither, every file the manifest lists is checked.

    Returns:
        The manifest.

    Raises:
        ValueError: ``required`` is malformed (the job's fault).
        PreparationMismatch: the manifest is missing or unreadable, or see the module docstring;
            the message says what to re-run.
    """
    required = check_required_preparation(required)
    if required is None:
        raise ValueError("required_preparation must be given to verify a preparation, got None")
    if not isinstance(location, str) or not location:
        raise ValueError(f"location must be a manifest file or a prepared data root, got {location!r}")
    is_file = location.lower().endswith(".json") and not os.path.isdir(location)
    path = location if is_file else os.path.join(location, MANIFEST_NAME)
    try:
        manifest = read_manifest(path)
    except PreparationMismatch:
        raise
    except DataListError as e:
        raise PreparationMismatch(str(e)) from None
    root = os.path.dirname(os.path.abspath(path))
    _check_identity(manifest, required, path)
    outputs = manifest_outputs(manifest, path)
    named = [os.path.normpath(os.path.join(root, f)) for f in (files or [])]
    if datalist is not None:
        _check_prepared_datalist(datalist, manifest, root, path)
        named += datalist_files(datalist, root, manifest)
    if files is None and datalist is None:
        named = [os.path.join(root, p) for p in outputs]
    _check_files(named, outputs, root, path)
    return manifest


def _check_prepared_datalist(datalist: str, manifest: dict, root: str, path: str) -> None:
    """The datalist or table the preparation wrote must be unchanged (a table's clinical values
    and labels are data too); another datalist naming prepared files is checked file by file."""
    written = (manifest.get("prepared") or {}).get("datalist") or {}
    if not isinstance(written.get("path"), str) or os.path.realpath(os.path.join(root, written["path"])) != os.path.realpath(datalist):
        return
    try:
        digest = sha256_files([datalist])[datalist]
    except OSError as e:
        raise PreparationMismatch(f"datalist {datalist} cannot be read to verify its preparation ({e})") from None
    if digest != written.get("sha256"):
        raise PreparationMismatch(
            f"{datalist} changed after preparation (sha256 {digest[:12]}..., the manifest {path} recorded "
            f"{str(written.get('sha256'))[:12]}...); re-run `medflare prepare` rather than editing prepared data"
        )


def _check_files(named: list, outputs: dict, root: str, path: str) -> None:
    relative = {}
    for file in dict.fromkeys(named):
        key = os.path.relpath(file, root)
        if key not in outputs:
            raise PreparationMismatch(
                f"{file} is named by the site's datalist but is not in the preparation manifest {path} (not written by "
                "medflare prepare, or added after it); re-run `medflare prepare` and use the datalist it writes"
            )
        relative[file] = key
    try:
        digests = sha256_files(relative)
    except OSError as e:
        raise PreparationMismatch(f"a prepared file cannot be read ({e}); re-run `medflare prepare`") from None
    for file, key in relative.items():
        if digests[file] != outputs[key]:
            raise PreparationMismatch(
                f"{file} changed after preparation (sha256 {digests[file][:12]}..., the manifest recorded "
                f"{outputs[key][:12]}...); re-run `medflare prepare` rather than editing prepared data"
            )
