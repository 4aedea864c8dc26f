"""Checking a site's contribution completely before any of it is used.

A contribution is refused, with the reason, when it does not match the global model exactly:
missing or extra keys, a different shape or dtype, a non-floating entry where the model has a
floating one, a NaN or infinite value, or (optionally) an L2 norm above a bound. Numpy's
broadcasting would silently accept some shape mismatches; here shapes must be equal.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np

from medflare.privacy.update_checks import all_finite, l2_norm

__all__ = ["ContributionRejected", "ModelSpec", "model_spec", "check_contribution"]

#: name -> (shape, dtype string)
ModelSpec = dict


class ContributionRejected(ValueError):
    """A contribution that must not be aggregated; the message says why."""


def model_spec(weights: Mapping) -> ModelSpec:
    """The shape and dtype of every entry of a model (numpy arrays or tensors)."""
    spec = {}
    for key, value in weights.items():
        array = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        spec[key] = (tuple(array.shape), str(array.dtype))
    return spec


def check_contribution(update: Mapping, spec: ModelSpec, max_norm: Optional[float] = None) -> float:
    """Refuse anything that does not fit ``spec`` exactly; return the update's L2 norm when
    ``max_norm`` is given (NaN otherwise: the norm is not computed when nothing bounds it).

    Dtypes must match the model's, except that a floating entry may arrive in another
    floating precision (float32 for a float64 model and so on).

    Raises:
        ContributionRejected: naming the first problem found.
    """
    if not isinstance(update, Mapping) or not update:
        raise ContributionRejected(f"update must be a non-empty mapping, got {type(update).__name__}")
    missing = sorted(set(spec) - set(update))
    extra = sorted(set(update) - set(spec))
    if missing:
        raise ContributionRejected(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        raise ContributionRejected(f"unexpected keys {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for key, (shape, dtype) in spec.items():
        value = update[key]
        if not isinstance(value, np.ndarray):
            raise ContributionRejected(f"{key!r} is {type(value).__name__}, not a numpy array")
        if tuple(value.shape) != tuple(shape):
            raise ContributionRejected(f"{key!r} has shape {tuple(value.shape)}, the model has {tuple(shape)}")
        model_float = np.issubdtype(np.dtype(dtype), np.floating)
        if model_float != np.issubdtype(value.dtype, np.floating) or (not model_float and str(value.dtype) != dtype):
            raise ContributionRejected(f"{key!r} has dtype {value.dtype}, the model has {dtype}")
        if model_float and value.size and not all_finite(value):
            raise ContributionRejected(f"{key!r} holds NaN or infinite values")
    if max_norm is None:
        return math.nan
    norm = l2_norm(update)  # the floating entries, which are the model's floating entries
    if not norm <= max_norm:
        raise ContributionRejected(f"update norm {norm:.4g} exceeds max_update_norm {max_norm:g}")
    return norm
