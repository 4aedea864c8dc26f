"""What a model update must look like before any privacy mechanism touches it.

An update is a non-empty mapping from parameter name to a numpy array or torch tensor. Anything
else (a bare number, a list, an empty mapping, NaN or infinite values) is refused with
:class:`UnsafeUpdateError`, so that a filter raises and NVFlare sends nothing.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

__all__ = [
    "UnsafeUpdateError",
    "check_update",
    "is_floating",
    "numel",
    "all_finite",
    "as_numpy",
    "as_numpy_update",
    "is_normalisation_statistic",
    "l2_norm",
    "like_input",
]

#: numpy dtype kinds an update entry may have: floating, signed and unsigned integers, bool
_ARRAY_KINDS = "fiub"


class UnsafeUpdateError(ValueError):
    """An update that must not leave the site: malformed, non-finite, or over budget."""


def _is_tensor(value) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(value, torch.Tensor)


def is_floating(value) -> bool:
    """True for floating-point numpy arrays and torch tensors."""
    if isinstance(value, np.ndarray):
        return np.issubdtype(value.dtype, np.floating)
    return _is_tensor(value) and value.is_floating_point()


def numel(value) -> int:
    return int(value.size) if isinstance(value, np.ndarray) else int(value.numel())


def all_finite(value) -> bool:
    """True when no entry is NaN or infinite: min and max propagate NaN and show inf, and two
    reductions cost less than a mask of the whole tensor."""
    if numel(value) == 0:
        return True
    if isinstance(value, np.ndarray) or value.device.type == "cpu":
        array = value if isinstance(value, np.ndarray) else value.detach().numpy()
        return bool(np.isfinite(array.min()) and np.isfinite(array.max()))
    low, high = value.detach().aminmax()
    return bool(low.isfinite() and high.isfinite())


def as_numpy(value) -> np.ndarray:
    """The entry as a numpy array: no copy for arrays and CPU tensors (treat it as read-only)."""
    return value if isinstance(value, np.ndarray) else value.detach().cpu().numpy()


def l2_norm(update: Mapping) -> float:
    """L2 norm of all floating-point entries together, accumulated in float64."""
    total = 0.0
    with np.errstate(over="ignore"):  # an overflowing norm is returned as inf and refused by the caller
        for value in update.values():
            if is_floating(value):
                flat = as_numpy(value).reshape(-1)
                # buffered float64 accumulation: no copy of the tensor, no BLAS threads
                total += float(np.einsum("i,i->", flat, flat, dtype=np.float64))
    return math.sqrt(total)


def like_input(array: np.ndarray, original):
    """``array`` in the type of ``original``: a numpy array, or a tensor on ``original``'s device."""
    if isinstance(original, np.ndarray):
        return array
    import torch

    return torch.from_numpy(array).to(original.device)


def check_update(update, require_float: bool = True) -> None:
    """Refuse anything that is not a well-formed, finite update.

    Args:
        update: mapping of parameter name to numpy array or torch tensor.
        require_float: at least one floating-point entry with at least one element is required.

    Raises:
        UnsafeUpdateError: naming the first offending entry.
    """
    if not isinstance(update, Mapping) or not update:
        raise UnsafeUpdateError(f"update must be a non-empty mapping of name to array, got {type(update).__name__}")
    total = 0
    for key, value in update.items():
        if not isinstance(value, np.ndarray) and not _is_tensor(value):
            raise UnsafeUpdateError(f"update entry {key!r} is {type(value).__name__}, not a numpy array or torch tensor")
        if is_floating(value):
            if not all_finite(value):
                raise UnsafeUpdateError(f"update entry {key!r} holds NaN or infinite values")
            total += numel(value)
    if require_float and total == 0:
        raise UnsafeUpdateError("update has no floating-point values to release")


def _entry(key, value):
    """One update entry as a numpy array (zero-copy for CPU tensors) or, on an accelerator, a
    tensor; bfloat16 is widened to float32, which holds every bfloat16 value exactly."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _ARRAY_KINDS:
            raise UnsafeUpdateError(f"update entry {key!r} has dtype {value.dtype}; only numbers are released")
        # a subclass (a masked array can hide NaN behind its mask) becomes the plain array of its values
        return value if type(value) is np.ndarray else np.asarray(value.data if isinstance(value, np.ma.MaskedArray) else value)
    if not _is_tensor(value):
        raise UnsafeUpdateError(f"update entry {key!r} is {type(value).__name__}, not a numpy array or torch tensor")
    import torch

    if value.layout != torch.strided or value.is_complex():
        raise UnsafeUpdateError(f"update entry {key!r} is a {value.layout} {value.dtype} tensor; only dense real tensors are released")
    tensor = value.detach()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.to(torch.float32)
    if tensor.device.type == "cpu":
        return tensor.numpy()
    return tensor


def as_numpy_update(update) -> dict:
    """``update`` with every entry as a numpy array (tensors on an accelerator stay tensors, for
    the torch paths of the privacy functions), refusing anything that is not an update.

    Raises:
        UnsafeUpdateError: not a non-empty mapping of names to numeric arrays or tensors.
    """
    if not isinstance(update, Mapping) or not update:
        raise UnsafeUpdateError(f"update must be a non-empty mapping of name to array, got {type(update).__name__}")
    out = {}
    for key, value in update.items():
        if not isinstance(key, str):
            raise UnsafeUpdateError(f"update keys must be parameter names (strings), got {key!r:.80}")
        out[key] = _entry(key, value)
    return out


#: the buffer names torch's BatchNorm/InstanceNorm layers give their running statistics
_NORMALISATION_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def is_normalisation_statistic(name: str) -> bool:
    """True for a normalisation layer's running statistic (``...bn.running_var`` and the like).

    They are not learned weights: they are means and variances of the site's own images, and
    noising them can make a variance negative. The Gaussian filter withholds them (a zero
    difference: the global model keeps its own) and DP-SGD refuses networks that have them.
    """
    return isinstance(name, str) and name.rsplit(".", 1)[-1] in _NORMALISATION_STATISTICS
