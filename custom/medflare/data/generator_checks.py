"""Argument checks shared by the synthetic-data generators (``medflare data brats`` / ``cxr``)."""

from __future__ import annotations

import numpy as np

__all__ = ["check_int_in"]


def check_int_in(name: str, value, low: int, high: int) -> None:
    """Refuse anything but an int (numpy ints too, bool not) in ``[low, high]``, with a
    ValueError naming the argument, the interval and the value."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
