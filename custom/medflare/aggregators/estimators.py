"""How the accepted contributions of a round are combined into one update.

Notes:
    With site updates :math:`u_s` and weights :math:`n_s > 0` (steps or samples):

    - ``weighted_mean`` (FedAvg, McMahan et al. 2017 [1]):
      :math:`\\bar u = \\sum_s n_s u_s / \\sum_s n_s`.
    - ``sharer_mean``, for partial sharing, where site :math:`s` shares entry :math:`i` only
      when :math:`m_{s,i} = 1`: :math:`\\bar u_i = \\sum_s n_s m_{s,i} u_{s,i} / \\sum_s n_s m_{s,i}`
      (0 where no site shared :math:`i`). The plain mean treats a withheld entry as a shared
      zero and shrinks every entry towards 0 by the fraction of sites withholding it; the
      sharer mean averages each entry over the sites that actually sent it, at the cost of a
      higher variance where few sites share.
    - ``median``: the coordinate-wise median (unweighted), robust to a minority of arbitrary
      updates (Yin et al. 2018 [2]).
    - ``trimmed_mean``: per coordinate, drop the ``trim_fraction`` largest and smallest values
      and average the rest (unweighted) [2].

    Weights are summed without overflow: with :math:`n_{max} = \\max_s n_s`, each site's share
    is :math:`p_s = (n_s / n_{max}) / \\sum_t (n_t / n_{max})`, the sum taken exactly
    (``math.fsum``). Every term is in (0, 1], so two sites of weight 1e308 each get 1/2 instead
    of :math:`1e308 / \\infty = 0`. Every estimator computes in float64 and returns each entry
    in the dtype the caller names (the global model's), whatever the sites sent.

    References:
        [1] B. McMahan et al., "Communication-Efficient Learning of Deep Networks from
            Decentralized Data", AISTATS 2017.
        [2] D. Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
            Rates", ICML 2018.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

__all__ = ["ESTIMATORS", "combine", "weight_shares", "total_weight"]

ESTIMATORS = ("weighted_mean", "sharer_mean", "median", "trimmed_mean")


def _relative(weights: Sequence[float]) -> list[float]:
    """Each weight divided by the largest, so that every term is in (0, 1]."""
    values = [float(w) for w in weights]
    if not values or not all(math.isfinite(w) and w > 0 for w in values):
        raise ValueError(f"weights must be finite positive numbers, got {values!r:.200}")
    largest = max(values)
    return [w / largest for w in values]


def weight_shares(weights: Sequence[float]) -> list[float]:
    """:math:`p_s = n_s / \\sum_t n_t`, computed without overflow (see the module notes)."""
    relative = _relative(weights)
    total = math.fsum(relative)
    return [r / total for r in relative]


def total_weight(weights: Sequence[float]) -> float:
    """:math:`\\sum_s n_s`, exact to rounding; ``inf`` only when the true sum exceeds the float range."""
    values = [float(w) for w in weights]
    largest = max(values)
    with np.errstate(over="ignore"):
        return float(np.float64(largest) * math.fsum(w / largest for w in values))


def combine(
    updates: Sequence[dict],
    weights: Sequence[float],
    estimator: str = "weighted_mean",
    masks: Optional[Sequence[dict]] = None,
    trim_fraction: float = 0.1,
    dtypes: Optional[dict] = None,
) -> dict:
    """Combine accepted updates (same keys and shapes) into one.

    Args:
        updates: one ``{name: array}`` per site.
        weights: one positive weight per site (used by the means).
        estimator: one of :data:`ESTIMATORS`.
        masks: for ``sharer_mean``, one ``{name: bool array}`` per site marking shared entries
            (entries of non-floating dtype need no mask).
        trim_fraction: for ``trimmed_mean``, the share cut from each end, in [0, 0.5).
        dtypes: ``{name: dtype}`` of the result (the global model's); default: the first
            update's dtypes.

    Returns:
        ``{name: array}``, computed in float64 and cast to ``dtypes`` (non-floating entries are
        averaged and rounded half to even; a bool entry is thus a weighted majority, ties False).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not updates or len(updates) != len(weights):
        raise ValueError("need one weight per update and at least one update")
    shares = weight_shares(weights)
    relative = _relative(weights)
    out = {}
    for key, first in updates[0].items():
        dtype = np.dtype(dtypes[key]) if dtypes is not None else first.dtype
        floating = np.issubdtype(dtype, np.floating)
        if estimator == "weighted_mean" or not floating:
            acc = np.zeros(first.shape, dtype=np.float64)
            for u, p in zip(updates, shares):
                acc += p * u[key].astype(np.float64, copy=False)
        elif estimator == "sharer_mean":
            acc = np.zeros(first.shape, dtype=np.float64)
            mass = np.zeros(first.shape, dtype=np.float64)
            for u, r, m in zip(updates, relative, masks):
                acc += r * np.where(m[key], u[key].astype(np.float64, copy=False), 0.0)
                mass += r * m[key]
            acc = np.divide(acc, mass, out=np.zeros_like(acc), where=mass > 0)
        else:
            stack = np.stack([u[key] for u in updates]).astype(np.float64)
            if estimator == "median":
                acc = np.median(stack, axis=0)
            else:
                cut = int(math.floor(trim_fraction * len(updates)))
                ordered = np.sort(stack, axis=0)
                acc = ordered[cut : len(updates) - cut].mean(axis=0)
        out[key] = np.rint(acc).astype(dtype) if not floating else acc.astype(dtype)
    return out
