"""NVFlare filter for distributed Gaussian DP under secure aggregation: a share of the noise, then encryption, in one step.

The mathematics, and exactly when the guarantee holds, are in :mod:`medflare.privacy.distributed_dp`:
each of ``num_sites`` sites clips its update to ``C`` and adds noise of multiplier
:math:`z / \\sqrt{N}`; the server, which sees only the encrypted sum of at least ``N`` of them,
gets the Gaussian mechanism with multiplier ``z``, and that is what the site's ledger is
charged. A release with a share of the noise is weaker than ``z`` against anyone who can read
it alone, so it never exists outside this filter unencrypted: the filter clips, adds the share
and encrypts (:mod:`medflare.filters.he_encryption`) in one ``process`` call, and a failure at
any point releases nothing. It must be the last filter of the site's chain.

The encrypted record states ``N`` (``distributed_dp_sites``); medflare's
``EncryptedSumAggregator`` refuses to aggregate a round with fewer contributions than that. The
site weights equally (multiplies by 1): a weighted mean would give the heavier sites less
protection than ``z``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from nvflare.apis.dxo import DXO
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from medflare.filters.gaussian_privacy import GaussianPrivacyFilter
from medflare.filters.he_encryption import encrypted_result
from medflare.privacy.argument_checks import check_int, check_real
from medflare.privacy.distributed_dp import site_noise_multiplier
from medflare.privacy.update_checks import UnsafeUpdateError, l2_norm
from medflare.transport.he_context import HoldsParticipantContext

__all__ = ["DistributedGaussianPrivacyFilter"]


class DistributedGaussianPrivacyFilter(HoldsParticipantContext, GaussianPrivacyFilter):
    """Clip to ``clipping_norm``, add ``1/sqrt(num_sites)`` of the noise, CKKS-encrypt; charge ``z``.

    Args:
        num_sites: N, the sites whose noise shares every sum must hold (an int >= 2); the
            server refuses to aggregate fewer. Choose the number of sites the jobs of this
            scope require (``min_clients``); more sites than N only add noise.
        max_update_norm: L2 bound checked on the noised update before encryption, in (0, inf)
            (the server sees the bound, not the norm); it must admit
            :math:`C (1 + (z/\\sqrt{N}) (\\sqrt{d} + 6))`, and the job's aggregator must
            admit it (its ``max_update_norm``).
        tenseal_context_file: the site's CKKS context in its startup kit.
        clipping_norm, max_epsilon, noise_multiplier, target_epsilon, num_rounds, target_delta,
        accountant, noise_seed, passthrough_data_kinds, release_meta: as for
            :class:`~medflare.filters.gaussian_privacy.GaussianPrivacyFilter`; ``noise_multiplier``
            (or the one solved from ``target_epsilon``) is the sum's ``z``, what is charged.

    Raises:
        ValueError, TypeError: when the job is built, naming the argument.
    """

    releases_ciphertexts = True

    def __init__(
        self,
        clipping_norm: float,
        num_sites: int,
        max_update_norm: float,
        max_epsilon: Optional[float] = None,
        noise_multiplier: Optional[float] = None,
        target_epsilon: Optional[float] = None,
        num_rounds: Optional[int] = None,
        target_delta: float = 1e-5,
        accountant: str = "rdp",
        noise_seed: Optional[int] = None,
        tenseal_context_file: str = "client_context.tenseal",
        passthrough_data_kinds: Optional[list] = None,
        release_meta: Optional[list] = None,
    ):
        super().__init__(
            clipping_norm,
            max_epsilon=max_epsilon,
            noise_multiplier=noise_multiplier,
            target_epsilon=target_epsilon,
            num_rounds=num_rounds,
            target_delta=target_delta,
            accountant=accountant,
            noise_seed=noise_seed,
            passthrough_data_kinds=passthrough_data_kinds,
            release_meta=release_meta,
        )
        check_int("num_sites", num_sites, 2)
        check_real("max_update_norm", max_update_norm, 0.0, None, low_open=True)
        self.num_sites = num_sites
        self.max_update_norm = float(max_update_norm)
        self._set_context_file(tenseal_context_file)
        self.site_noise_multiplier = site_noise_multiplier(self.effective_noise_multiplier, num_sites)

    def _release_noise_multiplier(self) -> float:
        return self.site_noise_multiplier

    def _record_extras(self) -> dict:
        return {"distributed_sites": self.num_sites, "site_noise_multiplier": self.site_noise_multiplier}

    def filter_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        context = self._ckks_context(fl_ctx)  # before anything is charged: no key, no release
        noised = super().filter_dxo(dxo, shareable, fl_ctx)
        norm = l2_norm(noised.data)
        if not np.isfinite(norm) or norm > self.max_update_norm:
            raise UnsafeUpdateError(
                f"the noised update's L2 norm {norm:.6g} exceeds max_update_norm {self.max_update_norm:g}; not sent"
            )
        data, meta = encrypted_result(
            noised.data, noised.meta, context, "equal", 1.0, self.max_update_norm, distributed_dp_sites=self.num_sites
        )
        self.log_info(fl_ctx, f"distributed DP share (z/sqrt({self.num_sites}) = {self.site_noise_multiplier:.4g}) encrypted")
        return DXO(data_kind=noised.data_kind, data=data, meta=meta)
