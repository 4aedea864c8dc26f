"""Where a site's data lives: the site's business, never the job's.

A job names no data path. Each FLARE client finds its datalist and data root in site-local
configuration, a small JSON file. A site holding several data sets keys them by name::

    {"datasets": {"segmentation":  {"data_root": "/data/brats", "datalist": "/data/brats/datalist.json"},
                  "outcome_table": {"data_root": "/data/heart", "datalist": "/data/heart/table.csv"},
                  "outcome_image": {"data_root": "/data/cxr",   "datalist": "/data/cxr/table.csv"}}}

A job's executor asks for its **data set name**: the job's ``dataset`` argument when it gives
one, else the executor's kind (:data:`DATASET_KINDS`: ``segmentation`` for the segmentation
executor; ``outcome_image`` for an outcome executor with an image column, ``outcome_table``
without). So one install serves a segmentation job and an outcome job alike, and switching jobs
needs no reinstall. The **flat** form of a site with one data set,
``{"data_root": ..., "datalist": ...}``, stays valid and serves every name.

Relative paths, in either form, are relative to the folder of that file. The file is looked up
in this order:

1. the environment variable ``MEDFLARE_DATA_CONFIG`` of the client process, whose value may
   contain ``{site_name}`` (one variable then serves several simulated sites) and ``{dataset}``
   (replaced by the data set name asked for); the file it names may be flat or keyed;
2. ``<site workspace>/local/medflare_data.json``, installed by ``medflare site install``
   (always the keyed form).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

from medflare.data.brats_layout import DataListError, read_json_object

__all__ = [
    "DATASETS_KEY",
    "DATASET_KINDS",
    "ENV_VAR",
    "LOCAL_FILE_NAME",
    "OUTCOME_IMAGE",
    "OUTCOME_TABLE",
    "SEGMENTATION",
    "SiteDataConfig",
    "check_dataset_name",
    "keyed_data_config",
    "read_site_data_config",
    "read_site_datasets",
    "resolve_site_data_config",
]

ENV_VAR = "MEDFLARE_DATA_CONFIG"
LOCAL_FILE_NAME = "medflare_data.json"
DATASETS_KEY = "datasets"

#: the data set names the executor kinds ask for when a job names none
SEGMENTATION = "segmentation"
OUTCOME_TABLE = "outcome_table"
OUTCOME_IMAGE = "outcome_image"
DATASET_KINDS = (SEGMENTATION, OUTCOME_TABLE, OUTCOME_IMAGE)

# a letter or digit first: no hidden file and no '..' when a name fills {dataset} in a path
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_NAME_RULE = "a non-empty string of letters, digits, '_', '-' and '.', starting with a letter or digit"


@dataclass(frozen=True)
class SiteDataConfig:
    """A site's data location, with absolute paths, the file it was read from, and the data
    set name it is kept under in that file (``None`` for a flat file)."""

    data_root: str
    datalist: str
    source: str
    dataset: Optional[str] = None


def check_dataset_name(value, what: str = "dataset", error: type = ValueError) -> str:
    """``value`` when it is a valid data set name; else raise ``error`` naming ``what``.

    Examples: ``segmentation``, ``outcome_table``, ``brats-2021``, ``cxr.v2``.
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise error(f"{what} must be {_NAME_RULE} (e.g. {', '.join(DATASET_KINDS)}), got {value!r}")
    return value


def _entry(content, path: str, where: str, base: str, dataset: Optional[str]) -> SiteDataConfig:
    if not isinstance(content, dict):
        raise DataListError(f"site data configuration {path}: {where} must be an object {{data_root, datalist}}, got {content!r}")
    resolved = {}
    for key in ("data_root", "datalist"):
        value = content.get(key)
        if not isinstance(value, str) or not value:
            raise DataListError(f"site data configuration {path} needs a non-empty string {key!r} in {where}, got {value!r}")
        resolved[key] = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
    return SiteDataConfig(resolved["data_root"], resolved["datalist"], os.path.abspath(path), dataset)


