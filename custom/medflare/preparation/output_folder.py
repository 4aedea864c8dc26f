"""The folder a preparation writes into: empty, new, or holding an earlier preparation.

A preparation never writes over data it did not make: the output folder must not exist, be
empty, or hold a ``medflare_preparation.json`` (then the files that manifest lists, and the
datalist, table and data configuration it wrote, are removed first, so no stale case survives
a re-run). It may lie inside the input data root, but must not be it, nor hold the input
datalist or table.
"""

from __future__ import annotations

import json
import os

from medflare.data.data_errors import DataListError

__all__ = ["claim_output_folder"]


def _inside(folder: str, path: str) -> bool:
    folder, path = os.path.realpath(folder), os.path.realpath(path)
    return os.path.commonpath([folder, path]) == folder


def claim_output_folder(out: str, data_root: str, input_list: str, manifest_name: str) -> str:
    """Make ``out`` ready for a preparation and return its absolute path.

    Raises:
        ValueError: ``out`` is not a string, is the data root, holds the input datalist or table,
            or is a non-empty folder without a manifest (or a file).
    """
    if not isinstance(out, str) or not out.strip():
        raise ValueError(f"out must be a folder path, got {out!r}")
    out = os.path.abspath(out)
    if os.path.realpath(out) == os.path.realpath(data_root):
        raise ValueError(f"out {out!r} is the input data root; prepared data goes into a folder of its own")
    if _inside(out, input_list):
        raise ValueError(f"out {out!r} holds the input datalist or table {input_list}; choose another folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out {out!r} is a file, not a folder")
    manifest = os.path.join(out, manifest_name)
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(manifest):
        raise ValueError(
            f"out {out!r} is not empty and holds no {manifest_name}; prepared data goes into a new or empty folder "
            "(or one an earlier medflare prepare wrote)"
        )
    if os.path.isfile(manifest):
        _remove_earlier(out, manifest)
    os.makedirs(out, exist_ok=True)
    return out


def _remove_earlier(out: str, manifest: str) -> None:
    try:
        with open(manifest) as f:
            earlier = json.load(f)
        cases = earlier.get("cases", [])
        written = [o["path"] for c in cases for o in c.get("outputs", [])]
        written += [earlier.get("prepared", {}).get(k, {}).get("path") for k in ("datalist", "data_config")]
    except (OSError, ValueError, AttributeError, TypeError, KeyError) as e:
        raise DataListError(f"earlier manifest {manifest} is unreadable ({e}); remove the folder {out} by hand") from None
    for relative in written:
        if not isinstance(relative, str):
            continue
        path = os.path.join(out, relative)
        if _inside(out, path) and os.path.isfile(path):
            os.remove(path)
            parent = os.path.dirname(path)
            if os.path.realpath(parent) != os.path.realpath(out) and _inside(out, parent) and not os.listdir(parent):
                os.rmdir(parent)
    os.remove(manifest)
