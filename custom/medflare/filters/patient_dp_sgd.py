"""The site's enforcement of patient-level DP-SGD: what it requires of the executor, checked and
charged to the site's ledger before anything is released.

DP-SGD itself runs inside the executor (per-patient clipping and noise at every local step, see
:mod:`medflare.privacy.dp_sgd`); a filter cannot add it afterwards. What the site can do, and
this filter does, is:

1. **On the way in** (as a ``task_data_filter``): put the site's requirement in the train task's
   header :data:`medflare.wire_contract.DP_SGD_REQUIRED` (the least noise multiplier, the
   largest clipping norm). The executor trains with at least that noise and at most that norm,
   whatever the job asks; a job may ask for more noise, never less. A requirement already on
   the task (the site's filter runs before a job's copy) is only tightened: the larger z, the
   smaller C.
2. **On the way out** (as a ``task_result_filter``): release a model result only when it carries
   a DP-SGD record (:data:`medflare.wire_contract.DP_SGD`) that meets the requirement, and only
   after charging the record's ``(noise_multiplier, sample_rate, steps)`` to the site's ledger
   (:meth:`medflare.privacy.budget_ledger.PrivacyBudgetLedger.reserve`, mechanism ``dp_sgd``).
   A result without a record, with a weaker one, with BatchNorm running statistics (which
   DP-SGD does not privatise), or that would exceed the site's budget, is blocked; entries that
   are not floating-point (counters) are withheld as zeros, as every medflare filter does.
   The filter changes no value, so it also takes an update an earlier filter of the chain
   has made sparse (a site's ``PercentileSharingFilter`` with ``sparse_transport``).

The site-only model that cross-site evaluation asks for (``submit_model``, ``WEIGHTS``) is
trained with DP-SGD too, from the first global model, and its record covers every step of it;
with ``local_model="dp_sgd"`` (the default) it is released under the same checks and charged to
the ledger like a training round, with ``"withhold"`` it never leaves the site.

A job may carry this filter too (so that the simulator, which applies no site policy, enforces
and charges DP-SGD). Where the site's own scope has one in its ``task_result_filters``, the
site's runs first (NVFlare applies site filters before a job's) and charges the result; the
job's then checks its own, possibly stricter, requirement against the completed record and
charges nothing more, so one release is counted once. Which filter is the site's is read from
the site's scope object (``FLContextKey.SCOPE_OBJECT``), never from the result.

What the site must trust: the executor. The record says what the executor did; the filter can
check that it is what the site required, not that the executor did it. That is why the site's
class allow-list decides which executors may run (``medflare.executors.*``), and why this filter
belongs in the site's ``privacy.json``, not in a job.

Notes:
    The neighbouring relation is add/remove one **patient** with all of their images (every
    crop or slice of them in a step is clipped together). With noise multiplier :math:`z`,
    Poisson sampling rate :math:`q` and :math:`T` steps, the site's per-patient
    :math:`(\\varepsilon, \\delta)` is that of the subsampled Gaussian mechanism composed
    :math:`T` times (Abadi et al. 2016 [1]; RDP of the sampled Gaussian mechanism, Mironov et
    al. 2019 [2]), composed over every round and job the ledger records.

    References:
        [1] M. Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
        [2] I. Mironov, K. Talwar, L. Zhang, "Rényi Differential Privacy of the Sampled
            Gaussian Mechanism", arXiv:1908.10530, 2019.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import FilterKey, FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from medflare.filters.fail_closed_filter import FailClosedDXOFilter
from medflare.privacy.accounting import check_accountant, epsilon_of_history
from medflare.privacy.argument_checks import check_real
from medflare.privacy.dp_sgd import parse_dp_sgd_requirement
from medflare.filters.site_ledger import release_cap, reserve_release
from medflare.privacy.update_checks import (
    UnsafeUpdateError,
    as_numpy,
    check_update,
    is_floating,
    is_normalisation_statistic,
)
from medflare.transport.sparse_update import SparseTensor
from medflare.wire_contract import DP_SGD, DP_SGD_REQUIRED

__all__ = ["LOCAL_MODEL_CHOICES", "PatientDPSGDFilter"]

#: what ``local_model`` may say: release the DP-SGD-trained site-only model, charged, or keep it
LOCAL_MODEL_CHOICES = ("dp_sgd", "withhold")


class PatientDPSGDFilter(FailClosedDXOFilter):
    """Require patient-level DP-SGD of the executor, check its record and charge the site's ledger.

    Configure it in a site scope's ``task_data_filters`` **and** ``task_result_filters`` with
    the same arguments (the first tells the executor, the second checks and charges).

    Args:
        noise_multiplier: the least noise multiplier z the site accepts, in (0, inf).
        max_grad_norm: the largest per-patient clipping norm C the site accepts, in (0, inf).
        target_delta: delta in (0, 1) of the reported epsilon; at most the site budget's delta.
        allow_seeded_noise: release results whose DP-SGD noise was seeded (reproducible, NOT
            secure: for tests only); default false refuses them.
        max_epsilon: this filter's limit on the site's cumulative epsilon, or null; the site's
            lifetime cap is its budget file's (``local/medflare_privacy_budget.json``).
        accountant: ``"rdp"`` (default) or ``"prv"``, for the reported per-round epsilon.
        passthrough_data_kinds: result kinds without model parameters let through after their
            check (default ``["METRICS"]``).
        release_meta: data-dependent meta keys released (default none).
        local_model: ``"dp_sgd"`` (default): release the site-only model (``WEIGHTS``) for
            cross-site evaluation when its DP-SGD record passes and is charged, as for a round;
            ``"withhold"``: never release it (only model differences leave).

    Raises:
        ValueError, TypeError: when the job is built, for an out-of-range or wrongly typed argument.
    """

    accepts_sparse_entries = True

    def __init__(
        self,
        noise_multiplier: float,
        max_grad_norm: float,
        target_delta: float = 1e-5,
        max_epsilon: Optional[float] = None,
        accountant: str = "rdp",
        allow_seeded_noise: bool = False,
        passthrough_data_kinds: Optional[list] = None,
        release_meta: Optional[list] = None,
        local_model: str = "dp_sgd",
    ):
        if local_model not in LOCAL_MODEL_CHOICES:
            raise ValueError(f"local_model must be one of {list(LOCAL_MODEL_CHOICES)}, got {local_model!r}")
        kinds = [DataKind.WEIGHT_DIFF] + ([DataKind.WEIGHTS] if local_model == "dp_sgd" else [])
        super().__init__(kinds, passthrough_data_kinds, release_meta)
        self.local_model = local_model
        check_real("noise_multiplier", noise_multiplier, 0.0, None, low_open=True)
        check_real("max_grad_norm", max_grad_norm, 0.0, None, low_open=True)
        check_real("target_delta", target_delta, 0.0, 1.0, low_open=True, high_open=True)
        if max_epsilon is not None:
            check_real("max_epsilon", max_epsilon, 0.0, None, low_open=True)
        check_accountant(accountant)
        if not isinstance(allow_seeded_noise, bool):
            raise TypeError(f"allow_seeded_noise must be true or false, got {allow_seeded_noise!r}")
        self.allow_seeded_noise = allow_seeded_noise
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.target_delta = target_delta
        self.max_epsilon = max_epsilon
        self.accountant = accountant
        self._history: list[tuple[float, float, int]] = []  # this run's releases, for epsilon_run

    @property
    def requirement(self) -> dict:
        """What the executor is told (the header :data:`medflare.wire_contract.DP_SGD_REQUIRED`)."""
        return {"noise_multiplier": float(self.noise_multiplier), "max_grad_norm": float(self.max_grad_norm)}

    def _strictest(self, existing) -> dict:
        """This filter's requirement combined with one already on the task: the larger z and the
        smaller C. A site's filter runs before a job's, so a job's copy can only tighten the
        site's requirement, never replace it; a header the server wrote can only tighten it too,
        and a malformed one is replaced."""
        mine = self.requirement
        try:
            earlier = parse_dp_sgd_requirement(existing)
        except (TypeError, ValueError):
            return mine
        if earlier is None:
            return mine
        return {
            "noise_multiplier": max(mine["noise_multiplier"], float(earlier.noise_multiplier)),
            "max_grad_norm": min(mine["max_grad_norm"], float(earlier.max_grad_norm)),
        }

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if fl_ctx.get_prop(FLContextKey.FILTER_DIRECTION) == FilterKey.IN:
            if not isinstance(shareable, Shareable):
                self._refuse(fl_ctx, f"{type(self).__name__}: the task is a {type(shareable).__name__}, not a Shareable")
            shareable.set_header(DP_SGD_REQUIRED, self._strictest(shareable.get_header(DP_SGD_REQUIRED)))
            return shareable
        return super().process(shareable, fl_ctx)

    def _checked_record(self, dxo: DXO) -> dict:
        record = dxo.get_meta_prop(DP_SGD)
        if not isinstance(record, dict):
            raise UnsafeUpdateError(
                "the result carries no DP-SGD record: the executor did not train with patient-level DP-SGD, "
                "which this site requires; nothing released"
            )
        if record["noise_multiplier"] < self.noise_multiplier:
            raise UnsafeUpdateError(
                f"the DP-SGD record's noise_multiplier {record['noise_multiplier']:g} is below the site's "
                f"{self.noise_multiplier:g}; nothing released"
            )
        if record["max_grad_norm"] > self.max_grad_norm:
            raise UnsafeUpdateError(
                f"the DP-SGD record's max_grad_norm {record['max_grad_norm']:g} is above the site's "
                f"{self.max_grad_norm:g}; nothing released"
            )
        if record.get("secure_noise") is not True and not self.allow_seeded_noise:
            raise UnsafeUpdateError(
                "the DP-SGD record does not say the noise came from a secure source (secure_noise); seeded "
                "noise can be reproduced and subtracted; nothing released"
            )
        if not 0.0 < record["sample_rate"] <= 1.0:
            raise UnsafeUpdateError(f"the DP-SGD record's sample_rate {record['sample_rate']!r} is not in (0, 1]")
        return record

    def _charged_by_the_site(self, fl_ctx: FLContext) -> bool:
        """True when this is a job's filter and the site's own scope has a filter of this class
        in its task result filters: that one ran first and charged this result."""
        scope = fl_ctx.get_prop(FLContextKey.SCOPE_OBJECT)
        chains = getattr(scope, "task_result_filters", None)
        site_filters = chains.get(FilterKey.OUT, []) if isinstance(chains, dict) else []
        return all(f is not self for f in site_filters) and any(isinstance(f, PatientDPSGDFilter) for f in site_filters)

    def filter_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        check_update({k: v.values if isinstance(v, SparseTensor) else v for k, v in dxo.data.items()})
        stats = sorted(k for k, v in dxo.data.items() if is_normalisation_statistic(k) and getattr(v, "size", 1))
        if stats:
            raise UnsafeUpdateError(
                f"the update holds normalisation statistics {stats[:3]}, which DP-SGD does not privatise "
                "(use a network with GroupNorm under DP-SGD); nothing released"
            )
        record = self._checked_record(dxo)
        if self._charged_by_the_site(fl_ctx):
            return self._checked_after_the_site(dxo, record, fl_ctx)
        z, q, steps = record["noise_multiplier"], record["sample_rate"], record["steps"]
        ledger, site_epsilon, round_number = reserve_release(
            fl_ctx, shareable, type(self).__name__, z, self.max_epsilon, self.target_delta,
            sample_rate=q, steps=steps, mechanism="dp_sgd",
        )
        self._history.append((z, q, steps))
        cap = release_cap(ledger, self.max_epsilon)
        completed = dict(
            record,
            delta=float(self.target_delta),
            accountant=self.accountant,
            epsilon_round=epsilon_of_history([(z, q, steps)], self.target_delta, self.accountant),
            epsilon_run=epsilon_of_history(self._history, self.target_delta, self.accountant),
            epsilon_site=site_epsilon,
            max_epsilon=cap,
        )
        meta = dict(dxo.meta)
        meta[DP_SGD] = completed
        self.log_info(
            fl_ctx,
            f"DP-SGD release (round {round_number}): z={z:.4g}, C={record['max_grad_norm']:g}, q={q:.4g}, "
            f"{steps} steps; per-patient epsilon this round {completed['epsilon_round']:.4g}, this run "
            f"{completed['epsilon_run']:.4g}, site total {site_epsilon:.4g} of {cap:g}",
        )
        # DP-SGD privatises the learned weights; a non-floating buffer is not one of them: withheld
        data = {k: v if _floating(v) else _zeros_like(v) for k, v in dxo.data.items()}
        return DXO(data_kind=dxo.data_kind, data=data, meta=meta)

    def _checked_after_the_site(self, dxo: DXO, record: dict, fl_ctx: FLContext) -> DXO:
        """A job's filter behind the site's: the record was checked against this filter's
        requirement; the site's filter charged it, so only this filter's own limit is left."""
        site_epsilon = record.get("epsilon_site")
        if isinstance(site_epsilon, bool) or not isinstance(site_epsilon, (int, float)):
            raise UnsafeUpdateError(
                "the site's DP-SGD filter ran before this one but the record carries no epsilon_site; nothing released"
            )
        if self.max_epsilon is not None and site_epsilon > self.max_epsilon:
            raise UnsafeUpdateError(
                f"the site's per-patient epsilon {site_epsilon:.4g} after this release exceeds the job's max_epsilon "
                f"{self.max_epsilon:g}; nothing released (the site has charged it)"
            )
        self.log_info(fl_ctx, "DP-SGD release already checked and charged by the site's own filter; not charged again")
        return DXO(data_kind=dxo.data_kind, data=dict(dxo.data), meta=dict(dxo.meta))


def _floating(value) -> bool:
    if isinstance(value, SparseTensor):
        return np.dtype(value.dtype).kind == "f"
    return is_floating(value)


def _zeros_like(value) -> np.ndarray:
    """A withheld entry: zeros of its dense shape and dtype."""
    if isinstance(value, SparseTensor):
        return np.zeros(value.shape, dtype=np.dtype(value.dtype))
    return np.zeros(np.shape(value), dtype=as_numpy(value).dtype)
