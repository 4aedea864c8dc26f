"""Checks of a study function's options, before any config is built.

Numbers go through the project's :mod:`medflare.privacy.argument_checks` (bool, NaN and inf
refused); this module adds named choices and "``None``: the shipped value" ints. Every message
names the option, its ``!r`` value and what is allowed.
"""

from __future__ import annotations

import difflib
from typing import Optional, Sequence

from medflare.privacy.argument_checks import check_int, check_real

__all__ = ["check_choice", "check_int", "check_optional_int", "check_real"]


def check_choice(name: str, value, allowed: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``allowed``.

    Raises:
        TypeError: not a str.
        ValueError: a str that is not allowed; the message suggests the closest allowed one.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {list(allowed)}, got {value!r} ({type(value).__name__})")
    if value not in allowed:
        close = difflib.get_close_matches(value.lower(), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}{hint}")
    return value


def check_optional_int(
    name: str, value, default: Optional[int], low: int = 1, high: Optional[int] = None
) -> Optional[int]:
    """``default`` for ``None``, else ``value`` checked as :func:`check_int` checks it."""
    if value is None:
        return default
    return check_int(name, value, low, high)
