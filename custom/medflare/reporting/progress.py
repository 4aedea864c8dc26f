"""Progress bars for long work (generating data, ...), shown only to a person at a terminal.

A bar goes to standard error and only when it is a terminal: under CI, in a log file or piped
into another program nothing is drawn, and what the work prints itself is unchanged.
"""

from __future__ import annotations

import sys
from typing import Iterable, Optional, TypeVar

__all__ = ["progress"]

T = TypeVar("T")


def progress(iterable: Iterable[T], total: Optional[int] = None, desc: str = "") -> Iterable[T]:
    """``iterable`` with a tqdm bar while a terminal watches, else ``iterable`` itself."""
    stream = sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # a bar is a courtesy: its absence changes nothing
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, file=stream, dynamic_ncols=True)
