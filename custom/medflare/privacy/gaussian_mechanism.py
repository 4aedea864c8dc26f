"""The Gaussian mechanism on a whole model update: clip its L2 norm, add calibrated noise.

Notes:
    For an update :math:`\\Delta w` (all floating-point entries of all tensors as one vector),
    clipping norm :math:`C > 0` and noise multiplier :math:`z > 0` the site releases

    .. math::
        \\tilde{\\Delta w} = \\Delta w \\cdot \\min\\left(1, \\frac{C}{\\lVert \\Delta w \\rVert_2}\\right)
        + \\mathcal{N}(0, z^2 C^2 I)

    (Dwork and Roth 2014 [1], section 3.5 and appendix A; clipped updates with noise as in
    DP-FedAvg, McMahan et al. 2018 [2]). Clipping bounds the L2 sensitivity of the release to
    :math:`C`, so each release is :math:`(\\alpha, \\alpha / (2 z^2))`-RDP [3]; see
    :mod:`medflare.privacy.accounting` for the composition over rounds.

    **Neighbouring relation.** One record is a *whole site's dataset*: neighbouring inputs are
    the site taking part (any data, any training) versus the site contributing a zero update.
    The whole update is clipped, so the guarantee covers everything the site's data can do to
    the released update, not one patient or one voxel. Under the replace-one-site relation the
    sensitivity doubles to :math:`2C` and the same noise gives the epsilon of multiplier
    :math:`z/2`.

    **What voids the guarantee.**
      - predictable noise: use the cryptographically secure source in production
        (:class:`medflare.privacy.noise_sources.SecureGaussianNoise`);
      - anything released besides the noised update: values in the result's meta (training
        loss, validation metrics, step counts) are not privatised, nor are other tasks' results;
      - data-dependent values that other filters (before or after this one) add to the
        result's meta or headers; the update itself is clipped whole, so no earlier filter can
        weaken the guarantee on it, and later filters only post-process it;
      - more releases than accounted, or a changed clipping norm or noise multiplier without
        accounting for it;
      - floating-point subtleties of sampling (Mironov 2012 [4]); the guarantee is for the
        idealised real-valued mechanism.

    Non-floating entries (e.g. BatchNorm counters) are not noised and therefore withheld
    (released as zeros of their dtype).

    References:
        [1] C. Dwork and A. Roth, "The Algorithmic Foundations of Differential Privacy", 2014.
        [2] H. B. McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018.
        [3] I. Mironov, "Rényi Differential Privacy", CSF 2017.
        [4] I. Mironov, "On Significance of the Least Significant Bits for Differential Privacy", CCS 2012.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

from medflare.privacy.argument_checks import check_real
from medflare.privacy.noise_sources import GaussianNoiseSource
from medflare.privacy.update_checks import (
    UnsafeUpdateError,
    all_finite,
    as_numpy,
    check_update,
    is_floating,
    l2_norm,
    like_input,
)

__all__ = ["GaussianRelease", "l2_norm", "gaussian_release"]


@dataclass(frozen=True)
class GaussianRelease:
    """Facts about one release, for the site's own log (the norm must not leave the site).

    Attributes:
        l2_norm: the update's norm before clipping.
        clip_factor: ``min(1, C / l2_norm)``.
        noise_std: ``noise_multiplier * clipping_norm``.
    """

    l2_norm: float
    clip_factor: float
    noise_std: float


def gaussian_release(
    update: Mapping,
    clipping_norm: float,
    noise_multiplier: float,
    noise: GaussianNoiseSource,
    norm: Optional[float] = None,
) -> tuple[dict, GaussianRelease]:
    """Clip ``update`` to L2 norm ``clipping_norm`` and add N(0, (noise_multiplier * clipping_norm)^2).

    The caller's arrays are not modified. Peak extra memory is about one update (the output
    buffer, which the noise is drawn into) plus one chunk of the noise source.

    ``norm`` is :func:`l2_norm` of ``update`` when the caller has already passed ``update``
    through :func:`check_update` and computed its norm (the filter does both, to refuse a bad or
    overflowing update before touching the budget); neither is then done again.

    Raises:
        UnsafeUpdateError: malformed, empty or non-finite update, an update whose norm overflows,
            or a release that would not be finite.
        ValueError, TypeError: bad ``clipping_norm`` or ``noise_multiplier``.
    """
    clip = check_real("clipping_norm", clipping_norm, 0.0, None, low_open=True)
    z = check_real("noise_multiplier", noise_multiplier, 0.0, None, low_open=True)
    if norm is None:
        check_update(update)
        norm = l2_norm(update)
    if not math.isfinite(norm):
        raise UnsafeUpdateError(f"update norm overflows ({norm}); nothing released")
    factor = 1.0 if norm <= clip else clip / norm
    std = z * clip

    floats = [k for k, v in update.items() if is_floating(v)]
    arrays = {k: as_numpy(v) for k, v in update.items()}
    dtype = np.float64 if any(arrays[k].dtype == np.float64 for k in floats) else np.float32
    total = sum(arrays[k].size for k in floats)
    buffer = noise.fill(np.empty(total, dtype=dtype))
    # out = factor * update + std * noise, computed in place in the noise buffer:
    # buffer <- (buffer * std / factor + update) * factor
    buffer *= std / factor
    if not all_finite(buffer):  # std / factor beyond the dtype's range
        raise UnsafeUpdateError("noise scaled beyond the update's floating-point range; nothing released")
    released, offset = {}, 0
    for key, value in update.items():
        array = arrays[key]
        if key in floats:
            out = buffer[offset : offset + array.size].reshape(array.shape)
            offset += array.size
            out += array
            out *= factor
            if not all_finite(out):
                raise UnsafeUpdateError(f"release of {key!r} would not be finite; nothing released")
            out = out.astype(array.dtype, copy=False)
        else:
            out = np.zeros(array.shape, dtype=array.dtype)
        released[key] = like_input(out, value)
    return released, GaussianRelease(l2_norm=norm, clip_factor=factor, noise_std=std)
