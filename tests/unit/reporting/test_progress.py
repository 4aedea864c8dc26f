"""A bar is drawn only at a terminal; otherwise the iterable is handed back untouched."""

import io
import sys

from medflare.reporting.progress import progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_no_bar_when_standard_error_is_not_a_terminal(monkeypatch):
    items = [1, 2, 3]
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress(items, desc="x") is items


def test_a_bar_at_a_terminal_yields_every_item(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert list(progress(range(4), desc="cases")) == [0, 1, 2, 3]
    assert "cases" in terminal.getvalue()
