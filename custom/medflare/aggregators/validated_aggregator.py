"""NVFlare aggregator for the FedAvg workflow that checks every contribution whole before using it.

It plugs into ``ScatterAndGather`` as its ``aggregator`` component. Each site's result is
checked completely first (return code, round, the same site twice, data kind, weight, keys,
shapes, dtypes, finiteness, optional norm bound, see :mod:`.contribution_checks`); partial
updates sent sparse (:mod:`medflare.transport.sparse_update`) are restored first, and the
entries they carried are what ``sharer_mean`` averages over; a refused
contribution is logged with the site and the reason and nothing of it is used; the round goes
on with the others. Accepted contributions are combined by the chosen estimator
(:mod:`.estimators`).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

from medflare.aggregators.contribution_checks import ContributionRejected, check_contribution, model_spec
from medflare.aggregators.estimators import ESTIMATORS, combine
from medflare.privacy.argument_checks import check_real
from medflare.filters.percentile_sharing import SHARING_META_KEY
from medflare.transport.sparse_update import SparseTensor, decode_sparse, decode_sparse_with_masks, register_sparse_decomposers

__all__ = ["ValidatedAggregator", "AGGREGATION_META_KEY"]

AGGREGATION_META_KEY = "medflare_aggregation"


class ValidatedAggregator(Aggregator):
    """Weighted FedAvg (or a robust estimator) over contributions that passed every check.

    Args:
        expected_data_kind: ``"WEIGHT_DIFF"`` (default) or ``"WEIGHTS"``.
        weight_meta_key: DXO meta key of each site's weight (default ``NUM_STEPS_CURRENT_ROUND``).
        default_weight: weight for a site that reports none; null (default) refuses such sites.
        max_update_norm: refuse updates whose L2 norm exceeds this; null for no bound.
        estimator: ``"weighted_mean"``, ``"sharer_mean"`` (for partial sharing), ``"median"``
            or ``"trimmed_mean"``.
        trim_fraction: share of values cut from each end by ``trimmed_mean``, in [0, 0.5).
    """

    def __init__(
        self,
        expected_data_kind: str = "WEIGHT_DIFF",
        weight_meta_key: str = MetaKey.NUM_STEPS_CURRENT_ROUND,
        default_weight: Optional[float] = None,
        max_update_norm: Optional[float] = None,
        estimator: str = "weighted_mean",
        trim_fraction: float = 0.1,
    ):
        super().__init__()
        if expected_data_kind not in ("WEIGHT_DIFF", "WEIGHTS"):
            raise ValueError(f"expected_data_kind must be 'WEIGHT_DIFF' or 'WEIGHTS', got {expected_data_kind!r}")
        if not isinstance(weight_meta_key, str) or not weight_meta_key:
            raise ValueError(f"weight_meta_key must be a non-empty string, got {weight_meta_key!r}")
        if default_weight is not None:
            check_real("default_weight", default_weight, 0.0, None, low_open=True)
        if max_update_norm is not None:
            check_real("max_update_norm", max_update_norm, 0.0, None, low_open=True)
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        check_real("trim_fraction", trim_fraction, 0.0, 0.5, high_open=True)
        self.expected_data_kind = expected_data_kind
        self.weight_meta_key = weight_meta_key
        self.default_weight = default_weight
        self.max_update_norm = max_update_norm
        self.estimator = estimator
        self.trim_fraction = trim_fraction
        register_sparse_decomposers()  # so that sparse partial updates can be received
        self._accepted: list[tuple[str, dict, float, Optional[dict]]] = []
        self._rejected: dict[str, str] = {}
        self._spec = None

    def reset(self, fl_ctx: FLContext):
        self._accepted = []
        self._rejected = {}
        self._spec = None

    # accepting -----------------------------------------------------------------------------

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        site = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default="?")
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        try:
            data, weight, masks = self._validated(shareable, site, current_round, fl_ctx)
        except ContributionRejected as e:
            self._rejected[site] = str(e)
            self.log_error(fl_ctx, f"rejected the contribution of {site} in round {current_round}: {e}")
            return False
        self._accepted.append((site, data, weight, masks))
        self.log_info(fl_ctx, f"accepted the contribution of {site} in round {current_round} (weight {weight:g})")
        return True

    def _validated(self, shareable: Shareable, site: str, current_round, fl_ctx: FLContext):
        rc = shareable.get_return_code(ReturnCode.OK)
        if rc != ReturnCode.OK:
            raise ContributionRejected(f"return code {rc}")
        contribution_round = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        if current_round is not None and contribution_round is not None and contribution_round != current_round:
            raise ContributionRejected(f"it is for round {contribution_round}")
        if any(s == site for s, *_ in self._accepted):
            raise ContributionRejected("the same site already contributed this round")
        try:
            dxo = from_shareable(shareable)
        except Exception as e:
            raise ContributionRejected(f"not a DXO ({e})") from None
        kind = getattr(dxo.data_kind, "value", dxo.data_kind)
        if kind != self.expected_data_kind:
            raise ContributionRejected(f"data kind {kind}, expected {self.expected_data_kind}")
        weight = self._weight(dxo)
        spec = self._model_spec(fl_ctx, dxo.data)
        sharer_mean = self.estimator == "sharer_mean"
        data, sent = self._restored(dxo.data, spec, with_masks=sharer_mean)
        check_contribution(data, spec, self.max_update_norm)
        masks = None
        if sharer_mean:
            if sent is None and dxo.get_meta_prop(SHARING_META_KEY):
                sent = {k: v != 0 for k, v in data.items()}  # dense partial update: zeros were withheld
            masks = sent or {k: np.ones(v.shape, bool) for k, v in data.items()}
        return data, weight, masks

    @staticmethod
    def _restored(data, spec, with_masks: bool):
        """Dense arrays from a sparse payload (and, ``with_masks``, which entries were sent; else
        None), or the data as is."""
        if not isinstance(data, dict) or not any(isinstance(v, SparseTensor) for v in data.values()):
            return data, None
        if not all(isinstance(v, SparseTensor) for v in data.values()):
            raise ContributionRejected("mixes sparse and dense entries")
        expected = {k: shape for k, (shape, _) in spec.items() if k in data}
        try:
            if with_masks:
                return decode_sparse_with_masks(data, expected_shapes=expected)
            return decode_sparse(data, expected_shapes=expected), None
        except ValueError as e:
            raise ContributionRejected(f"malformed sparse payload: {e}") from None

    def _weight(self, dxo: DXO) -> float:
        weight = dxo.get_meta_prop(self.weight_meta_key)
        if weight is None:
            if self.default_weight is None:
                raise ContributionRejected(f"no weight ({self.weight_meta_key}) and no default_weight set")
            return float(self.default_weight)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ContributionRejected(f"weight {self.weight_meta_key}={weight!r} is not a positive number")
        return float(weight)

    def _model_spec(self, fl_ctx: FLContext, data: dict):
        if self._spec is None:
            global_model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            weights = global_model.get(ModelLearnableKey.WEIGHTS) if isinstance(global_model, dict) else None
            if weights:
                self._spec = model_spec(weights)
            elif self._accepted:
                self._spec = model_spec(self._accepted[0][1])
            elif all(isinstance(v, SparseTensor) for v in data.values()):
                return {k: (tuple(v.shape), v.dtype) for k, v in data.items()}
            else:
                # no global model to compare with: the first contribution sets the layout
                return model_spec(data)
        return self._spec

    # aggregating ---------------------------------------------------------------------------

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        meta = {
            AGGREGATION_META_KEY: {
                "estimator": self.estimator,
                "accepted": [s for s, *_ in self._accepted],
                "rejected": dict(self._rejected),
            }
        }
        if not self._accepted:
            self.log_error(fl_ctx, f"round {current_round}: no contribution accepted; the global model is unchanged")
            global_model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            weights = global_model.get(ModelLearnableKey.WEIGHTS, {}) if isinstance(global_model, dict) else {}
            self.reset(fl_ctx)
            if self.expected_data_kind == DataKind.WEIGHTS:
                unchanged = {k: np.array(v, copy=True) for k, v in weights.items()}
            else:
                unchanged = {k: np.zeros(np.shape(v), dtype=np.asarray(v).dtype) for k, v in weights.items()}
            return DXO(data_kind=self.expected_data_kind, data=unchanged, meta=meta).to_shareable()
        # combined in site order, not arrival order: the same contributions give the same bits
        sites, updates, weights, masks = zip(*sorted(self._accepted, key=lambda c: c[0]))
        combined = combine(list(updates), list(weights), self.estimator, list(masks), self.trim_fraction)
        meta[MetaKey.NUM_STEPS_CURRENT_ROUND] = sum(weights)
        self.log_info(
            fl_ctx,
            f"round {current_round}: {self.estimator} of {len(sites)} contributions ({', '.join(sites)}); "
            f"rejected: {self._rejected or 'none'}",
        )
        self.reset(fl_ctx)
        return DXO(data_kind=self.expected_data_kind, data=combined, meta=meta).to_shareable()
