"""Partial (percentile) sharing of a model update: keep only its largest entries.

Notes:
    Given an update :math:`\\Delta w \\in \\mathbb{R}^n` (all floating-point entries of all
    tensors taken together) and a fraction :math:`f \\in (0, 1]`, the site shares the
    :math:`k = \\mathrm{round}(f n)` entries of largest magnitude :math:`|\\Delta w_i|`, each
    clipped to :math:`[-\\gamma, \\gamma]`, and withholds every other entry (sent as 0):

    .. math::
        \\tilde{\\Delta w}_i = \\begin{cases} \\mathrm{clip}(\\Delta w_i, -\\gamma, \\gamma) &
        |\\Delta w_i| \\geq \\tau_k \\\\ 0 & \\text{otherwise} \\end{cases}

    where :math:`\\tau_k` is the k-th largest magnitude. Ties at :math:`\\tau_k` are broken in
    tensor order so that exactly k entries are shared. This is the "partial model sharing"
    of Li et al. (2019), [1] section 3.1, after Shokri and Shmatikov (2015) [2].

    Non-floating entries (for example BatchNorm's ``num_batches_tracked`` counters) take no
    part in the selection and are always withheld (sent as zeros of their dtype): a counter is
    not a learned quantity, and withholding it means nothing leaves the site unfiltered.

    **This is not differential privacy.** It reduces what an update reveals and bounds each
    shared value, but gives no (epsilon, delta) guarantee: the shared entries are exact
    functions of the site's data, and which entries are shared is itself data-dependent. Use
    :mod:`medflare.privacy.gaussian_mechanism` for a formal guarantee.

    References:
        [1] W. Li et al., "Privacy-preserving Federated Brain Tumour Segmentation", MLMI 2019,
            arXiv:1910.00962.
        [2] R. Shokri and V. Shmatikov, "Privacy-Preserving Deep Learning", CCS 2015.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

from medflare.privacy.argument_checks import check_real
from medflare.privacy.update_checks import as_numpy, check_update, is_floating, like_input, numel

__all__ = ["SharingSummary", "share_largest_fraction", "check_sharing_arguments"]


@dataclass(frozen=True)
class SharingSummary:
    """How much of the update was shared.

    Attributes:
        num_shared: floating-point entries shared (exactly ``round(fraction_shared * num_total)``).
        num_total: floating-point entries in the update.
        threshold: magnitude of the smallest shared entry (``inf`` when nothing is shared).
    """

    num_shared: int
    num_total: int
    threshold: float


def check_sharing_arguments(fraction_shared, gamma) -> tuple[float, Optional[float]]:
    """Validate ``fraction_shared`` in (0, 1] and ``gamma`` in (0, inf) or None (no clipping)."""
    fraction = check_real("fraction_shared", fraction_shared, 0.0, 1.0, low_open=True)
    bound = None if gamma is None else check_real("gamma", gamma, 0.0, None, low_open=True)
    return fraction, bound


def _is_cpu(value) -> bool:
    return isinstance(value, np.ndarray) or value.device.type == "cpu"


def share_largest_fraction(update: Mapping, fraction_shared: float, gamma: Optional[float]) -> tuple[dict, SharingSummary]:
    """Share the ``fraction_shared`` largest-magnitude entries of ``update``, clipped to ±``gamma``.

    The caller's arrays are never modified; each output entry is a new array (or tensor) of the
    input's type, dtype, shape and device.

    Args:
        update: name -> numpy array or torch tensor (a weight difference).
        fraction_shared: fraction of floating-point entries to share, in (0, 1].
        gamma: bound on each shared value, in (0, inf), or None to share values unclipped.

    Returns:
        ``(shared_update, summary)``.

    Raises:
        UnsafeUpdateError: malformed, empty or non-finite update.
        ValueError, TypeError: bad ``fraction_shared`` or ``gamma``.
    """
    fraction, bound = check_sharing_arguments(fraction_shared, gamma)
    check_update(update)
    if all(_is_cpu(v) for v in update.values()):
        return _share_numpy(update, fraction, bound)
    return _share_torch(update, fraction, bound)


def _select_count(total: int, fraction: float) -> int:
    return min(total, int(round(fraction * total)))


def _parallel(function, items: list) -> list:
    """Run ``function`` over ``items`` on the machine's cores (numpy releases the GIL)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    workers = min(len(items), os.cpu_count() or 1, 8)
    if workers <= 1:
        return [function(i) for i in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(function, items))


