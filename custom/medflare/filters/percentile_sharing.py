"""NVFlare filter for partial (percentile) sharing; the mathematics is in
:mod:`medflare.privacy.percentile_sharing`. Not differential privacy.

Cross-site evaluation (EXAM's single-site models) asks each site for its own model with the
``submit_model`` task, as ``WEIGHTS``. Partial sharing cannot share a fraction of a model that
other sites must run, so the site decides in its scope (``local_model``): withhold it (the
default: the EXAM report's local-model columns stay empty) or release it in full, and only in
answer to ``submit_model``. A released site-only model is trained on this site's data alone and
reveals what any such model does (membership inference, model inversion from the weights); it
is not partially shared and not differentially private.
"""

from __future__ import annotations

from typing import Optional

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.apis.shareable import Shareable

from medflare.filters.fail_closed_filter import FailClosedDXOFilter
from medflare.privacy.percentile_sharing import check_sharing_arguments, share_largest_fraction
from medflare.privacy.update_checks import UnsafeUpdateError, as_numpy, check_update
from medflare.transport.sparse_update import encode_sparse, register_sparse_decomposers
from medflare.wire_contract import DATA_DEPENDENT_META, LOCAL_MODEL, PERCENTILE_SHARING

__all__ = ["LOCAL_MODEL_CHOICES", "PercentileSharingFilter", "SHARING_META_KEY"]

#: what ``local_model`` may say: keep the site-only model at the site, or release it in full
LOCAL_MODEL_CHOICES = ("withhold", "release")

#: kept for compatibility: the contract's :data:`medflare.wire_contract.PERCENTILE_SHARING`
SHARING_META_KEY = PERCENTILE_SHARING


class PercentileSharingFilter(FailClosedDXOFilter):
    """Share only the ``fraction_shared`` largest-magnitude entries of a ``WEIGHT_DIFF``, clipped to ±``gamma``.

    Args:
        fraction_shared: fraction of the update's floating-point entries shared, in (0, 1].
        gamma: bound on each shared value, in (0, inf); null shares values unclipped.
        passthrough_data_kinds: result kinds without model parameters let through unchanged
            (default ``["METRICS"]``, so validation results pass a site-wide filter).
        sparse_transport: send only the kept entries (values plus indices or a bitmask, see
            :mod:`medflare.transport.sparse_update`) instead of a dense array with zeros. The
            server's aggregator must be medflare's ``ValidatedAggregator``, which restores them.
        release_meta: data-dependent meta keys of the wire contract that leave with the update;
            null (default) releases all of them (:data:`medflare.wire_contract.DATA_DEPENDENT_META`):
            partial sharing is not differential privacy, and the research profile keeps the
            server's per-site curves and weights. A site that wants less names what may leave.
        local_model: ``"withhold"`` (default) refuses the site-only model that cross-site
            evaluation asks for; ``"release"`` lets it leave in full (``WEIGHTS``, finite,
            unchanged), only as the result of the ``submit_model`` task and only when the
            executor marks it a site-only model (:data:`medflare.wire_contract.LOCAL_MODEL`),
            so neither a training round nor the last round's local weights (which with the
            global model give that round's full update) can bypass partial sharing.

    Raises:
        ValueError, TypeError: when the job is built, for an out-of-range or wrongly typed argument.
    """

    def __init__(
        self,
        fraction_shared: float,
        gamma: Optional[float],
        passthrough_data_kinds: Optional[list] = None,
        sparse_transport: bool = False,
        release_meta: Optional[list] = None,
        local_model: str = "withhold",
    ):
        if local_model not in LOCAL_MODEL_CHOICES:
            raise ValueError(f"local_model must be one of {list(LOCAL_MODEL_CHOICES)}, got {local_model!r}")
        kinds = [DataKind.WEIGHT_DIFF] + ([DataKind.WEIGHTS] if local_model == "release" else [])
        super().__init__(kinds, passthrough_data_kinds, release_meta, DATA_DEPENDENT_META)
        self.local_model = local_model
        check_sharing_arguments(fraction_shared, gamma)
        if not isinstance(sparse_transport, bool):
            raise TypeError(f"sparse_transport must be true or false, got {sparse_transport!r}")
        self.fraction_shared = fraction_shared
        self.gamma = gamma
        self.sparse_transport = sparse_transport
        if sparse_transport:
            register_sparse_decomposers()

    def filter_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        if dxo.data_kind == DataKind.WEIGHTS:
            return self._released_local_model(dxo, fl_ctx)
        shared, summary = share_largest_fraction(dxo.data, self.fraction_shared, self.gamma)
        meta = dict(dxo.meta)
        meta[PERCENTILE_SHARING] = {
            "fraction_shared": self.fraction_shared,
            "gamma": self.gamma,
            "num_shared": summary.num_shared,
            "num_total": summary.num_total,
            "sparse": self.sparse_transport,
        }
        if self.sparse_transport:
            shared = encode_sparse({k: as_numpy(v) for k, v in shared.items()})
        self.log_info(fl_ctx, f"shared {summary.num_shared} of {summary.num_total} entries (gamma {self.gamma})")
        return DXO(data_kind=dxo.data_kind, data=shared, meta=meta)

    def _released_local_model(self, dxo: DXO, fl_ctx: FLContext) -> DXO:
        """The site-only model, in full, as the answer to ``submit_model`` and nothing else."""
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME)
        if task != AppConstants.TASK_SUBMIT_MODEL:
            raise UnsafeUpdateError(
                f"WEIGHTS are released only as the site-only model for cross-site evaluation (task "
                f"{AppConstants.TASK_SUBMIT_MODEL!r}), not as the result of task {task!r}; nothing released"
            )
        kind = dxo.get_meta_prop(LOCAL_MODEL)
        if kind != "site_only":
            raise UnsafeUpdateError(
                f"the submitted model is not a site-only model ({LOCAL_MODEL}: {kind!r}): the last round's local "
                "weights, with that round's global model, give the round's full update, which partial sharing "
                "would not release; nothing released (a job evaluating single-site models sets the executor's "
                "local_model to site_only)"
            )
        check_update(dxo.data)
        self.log_info(fl_ctx, "released the site-only model in full for cross-site evaluation (local_model: release)")
        return DXO(data_kind=dxo.data_kind, data=dict(dxo.data), meta=dict(dxo.meta))
