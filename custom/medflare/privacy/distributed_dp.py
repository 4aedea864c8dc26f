"""Distributed Gaussian noise: each site adds a share of the noise, and only the sum is seen.

Notes:
    With :math:`N` sites each clipping its update to L2 norm :math:`C` and adding
    :math:`\\mathcal{N}(0, \\sigma^2 / N \\cdot I)`, :math:`\\sigma = z C`, the sum of :math:`k`
    such releases carries noise :math:`\\mathcal{N}(0, k \\sigma^2 / N \\cdot I)`. For one
    site, neighbouring sums differ by at most :math:`C` (its clipped update in or out), so the
    sum is the Gaussian mechanism with noise multiplier

    .. math::
        z_{\\text{sum}} = z \\sqrt{k / N},

    and :math:`k = N` gives the guarantee of local noise :math:`z` (each site adding
    :math:`\\sigma` itself, :mod:`medflare.privacy.gaussian_mechanism`) with :math:`\\sqrt{N}`
    less noise in the model: the global model's noise has standard deviation :math:`\\sigma /
    \\sqrt{N}` per coordinate of the mean instead of :math:`\\sigma` (distributed DP under
    secure aggregation; Kairouz, Liu and Steinke 2021 [1]; Truex et al. 2019 [2] for the
    threshold form, Agarwal et al. 2021 [3]).

    **When the guarantee holds.**

    - *The observer sees only the sum.* The server under CKKS secure aggregation
      (:mod:`medflare.transport.ckks_update`): it adds ciphertexts and has no key. One site's
      release alone carries noise multiplier :math:`z / \\sqrt{N}`: whoever can read an
      individual update (a server holding the secret key, or any site the server hands a
      ciphertext to) gets only that.
    - *At least N noises are in the sum.* With :math:`k < N` sites returning, the sum's
      multiplier is :math:`z \\sqrt{k/N}`; medflare's ``EncryptedSumAggregator`` therefore
      refuses to aggregate a round with fewer contributions than the largest :math:`N` any
      contribution states, and the global model is unchanged (the refused ciphertexts are
      never summed, so nothing of them is revealed; the sites have already charged the release
      to their ledgers, which over-counts, never under-counts).
    - *Against other sites.* Every site holds the key and decrypts the (mean) sum; it knows its
      own noise, so for it the rest carries :math:`z \\sqrt{(k - 1)/N}`; a coalition of
      :math:`c` sites sees :math:`z \\sqrt{(k - c)/N}` (:func:`noise_multiplier_against`).
      Sites that collude with each other, or with a server that passes them ciphertexts, weaken
      everyone else's guarantee; local noise (the plain Gaussian filter) does not depend on them.
    - *Equal weights.* A weighted mean scales each site's sensitivity by its weight; the
      distributed filter multiplies by 1 and the server's mean is then of the equal-weight sum.

    References:
        [1] P. Kairouz, Z. Liu and T. Steinke, "The Distributed Discrete Gaussian Mechanism for
            Federated Learning with Secure Aggregation", ICML 2021.
        [2] S. Truex et al., "A Hybrid Approach to Privacy-Preserving Federated Learning", AISec 2019.
        [3] N. Agarwal, P. Kairouz and Z. Liu, "The Skellam Mechanism for Differentially Private
            Federated Learning", NeurIPS 2021.
"""

from __future__ import annotations

import math

from medflare.privacy.argument_checks import check_int, check_real

__all__ = ["noise_multiplier_against", "site_noise_multiplier", "sum_noise_multiplier"]


def site_noise_multiplier(noise_multiplier: float, num_sites: int) -> float:
    """:math:`z / \\sqrt{N}`: the multiplier each of ``num_sites`` sites adds (of its own ``C``)."""
    z = check_real("noise_multiplier", noise_multiplier, 0.0, None, low_open=True)
    n = check_int("num_sites", num_sites, 2)
    return z / math.sqrt(n)


def sum_noise_multiplier(noise_multiplier: float, num_sites: int, sites_in_sum: int) -> float:
    """:math:`z \\sqrt{k / N}`: the multiplier of a sum of ``sites_in_sum`` (``k``) releases."""
    check_int("sites_in_sum", sites_in_sum, 1)
    return site_noise_multiplier(noise_multiplier, num_sites) * math.sqrt(sites_in_sum)


def noise_multiplier_against(noise_multiplier: float, num_sites: int, sites_in_sum: int, observers_in_sum: int) -> float:
    """The multiplier protecting one site against ``observers_in_sum`` other contributing sites
    who pool their own noises (``0`` for the server, ``1`` for one curious site):
    :math:`z \\sqrt{(k - c)/N}`.

    Raises:
        ValueError: when the observers and the protected site do not fit in the sum.
    """
    check_int("observers_in_sum", observers_in_sum, 0)
    if observers_in_sum >= sites_in_sum:
        raise ValueError(f"observers_in_sum ({observers_in_sum}) must be fewer than sites_in_sum ({sites_in_sum})")
    return sum_noise_multiplier(noise_multiplier, num_sites, sites_in_sum - observers_in_sum)
