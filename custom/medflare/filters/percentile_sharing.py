"""NVFlare filter for partial (percentile) sharing; the mathematics is in
:mod:`medflare.privacy.percentile_sharing`. Not differential privacy."""

from __future__ import annotations

from typing import Optional

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from medflare.filters.fail_closed_filter import FailClosedDXOFilter
from medflare.privacy.percentile_sharing import check_sharing_arguments, share_largest_fraction
from medflare.privacy.update_checks import as_numpy
from medflare.transport.sparse_update import encode_sparse, register_sparse_decomposers
from medflare.wire_contract import DATA_DEPENDENT_META, PERCENTILE_SHARING

__all__ = ["PercentileSharingFilter", "SHARING_META_KEY"]

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
    ):
        super().__init__([DataKind.WEIGHT_DIFF], passthrough_data_kinds, release_meta, DATA_DEPENDENT_META)
        check_sharing_arguments(fraction_shared, gamma)
        if not isinstance(sparse_transport, bool):
            raise TypeError(f"sparse_transport must be true or false, got {sparse_transport!r}")
        self.fraction_shared = fraction_shared
        self.gamma = gamma
        self.sparse_transport = sparse_transport
        if sparse_transport:
            register_sparse_decomposers()

    def filter_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
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
