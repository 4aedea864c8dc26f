"""The packages only the demo data and the reports' figures need, and the one way to ask for one.

``pip install medflare`` carries what a site needs to train, filter and aggregate. Generating
the demo sites (scipy's image filters, nilearn's MNI152 templates) and drawing figures
(matplotlib) need the ``demo`` extra, which ``make demo`` and ``make test`` install. Without it a
figure is left out with a note and the rest of the run goes on; generating demo data stops with
the install hint (MONAI's ``optional_import`` habit: fail only when used, say how to fix it).

Exporting a global model to ONNX (``medflare model export``, the server's end-of-run export)
needs ``onnx`` and ``onnxruntime``, the ``export`` extra; without them the ONNX export is
refused with :data:`EXPORT_EXTRA_HINT` and TorchScript still works.
"""

from __future__ import annotations

import importlib
import importlib.util

__all__ = ["DEMO_EXTRA_HINT", "EXPORT_EXTRA_HINT", "MissingDependency", "available", "require"]

DEMO_EXTRA_HINT = "pip install 'medflare[demo]'"
EXPORT_EXTRA_HINT = "pip install 'medflare[export]'"


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed; the message says how to install it."""


def available(module: str) -> bool:
    """Whether ``module`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, purpose: str, hint: str = DEMO_EXTRA_HINT):
    """Import ``module``, or raise :class:`MissingDependency` naming ``purpose`` and the extra
    (``hint``: how to install it, the demo extra unless given)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"{purpose} needs {module}, which is not installed: {hint}") from None
