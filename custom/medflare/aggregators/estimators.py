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

__all__ = ["ESTIMATORS", "combine"]

ESTIMATORS = ("weighted_mean", "sharer_mean", "median", "trimmed_mean")


def combine(
    updates: Sequence[dict],
    weights: Sequence[float],
    estimator: str = "weighted_mean",
    masks: Optional[Sequence[dict]] = None,
    trim_fraction: float = 0.1,
) -> dict:
    """Combine accepted updates (same keys, shapes and float dtypes) into one.

    Args:
        updates: one ``{name: array}`` per site.
        weights: one positive weight per site (used by the means).
        estimator: one of :data:`ESTIMATORS`.
        masks: for ``sharer_mean``, one ``{name: bool array}`` per site marking shared entries
            (entries of non-floating dtype need no mask).
        trim_fraction: for ``trimmed_mean``, the share cut from each end, in [0, 0.5).

    Returns:
        ``{name: array}`` in each entry's dtype (non-floating entries are averaged and rounded).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not updates or len(updates) != len(weights):
        raise ValueError("need one weight per update and at least one update")
    total = float(sum(weights))
    out = {}
    for key, first in updates[0].items():
        floating = np.issubdtype(first.dtype, np.floating)
        if estimator == "weighted_mean" or not floating:
            acc = np.zeros(first.shape, dtype=np.float64)
            for u, w in zip(updates, weights):
                acc += (w / total) * u[key]
        elif estimator == "sharer_mean":
            acc = np.zeros(first.shape, dtype=np.float64)
            mass = np.zeros(first.shape, dtype=np.float64)
            for u, w, m in zip(updates, weights, masks):
                acc += w * np.where(m[key], u[key], 0.0)
                mass += w * m[key]
            acc = np.divide(acc, mass, out=np.zeros_like(acc), where=mass > 0)
        else:
            stack = np.stack([u[key] for u in updates]).astype(np.float64)
            if estimator == "median":
                acc = np.median(stack, axis=0)
            else:
                cut = int(math.floor(trim_fraction * len(updates)))
                ordered = np.sort(stack, axis=0)
                acc = ordered[cut : len(updates) - cut].mean(axis=0)
        out[key] = np.rint(acc).astype(first.dtype) if not floating else acc.astype(first.dtype)
    return out
