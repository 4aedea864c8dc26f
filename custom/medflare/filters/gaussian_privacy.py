"""NVFlare filter for Gaussian differential privacy on a site's update, with an (epsilon, delta)
accountant and the site's persistent privacy budget.

The mathematics, the neighbouring relation (a whole site's dataset) and what voids the
guarantee are in :mod:`medflare.privacy.gaussian_mechanism`; accounting in
:mod:`medflare.privacy.accounting`; the budget in :mod:`medflare.privacy.budget_ledger`.

Normalisation statistics (BatchNorm's ``running_mean``, ``running_var``,
``num_batches_tracked``) are not learned weights: they are withheld (sent as a zero difference,
so the global model keeps its own) and take no part in the clipping norm or the noise. Noise on
a running variance can make it negative and break the model (seen in a real federation at round
1); withholding them is what keeps the guarantee, since nothing of them leaves the site. A
network trained under DP should use GroupNorm, which has no running statistics.
"""

from __future__ import annotations

import math

import numpy as np
from typing import Optional

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from medflare.filters.fail_closed_filter import FailClosedDXOFilter
from medflare.privacy.accounting import check_accountant, epsilon_spent, noise_multiplier_for
from medflare.privacy.argument_checks import check_int, check_real
from medflare.filters.site_ledger import release_cap, reserve_release
from medflare.privacy.gaussian_mechanism import gaussian_release, l2_norm
from medflare.privacy.noise_sources import make_noise_source
from medflare.privacy.update_checks import (
    UnsafeUpdateError,
    as_numpy,
    check_update,
    is_floating,
    is_normalisation_statistic,
    numel,
)
from medflare.wire_contract import GAUSSIAN_DP

__all__ = ["GaussianPrivacyFilter", "PRIVACY_META_KEY"]

#: kept for compatibility: the contract's :data:`medflare.wire_contract.GAUSSIAN_DP`
PRIVACY_META_KEY = GAUSSIAN_DP


