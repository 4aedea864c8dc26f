"""Paths named by a site's datalist or outcome table, kept inside the site's data root.

A datalist is data, and data can be wrong or hostile: an entry ``../../etc/shadow``, an
absolute path elsewhere on the machine or a symlink out of the data folder would make a job's
trainer read (and its model memorise) files the site never put in its data root. Every path is
resolved as the loader will open it (``..`` and symlinks followed) and must lie inside the
resolved data root. Used by :mod:`medflare.data.brats_layout` and
:mod:`medflare.data.outcome_table`, and so by the trainers and ``medflare site install``.
"""

from __future__ import annotations

import os

from medflare.data.data_errors import DataListError

__all__ = ["DataPathError", "path_in_data_root"]


class DataPathError(DataListError):
    """A path named by a site's datalist or table is empty or resolves outside its data root."""


def path_in_data_root(data_root: str, path, where: str) -> str:
    """``path`` joined to ``data_root`` and normalised, refused unless it resolves inside it.

    Args:
        data_root: the site's data folder.
        path: as written in the datalist: relative to ``data_root``, or absolute.
        where: what names the entry in a message, e.g. ``"datalist /d/list.json: training[3]"``.

    Returns:
        The normalised path (symlinks kept, so messages show what the site wrote).

    Raises:
        DataPathError: ``path`` is not a non-empty string, or the file it reaches after
            resolving ``..`` and symlinks is outside the resolved ``data_root``.
    """
    if not isinstance(path, str) or not path.strip():
        raise DataPathError(f"{where}: a path must be a non-empty string, got {path!r}")
    joined = os.path.normpath(os.path.join(data_root, path))
    root = os.path.realpath(data_root)
    resolved = os.path.realpath(joined)
    if os.path.commonpath([root, resolved]) != root:
        via = "" if resolved == joined else f" (as {joined})"
        raise DataPathError(
            f"{where}: {path!r} resolves to {resolved}{via}, outside the data root {root}; every file must "
            "lie inside data_root, symlinks included (move the data in, or point data_root at a folder holding it)"
        )
    return joined
