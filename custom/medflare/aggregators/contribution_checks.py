"""Checking a site's contribution completely before any of it is used.

Pure numpy, no NVFlare: the adapter :mod:`.validated_aggregator` reads the shareable and calls
these. A contribution is refused, with the reason, when it does not match the global model
exactly:

- entries: missing or extra keys, anything but a plain ``numpy.ndarray`` (a list, a tensor, a
  masked array, an object array), a different shape (numpy's broadcasting would silently
  accept ``(1, n)`` for ``(n,)``; here shapes must be equal), a non-floating entry where the
  model has a floating one or the reverse, an integer or bool entry whose dtype differs from the
  model's;
- values: a floating entry is **cast to the model's dtype first and checked finite after the
  cast**, so a float64 ``1e300`` sent for a float32 model (which would become ``inf``) is
  refused like a NaN;
- norm: optionally, an L2 norm above a bound;
- round and weight: :func:`check_round` and :func:`check_weight`.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Mapping, Optional

import numpy as np

from medflare.privacy.update_checks import all_finite, l2_norm

__all__ = [
    "ContributionRejected",
    "ModelSpec",
    "model_spec",
    "checked_contribution",
    "check_contribution",
    "check_round",
    "check_weight",
]

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


def _names(keys) -> str:
    ordered = sorted((repr(k) for k in keys))  # repr: keys of mixed types still sort
    return f"[{', '.join(ordered[:5])}{', ...' if len(ordered) > 5 else ''}]"


def _entry_in_model_dtype(key, value, shape, dtype: np.dtype) -> np.ndarray:
    """One entry checked against the model's ``(shape, dtype)``, returned in the model's dtype."""
    if type(value) is not np.ndarray:  # noqa: E721 - subclasses (masked arrays, memmaps) hide values
        raise ContributionRejected(f"{key!r} is {type(value).__name__}, not a numpy array")
    if tuple(value.shape) != tuple(shape):
        raise ContributionRejected(f"{key!r} has shape {tuple(value.shape)}, the model has {tuple(shape)}")
    model_float = np.issubdtype(dtype, np.floating)
    if not model_float:
        if value.dtype != dtype:  # integer and bool entries (counters, flags) must match exactly
            raise ContributionRejected(f"{key!r} has dtype {value.dtype}, the model has {dtype}")
        return value
    if not np.issubdtype(value.dtype, np.floating):
        raise ContributionRejected(f"{key!r} has dtype {value.dtype}, the model has {dtype}")
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow becomes inf, refused below
        cast = value.astype(dtype, copy=False)
    if cast.size and not all_finite(cast):
        if all_finite(value):
            largest = float(np.max(np.abs(value.astype(np.float64))))
            raise ContributionRejected(
                f"{key!r} holds values outside the range of the model's dtype {dtype} "
                f"(largest magnitude {largest:.3g}, which becomes infinite in {dtype})"
            )
        raise ContributionRejected(f"{key!r} holds NaN or infinite values")
    return cast


def checked_contribution(
    update: Mapping, spec: ModelSpec, max_norm: Optional[float] = None
) -> tuple[dict[str, np.ndarray], float]:
    """Refuse anything that does not fit ``spec`` exactly; return the update in the model's
    dtypes and its L2 norm.

    A floating entry may arrive in another floating precision (float16 or float64 for a float32
    model); it is cast to the model's dtype, and the cast is what is checked and aggregated.

    Args:
        update: ``{name: numpy array}`` as received.
        spec: the global model's :func:`model_spec`.
        max_norm: refuse an update whose L2 norm (of the cast floating entries, accumulated in
            float64) exceeds this; None for no bound.

    Returns:
        ``(update cast to the model's dtypes, L2 norm)``.

    Raises:
        ContributionRejected: naming the first problem found.
    """
    if not isinstance(update, Mapping) or not update:
        raise ContributionRejected(f"update must be a non-empty mapping, got {type(update).__name__}")
    missing = set(spec) - set(update)
    extra = set(update) - set(spec)
    if missing:
        raise ContributionRejected(f"missing keys {_names(missing)}")
    if extra:
        raise ContributionRejected(f"unexpected keys {_names(extra)}")
    cast = {}
    for key, (shape, dtype) in spec.items():
        cast[key] = _entry_in_model_dtype(key, update[key], shape, np.dtype(dtype))
    norm = l2_norm({k: v for k, v in cast.items() if np.issubdtype(v.dtype, np.floating)})
    if max_norm is not None and not norm <= max_norm:
        raise ContributionRejected(f"update norm {norm:.4g} exceeds max_update_norm {max_norm:g}")
    return cast, norm


def check_contribution(update: Mapping, spec: ModelSpec, max_norm: Optional[float] = None) -> float:
    """:func:`checked_contribution` for callers that only need the verdict; returns the norm."""
    return checked_contribution(update, spec, max_norm)[1]


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, (bool, np.bool_))


def check_round(contribution_round, current_round) -> int:
    """The contribution's round cookie must be an int equal to the server's current round.

    Raises:
        ContributionRejected: the server has no current round, the contribution has no round
            (NVFlare's ``CONTRIBUTION_ROUND`` cookie), a round that is not an int (str, bool,
            float), or another round.
    """
    if current_round is None:
        raise ContributionRejected("the server has no current round (AppConstants.CURRENT_ROUND is not set)")
    if not _is_int(current_round):
        raise ContributionRejected(
            f"the server's current round is {current_round!r} ({type(current_round).__name__}), not an int"
        )
    if contribution_round is None:
        raise ContributionRejected("it carries no round (the CONTRIBUTION_ROUND cookie is missing)")
    if not _is_int(contribution_round):
        raise ContributionRejected(
            f"its round {contribution_round!r} ({type(contribution_round).__name__}) is not an int"
        )
    if int(contribution_round) != int(current_round):
        raise ContributionRejected(f"it is for round {contribution_round}, the current round is {current_round}")
    return int(current_round)


def check_weight(weight, weight_key: str, max_weight: Optional[float] = None) -> float:
    """A site's aggregation weight: a finite real number in ``(0, max_weight]``.

    Raises:
        ContributionRejected: bool, str, an array or any other non-real; NaN, inf, zero or
            negative; above ``max_weight``.
    """
    if isinstance(weight, (bool, np.bool_)) or not isinstance(weight, Real):
        raise ContributionRejected(
            f"weight {weight_key}={weight!r:.60} ({type(weight).__name__}) is not a positive number"
        )
    value = float(weight)
    if not math.isfinite(value) or value <= 0:
        raise ContributionRejected(f"weight {weight_key}={weight!r} is not a positive number")
    if max_weight is not None and value > max_weight:
        raise ContributionRejected(f"weight {weight_key}={weight!r} exceeds max_weight {max_weight:g}")
    return value