def _share_numpy(update: Mapping, fraction: float, bound: Optional[float]) -> tuple[dict, SharingSummary]:
    views = {k: as_numpy(v) for k, v in update.items()}
    floats = [k for k, v in update.items() if is_floating(v)]
    total = sum(views[k].size for k in floats)
    k_shared = _select_count(total, fraction)

    if k_shared == 0:
        threshold = np.inf
    elif k_shared == total:
        threshold = 0.0
    else:
        # k-th largest magnitude by linear-time selection on one buffer of magnitudes
        dtype = np.float64 if any(views[k].dtype == np.float64 for k in floats) else np.float32
        magnitudes = np.empty(total, dtype=dtype)
        bounds, offset = [], 0
        for k in floats:
            bounds.append((k, offset, offset + views[k].size))
            offset += views[k].size
        _parallel(lambda b: np.abs(views[b[0]].reshape(-1), out=magnitudes[b[1] : b[2]]), bounds)
        magnitudes.partition(total - k_shared)  # in place: no second buffer
        threshold = float(magnitudes[total - k_shared])
        del magnitudes

    def select(key):
        a = views[key]
        mask = np.greater_equal(a, threshold)
        mask |= np.less_equal(a, -threshold)
        return mask

    masks = dict(zip(floats, _parallel(select, floats))) if k_shared else {}
    excess = sum(int(np.count_nonzero(m)) for m in masks.values()) - k_shared
    # ties at the threshold: keep the first ones in tensor order, drop the surplus from the end
    for k in reversed(floats):
        if excess <= 0:
            break
        flat = masks[k].reshape(-1)
        ties = np.flatnonzero((np.abs(views[k].reshape(-1)) == threshold) & flat)
        drop = ties[-excess:] if excess < len(ties) else ties
        flat[drop] = False
        excess -= len(drop)

    def release(key):
        a = views[key]
        if key not in masks:
            return np.zeros(a.shape, dtype=a.dtype)  # withheld (and untouched pages cost nothing)
        if bound is None:
            out = np.multiply(a, masks[key])
        else:
            out = np.minimum(a, bound)
            np.maximum(out, -bound, out=out)
            np.multiply(out, masks[key], out=out)
        return out

    keys = list(update)
    shared = {key: like_input(out, update[key]) for key, out in zip(keys, _parallel(release, keys))}
    return shared, SharingSummary(num_shared=k_shared, num_total=total, threshold=float(threshold))


def _share_torch(update: Mapping, fraction: float, bound: Optional[float]) -> tuple[dict, SharingSummary]:
    """The same selection with torch operations, for tensors on an accelerator."""
    import torch

    floats = [k for k, v in update.items() if is_floating(v)]
    total = sum(numel(update[k]) for k in floats)
    k_shared = _select_count(total, fraction)
    device = update[floats[0]].device
    threshold = float("inf")
    if 0 < k_shared < total:
        magnitudes = torch.cat([update[k].detach().abs().reshape(-1).to(device, torch.float64) for k in floats])
        threshold = float(torch.kthvalue(magnitudes, total - k_shared + 1).values)
        del magnitudes
    elif k_shared == total:
        threshold = 0.0

    masks, count = {}, 0
    if 0 < k_shared:
        for k in floats:
            mask = update[k].detach().abs() >= threshold
            masks[k] = mask
            count += int(mask.sum())
        excess = count - k_shared
        for k in reversed(floats):
            if excess <= 0:
                break
            flat = masks[k].reshape(-1)
            ties = torch.nonzero((update[k].detach().abs().reshape(-1) == threshold) & flat).reshape(-1)
            drop = ties[-excess:] if excess < len(ties) else ties
            flat[drop] = False
            excess -= len(drop)

    shared = {}
    for key, value in update.items():
        v = value.detach()
        if key in masks:
            out = v.clamp(-bound, bound) if bound is not None else v.clone()
            out.mul_(masks[key])
        else:
            out = torch.zeros_like(v)
        shared[key] = out if not isinstance(value, np.ndarray) else out.cpu().numpy()
    return shared, SharingSummary(num_shared=k_shared, num_total=total, threshold=threshold)