class GaussianPrivacyFilter(FailClosedDXOFilter):
    """Clip a ``WEIGHT_DIFF`` to L2 norm ``clipping_norm`` and add Gaussian noise, within a budget.

    Give either ``noise_multiplier`` or ``target_epsilon`` with ``num_rounds`` (the noise
    multiplier is then solved so that ``num_rounds`` releases spend ``target_epsilon``).

    Args:
        clipping_norm: L2 bound C on the whole update, in (0, inf).
        max_epsilon: this filter's limit on the site's cumulative epsilon, in (0, inf), or null.
            The site's lifetime cap lives in the site's own configuration
            (``local/medflare_privacy_budget.json``, :mod:`medflare.privacy.site_budget`), not
            here: a release that would take the site's epsilon (over all jobs, recorded in its
            ledger) above ``min(site cap, max_epsilon)`` is refused before any noise is drawn.
            A job's filter can so spend less than the site allows, never more; a site without a
            budget file releases nothing.
        noise_multiplier: z in (0, inf); noise standard deviation is z * C.
        target_epsilon: epsilon to spend over ``num_rounds`` releases, in (0, inf).
        num_rounds: planned releases, for ``target_epsilon``; an int >= 1.
        target_delta: delta in (0, 1) for accounting and for the budget.
        accountant: ``"rdp"`` (default) or ``"prv"``.
        noise_seed: null (default) draws noise from the operating system's cryptographically
            secure generator; an int seeds a reproducible, insecure generator (tests only).
        passthrough_data_kinds: result kinds without model parameters let through unchanged
            (default ``["METRICS"]``, so validation results pass a site-wide filter).
        release_meta: data-dependent meta keys of the wire contract that leave with the update
            (:data:`medflare.wire_contract.DATA_DEPENDENT_META`); null (default) releases none:
            the mechanism privatises the update, not the loss, scores, case counts or timings
            the executor reports, so under differential privacy they stay at the site unless
            the site admin names them here.

    Raises:
        ValueError, TypeError: when the job is built, for any out-of-range, wrongly typed or
            contradictory argument.
    """

    def __init__(
        self,
        clipping_norm: float,
        max_epsilon: Optional[float] = None,
        noise_multiplier: Optional[float] = None,
        target_epsilon: Optional[float] = None,
        num_rounds: Optional[int] = None,
        target_delta: float = 1e-5,
        accountant: str = "rdp",
        noise_seed: Optional[int] = None,
        passthrough_data_kinds: Optional[list] = None,
        release_meta: Optional[list] = None,
    ):
        super().__init__([DataKind.WEIGHT_DIFF], passthrough_data_kinds, release_meta)
        check_real("clipping_norm", clipping_norm, 0.0, None, low_open=True)
        if max_epsilon is not None:
            check_real("max_epsilon", max_epsilon, 0.0, None, low_open=True)
        check_real("target_delta", target_delta, 0.0, 1.0, low_open=True, high_open=True)
        check_accountant(accountant)
        if noise_seed is not None:
            check_int("noise_seed", noise_seed, 0)
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError(
                "give exactly one of noise_multiplier or target_epsilon (with num_rounds), "
                f"got noise_multiplier={noise_multiplier!r}, target_epsilon={target_epsilon!r}"
            )
        if noise_multiplier is not None:
            z = check_real("noise_multiplier", noise_multiplier, 0.0, None, low_open=True)
            if num_rounds is not None:
                check_int("num_rounds", num_rounds, 1)
        else:
            check_real("target_epsilon", target_epsilon, 0.0, None, low_open=True)
            if num_rounds is None:
                raise ValueError("num_rounds is required with target_epsilon: the noise is solved for that many releases")
            check_int("num_rounds", num_rounds, 1)
            z = noise_multiplier_for(target_epsilon, target_delta, num_rounds, accountant)
        self.clipping_norm = clipping_norm
        self.max_epsilon = max_epsilon
        self.noise_multiplier = noise_multiplier
        self.target_epsilon = target_epsilon
        self.num_rounds = num_rounds
        self.target_delta = target_delta
        self.accountant = accountant
        self.noise_seed = noise_seed
        self.effective_noise_multiplier = z
        self._noise = make_noise_source(noise_seed)
        self._releases_this_run = 0
        self._round_epsilon = None  # epsilon of one release at z: fixed, computed at the first release

    def _release_noise_multiplier(self) -> float:
        """The multiplier of the noise this site adds: ``z``, charged as ``z`` (a subclass that
        adds a share of the noise, :mod:`medflare.filters.distributed_gaussian`, says otherwise)."""
        return self.effective_noise_multiplier

    def _record_extras(self) -> dict:
        """Fields a subclass adds to the release's record."""
        return {}

    def filter_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        check_update(dxo.data)  # NaN, inf, empty: refused before the budget is touched
        # normalisation statistics are not learned weights: withheld, never noised into invalid values
        withheld = [k for k in dxo.data if is_normalisation_statistic(k)]
        learned = {k: v for k, v in dxo.data.items() if k not in withheld}
        if not any(is_floating(v) and numel(v) for v in learned.values()):
            raise UnsafeUpdateError("the update has no learned floating-point weights to release")
        norm = l2_norm(learned)
        if not math.isfinite(norm):
            raise UnsafeUpdateError("update norm overflows; nothing released")
        z = self.effective_noise_multiplier
        ledger, site_epsilon, round_number = reserve_release(
            fl_ctx, shareable, type(self).__name__, z, self.max_epsilon, self.target_delta
        )
        cap = release_cap(ledger, self.max_epsilon)
        released, info = gaussian_release(learned, self.clipping_norm, self._release_noise_multiplier(), self._noise, norm=norm)
        for key in withheld:  # a zero difference: the server's model keeps its own statistics
            released[key] = np.zeros(np.shape(dxo.data[key]), dtype=as_numpy(dxo.data[key]).dtype)
        released = {k: released[k] for k in dxo.data}
        self._releases_this_run += 1
        if self._round_epsilon is None:
            self._round_epsilon = epsilon_spent([(z, 1)], self.target_delta, self.accountant)
        round_epsilon = self._round_epsilon
        run_epsilon = epsilon_spent([(z, self._releases_this_run)], self.target_delta, self.accountant)
        privacy = {
            "mechanism": "gaussian",
            "neighbouring_relation": "add/remove one site's whole dataset",
            "clipping_norm": self.clipping_norm,
            "noise_multiplier": z,
            "delta": self.target_delta,
            "accountant": self.accountant,
            "epsilon_round": round_epsilon,
            "epsilon_run": run_epsilon,
            "epsilon_site": site_epsilon,
            "max_epsilon": cap,
            "secure_noise": self._noise.cryptographically_secure,
            **self._record_extras(),
        }
        meta = dict(dxo.meta)
        meta[GAUSSIAN_DP] = privacy
        self.log_info(
            fl_ctx,
            f"Gaussian DP release {self._releases_this_run} (round {round_number}): z={z:.4g}, C={self.clipping_norm:g}, "
            f"epsilon round {round_epsilon:.4g}, this run {run_epsilon:.4g}, site total {site_epsilon:.4g} of "
            f"{cap:g} (site delta {ledger.delta:g}, {ledger.accountant})",
        )
        # the norm is data-dependent: debug level only, so that streamed logs do not carry it
        self.log_debug(fl_ctx, f"update norm {info.l2_norm:.4g}, clipped by factor {info.clip_factor:.4g}")
        if not self._noise.cryptographically_secure:
            self.log_warning(fl_ctx, "noise_seed is set: noise is reproducible and NOT secure; for tests only")
        return DXO(data_kind=dxo.data_kind, data=released, meta=meta)
