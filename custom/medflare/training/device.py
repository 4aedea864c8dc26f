"""Choosing where training runs: the site's GPU when it has one, the CPU otherwise."""

from __future__ import annotations

import torch

__all__ = ["select_device", "use_amp"]

_CHOICES = ("auto", "cpu", "cuda")


def select_device(preference: str = "auto") -> torch.device:
    """Return the device to train on.

    Args:
        preference: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or
            ``"cuda:N"``.

    Raises:
        ValueError: unknown preference, or CUDA asked for where there is none.
    """
    if not isinstance(preference, str) or not (preference in _CHOICES or preference.startswith("cuda:")):
        raise ValueError(f"device must be one of {_CHOICES} or 'cuda:N', got {preference!r}")
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} asked for, but torch sees no CUDA device on this site")
    return torch.device(preference)


def use_amp(device: torch.device, requested: bool = True) -> bool:
    """Mixed precision only where it pays and is supported: on CUDA, when requested."""
    return bool(requested) and device.type == "cuda"
