"""Loud argument checks shared by the privacy code: bool, NaN and inf are refused along with
out-of-range values, and every message names the argument, its value and what is allowed."""

from __future__ import annotations

import math
from typing import Optional

__all__ = ["check_real", "check_int"]


def check_real(
    name: str,
    value,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float if it is a finite real number within the interval.

    Raises:
        TypeError: ``value`` is not an int or float (bool is refused).
        ValueError: NaN, infinite or outside the interval; the message states the interval.
    """
    lo = "-inf" if low is None else repr(low)
    hi = "inf" if high is None else repr(high)
    interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number in {interval}, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number in {interval}, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def check_int(name: str, value, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """Return ``value`` if it is an int (not bool) within ``[low, high]``.

    Raises:
        TypeError: not an int.
        ValueError: out of range.
    """
    interval = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int in {interval}, got {value!r} ({type(value).__name__})")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an int in {interval}, got {value!r}")
    return value
