"""The error a site's data raises: the ground floor every module of :mod:`medflare.data` imports.

:class:`DataListError` (re-exported by :mod:`medflare.data.brats_layout`, where callers have
always found it) means the site's data is at fault, not the job: a datalist or table that is
missing or malformed, a path outside the data root
(:class:`~medflare.data.data_root_paths.DataPathError`), or a volume whose content is wrong
(:class:`~medflare.data.brats_volume_checks.VolumeCheckError`). Every message names the file.
"""

from __future__ import annotations

__all__ = ["DataListError"]


class DataListError(ValueError):
    """A datalist or the data it names is missing, unreadable or malformed."""
