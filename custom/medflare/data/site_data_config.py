"""Where a site's data lives: the site's business, never the job's.

A job names no data path. Each FLARE client finds its datalist and data root in site-local
configuration, a small JSON file::

    {"data_root": "/data/brats", "datalist": "/data/brats/datalist.json"}

Relative paths are relative to the folder of that file. The file is looked up in this order:

1. the environment variable ``MEDFLARE_DATA_CONFIG`` of the client process, whose value may
   contain ``{site_name}`` (one variable then serves several simulated sites);
2. ``<site workspace>/local/medflare_data.json``, installed by the site admin.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

from medflare.data.brats_layout import DataListError, read_json_object

__all__ = ["ENV_VAR", "LOCAL_FILE_NAME", "SiteDataConfig", "resolve_site_data_config", "read_site_data_config"]

ENV_VAR = "MEDFLARE_DATA_CONFIG"
LOCAL_FILE_NAME = "medflare_data.json"


@dataclass(frozen=True)
class SiteDataConfig:
    """A site's data location, with absolute paths, and the file it was read from."""

    data_root: str
    datalist: str
    source: str


def read_site_data_config(path: str) -> SiteDataConfig:
    """Read one data configuration file.

    Raises:
        DataListError: naming ``path`` when it is missing, not JSON or lacks a field.
    """
    content = read_json_object(path, "site data configuration")
    base = os.path.dirname(os.path.abspath(path))
    resolved = {}
    for key in ("data_root", "datalist"):
        value = content.get(key)
        if not isinstance(value, str) or not value:
            raise DataListError(f"site data configuration {path} needs a non-empty string {key!r}, got {value!r}")
        resolved[key] = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
    return SiteDataConfig(resolved["data_root"], resolved["datalist"], os.path.abspath(path))


def resolve_site_data_config(
    site_name: str, local_dir: Optional[str], environ: Optional[Mapping[str, str]] = None
) -> SiteDataConfig:
    """Find and read the data configuration of ``site_name``.

    Args:
        site_name: the FLARE client's name.
        local_dir: the site workspace's ``local/`` folder, or None when unknown.
        environ: the environment to read ``MEDFLARE_DATA_CONFIG`` from (default ``os.environ``).

    Raises:
        DataListError: naming every place looked at when no configuration is found, or the
            file that is unreadable.
    """
    environ = os.environ if environ is None else environ
    template = environ.get(ENV_VAR)
    if template:
        return read_site_data_config(template.replace("{site_name}", site_name))
    looked = [f"environment variable {ENV_VAR} (unset)"]
    if local_dir:
        path = os.path.join(local_dir, LOCAL_FILE_NAME)
        if os.path.exists(path):
            return read_site_data_config(path)
        looked.append(path)
    raise DataListError(f"no data configuration for site {site_name!r}; looked at: " + ", ".join(looked))
