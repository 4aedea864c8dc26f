"""The packages only the demo data and the reports' figures need, and the one way to ask for one.

``pip install medflare`` carries what a site needs to train, filter and aggregate. Generating
the demo sites (scipy's image filters, nilearn's MNI152 templates) and drawing figures
(matplotlib) need the ``demo`` extra, which ``make demo`` and ``make test`` install. Without it a
figure is left out with a note and the rest of the run goes on; generating demo data stops with
the install hint (MONAI's ``optional_import`` habit: fail only when used, say how to fix it).
"""

from __future__ import annotations

import importlib
import importlib.util

__all__ = ["DEMO_EXTRA_HINT", "MissingDependency", "available", "require"]

DEMO_EXTRA_HINT = "pip install 'medflare[demo]'"


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed; the message says how to install it."""


def available(module: str) -> bool:
    """Whether ``module`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, purpose: str):
    """Import ``module``, or raise :class:`MissingDependency` naming ``purpose`` and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"{purpose} needs {module}, which is not installed: {DEMO_EXTRA_HINT}") from None
