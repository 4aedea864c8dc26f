"""Brain MRI modality names as data sets spell them, mapped to medflare's channel order.

The network's four input channels are always :data:`MODALITIES` (``t1, t1ce, t2, flair``, the
order of the BraTS challenge and of MONAI's BraTS tutorials). Data sets spell them otherwise:
BraTS 2023 files end in ``t1n, t1c, t2w, t2f``; MSD Task01's ``dataset.json`` says
``{"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}``. :func:`channel_order` turns such a
``"modality"`` map into the permutation that puts a 4-D image's channels in medflare's order.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

from medflare.data.data_errors import DataListError

__all__ = ["MODALITIES", "channel_order", "modality_of"]

#: Channel order of the image, as in the BraTS challenge and MONAI's BraTS tutorials.
MODALITIES = ("t1", "t1ce", "t2", "flair")

_SPELLINGS = {
    "t1": ("t1", "t1w", "t1n", "t1native", "t1pre", "native t1"),
    "t1ce": ("t1ce", "t1c", "t1gd", "t1wce", "t1post", "t1gad", "t1contrast", "t1 gd", "t1wgd"),
    "t2": ("t2", "t2w"),
    "flair": ("flair", "t2f", "t2flair", "t2 flair", "t2wflair"),
}
_LOOKUP = {spelling.replace(" ", ""): modality for modality, spellings in _SPELLINGS.items() for spelling in spellings}


def modality_of(name: str) -> Optional[str]:
    """The :data:`MODALITIES` entry ``name`` spells (case, spaces, ``-`` and ``_`` ignored), or None."""
    if not isinstance(name, str):
        return None
    return _LOOKUP.get(re.sub(r"[^a-z0-9]", "", name.lower()))


def channel_order(modality: Mapping, where: str) -> tuple:
    """For a ``"modality"`` map ``{"0": name, ...}`` of a 4-channel image, the file channel that
    holds each of :data:`MODALITIES`: ``image[channel_order(...)]`` is in medflare's order.

    Example: MSD Task01's ``{"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}`` gives ``(1, 2, 3, 0)``.

    Raises:
        DataListError: the map does not have exactly the keys ``"0"``..``"3"``, or its names do not
            name the four modalities once each (the message names ``where`` and what was found).
    """
    if not isinstance(modality, Mapping):
        raise DataListError(f"{where}: 'modality' must be a map {{channel: name}}, got {modality!r}")
    expected_keys = [str(i) for i in range(len(MODALITIES))]
    if sorted(modality, key=str) != expected_keys:
        raise DataListError(
            f"{where}: 'modality' must name {len(MODALITIES)} channels {expected_keys}, got {dict(modality)!r}"
        )
    found = {key: modality_of(modality[key]) for key in expected_keys}
    if sorted(m for m in found.values() if m) != sorted(MODALITIES) or None in found.values():
        unknown = [modality[k] for k, m in found.items() if m is None]
        raise DataListError(
            f"{where}: 'modality' {dict(modality)!r} must name each of {list(MODALITIES)} once"
            + (f"; not recognised: {unknown!r}" if unknown else "")
        )
    channel_of = {m: int(key) for key, m in found.items()}
    return tuple(channel_of[m] for m in MODALITIES)