def read_site_datasets(path: str) -> list[SiteDataConfig]:
    """Every data set of one data configuration file, in file order: one entry with
    ``dataset=None`` for a flat file, one per name for a keyed file.

    Raises:
        DataListError: naming ``path`` when it is missing or not JSON; a flat file lacking a
            field; a keyed file with unknown top-level keys, no data set, or an entry (named
            by its key) that is malformed or under an invalid name.
    """
    content = read_json_object(path, "site data configuration")
    base = os.path.dirname(os.path.abspath(path))
    if DATASETS_KEY not in content:
        return [_entry(content, path, "the file", base, None)]
    unknown = sorted(set(content) - {DATASETS_KEY})
    if unknown:
        raise DataListError(
            f"site data configuration {path}: a keyed file holds only {DATASETS_KEY!r}, got also {unknown} "
            f"(put each data set's data_root and datalist under {DATASETS_KEY}.<name>)"
        )
    datasets = content[DATASETS_KEY]
    if not isinstance(datasets, dict) or not datasets:
        raise DataListError(
            f"site data configuration {path}: {DATASETS_KEY!r} must be a non-empty object "
            f"{{name: {{data_root, datalist}}}}, got {datasets!r}"
        )
    entries = []
    for name, entry in datasets.items():
        check_dataset_name(name, f"site data configuration {path}: the data set name under {DATASETS_KEY!r}", DataListError)
        entries.append(_entry(entry, path, f"{DATASETS_KEY}.{name}", base, name))
    return entries


def read_site_data_config(path: str, dataset: Optional[str] = None, dataset_from: Optional[str] = None) -> SiteDataConfig:
    """The data set ``dataset`` of one data configuration file.

    Args:
        path: the file, flat or keyed.
        dataset: the data set name asked for; a flat file serves every name. ``None``: the
            keyed file's only data set.
        dataset_from: where the name came from, for the message when the file lacks it
            (e.g. "the job's dataset argument").

    Raises:
        DataListError: as :func:`read_site_datasets`; or naming the file, the name asked for
            and the names the file has when it has no such data set (or, with ``dataset=None``,
            several).
    """
    entries = read_site_datasets(path)
    if entries[0].dataset is None:
        return entries[0]
    names = [e.dataset for e in entries]
    if dataset is None:
        if len(entries) == 1:
            return entries[0]
        raise DataListError(
            f"site data configuration {path} holds several data sets {names} and none was asked for: "
            "name one (a job names it with its executor's 'dataset' argument)"
        )
    check_dataset_name(dataset)
    for entry in entries:
        if entry.dataset == dataset:
            return entry
    origin = f" (asked for by {dataset_from})" if dataset_from else ""
    raise DataListError(
        f"site data configuration {path} has no data set {dataset!r}{origin}; this site has {names}. "
        f"Install it (medflare site install --data {dataset}=PATH ...) or have the job name one of these "
        "with its executor's 'dataset' argument"
    )


def resolve_site_data_config(
    site_name: str,
    local_dir: Optional[str],
    environ: Optional[Mapping[str, str]] = None,
    dataset: Optional[str] = None,
    dataset_from: Optional[str] = None,
) -> SiteDataConfig:
    """Find and read the data configuration of ``site_name``, for data set ``dataset``.

    Args:
        site_name: the FLARE client's name.
        local_dir: the site workspace's ``local/`` folder, or None when unknown.
        environ: the environment to read ``MEDFLARE_DATA_CONFIG`` from (default ``os.environ``).
        dataset: the data set name a job's executor asks for (``None``: the site's only one).
        dataset_from: where that name came from, for the message when the site lacks it.

    Raises:
        DataListError: naming every place looked at when no configuration is found, the file
            that is unreadable, or the data set the file does not hold (with those it does).
    """
    environ = os.environ if environ is None else environ
    template = environ.get(ENV_VAR)
    if template:
        path = template.replace("{site_name}", site_name)
        if "{dataset}" in path:
            if dataset is None:
                raise DataListError(f"environment variable {ENV_VAR}={template!r} contains {{dataset}} and no data set was asked for")
            path = path.replace("{dataset}", check_dataset_name(dataset))
        return read_site_data_config(path, dataset, dataset_from)
    looked = [f"environment variable {ENV_VAR} (unset)"]
    if local_dir:
        path = os.path.join(local_dir, LOCAL_FILE_NAME)
        if os.path.exists(path):
            return read_site_data_config(path, dataset, dataset_from)
        looked.append(path)
    raise DataListError(f"no data configuration for site {site_name!r}; looked at: " + ", ".join(looked))


def keyed_data_config(datasets: Mapping[str, tuple[str, str]]) -> dict:
    """The keyed file's content for ``{name: (data_root, datalist)}`` (what an install writes)."""
    for name in datasets:
        check_dataset_name(name, "data set name")
    return {DATASETS_KEY: {name: {"data_root": root, "datalist": datalist} for name, (root, datalist) in datasets.items()}}
