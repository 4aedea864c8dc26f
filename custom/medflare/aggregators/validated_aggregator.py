"""NVFlare aggregator for the FedAvg workflow that checks every contribution whole before using it.

It plugs into ``ScatterAndGather`` as its ``aggregator`` component. Each site's result is
checked completely first: the peer's identity, the return code, the round (the server's
``CURRENT_ROUND`` and the result's ``CONTRIBUTION_ROUND`` cookie, both required ints), the same
site twice, the data kind, the weight (finite, positive, at most ``max_weight``), and then,
against the global model that ``ScatterAndGather`` puts in the ``FLContext`` (required), the
keys, shapes, dtypes, values in the model's dtype and the norm (see
:mod:`.contribution_checks`). Partial updates sent sparse
(:mod:`medflare.transport.sparse_update`) are restored first, and the entries they carried are
what ``sharer_mean`` averages over. A refused contribution is logged with the site and the
reason and nothing of it is used; the round goes on with the others. Accepted contributions
are combined by the chosen estimator (:mod:`.estimators`) in float64 and returned in the global
model's dtypes. After ``fail_after_empty_rounds`` consecutive rounds with no accepted
contribution the job is stopped (``system_panic``).

It is also a ``ModelAggregator``, so NVFlare's FLModel workflows keep it: the ``FedAvg``
controller that ``FedAvgRecipe(aggregator=ValidatedAggregator(...))`` builds calls
:meth:`~ValidatedAggregator.accept_model`, which runs the same checks on the site's ``FLModel``
(the site's name is the one the controller recorded from the task, not one the site wrote; the
round is the ``FLModel``'s). NVFlare's recipes silently fall back to plain averaging for an
aggregator that is not a ``ModelAggregator``; :class:`medflare.recipes.fedavg.FedAvgRecipe`
refuses one instead.

Key names come from :mod:`medflare.wire_contract`; the server imports no client module.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from medflare.aggregators.contribution_checks import ContributionRejected, check_weight, checked_contribution, model_spec
from medflare.aggregators.contribution_intake import ContributionIntake
from medflare.aggregators.estimators import ESTIMATORS, combine, total_weight
from medflare.privacy.argument_checks import check_int, check_real
from medflare.transport.sparse_update import SparseTensor, decode_sparse, decode_sparse_with_masks, register_sparse_decomposers
from medflare.wire_contract import AGGREGATION, NUM_STEPS, PERCENTILE_SHARING, WEIGHT_KEYS

__all__ = ["ValidatedAggregator", "AGGREGATION_META_KEY"]

#: the aggregation record's meta key; an alias of :data:`medflare.wire_contract.AGGREGATION`
AGGREGATION_META_KEY = AGGREGATION

_UNWEIGHTED = ("median", "trimmed_mean")


#: events whose FLContext carries the FLModel workflow's round and global model
_CONTEXT_EVENTS = (EventType.START_RUN, AppEventType.INITIAL_MODEL_LOADED, AppEventType.ROUND_STARTED)


class ValidatedAggregator(ContributionIntake, ModelAggregator):
    """Weighted FedAvg (or a robust estimator) over contributions that passed every check.

    Args:
        expected_data_kind: ``"WEIGHT_DIFF"`` (default) or ``"WEIGHTS"``.
        weight_meta_key: DXO meta key of each site's weight: ``NUM_STEPS_CURRENT_ROUND``
            (default) or ``num_train_cases``, the counts the wire contract declares.
        default_weight: weight for a site that reports none; null (default) refuses such sites
            unless ``equal_weights_when_withheld`` is set.
        max_update_norm: refuse updates whose L2 norm exceeds this; null for no bound.
        estimator: ``"weighted_mean"``, ``"sharer_mean"`` (for partial sharing), ``"median"``
            or ``"trimmed_mean"``.
        trim_fraction: share of values cut from each end by ``trimmed_mean``, in [0, 0.5).
        max_weight: refuse a weight above this; null for no cap.
        equal_weights_when_withheld: when a site's privacy scope withholds its weight (the meta
            key is missing), accept the contribution and weight every accepted site of that
            round equally; exclusive with ``default_weight``.
        fail_after_empty_rounds: stop the job (``system_panic``) after this many consecutive
            rounds in which no contribution was accepted; null (default) never stops it.
    """

    def __init__(
        self,
        expected_data_kind: str = "WEIGHT_DIFF",
        weight_meta_key: str = NUM_STEPS,
        default_weight: Optional[float] = None,
        max_update_norm: Optional[float] = None,
        estimator: str = "weighted_mean",
        trim_fraction: float = 0.1,
        max_weight: Optional[float] = None,
        equal_weights_when_withheld: bool = False,
        fail_after_empty_rounds: Optional[int] = None,
    ):
        super().__init__()
        if expected_data_kind not in ("WEIGHT_DIFF", "WEIGHTS"):
            raise ValueError(f"expected_data_kind must be 'WEIGHT_DIFF' or 'WEIGHTS', got {expected_data_kind!r}")
        if weight_meta_key not in WEIGHT_KEYS:
            raise ValueError(f"weight_meta_key must be a count the wire contract declares, one of {list(WEIGHT_KEYS)}, got {weight_meta_key!r}")
        if default_weight is not None:
            check_real("default_weight", default_weight, 0.0, None, low_open=True)
        if max_update_norm is not None:
            check_real("max_update_norm", max_update_norm, 0.0, None, low_open=True)
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        check_real("trim_fraction", trim_fraction, 0.0, 0.5, high_open=True)
        if max_weight is not None:
            check_real("max_weight", max_weight, 0.0, None, low_open=True)
            if default_weight is not None and default_weight > max_weight:
                raise ValueError(f"default_weight {default_weight!r} exceeds max_weight {max_weight!r}")
        if not isinstance(equal_weights_when_withheld, bool):
            raise TypeError(f"equal_weights_when_withheld must be true or false, got {equal_weights_when_withheld!r}")
        if equal_weights_when_withheld and default_weight is not None:
            raise ValueError(
                f"default_weight ({default_weight!r}) and equal_weights_when_withheld (true) both say what a "
                "withheld weight means; set one of them"
            )
        if fail_after_empty_rounds is not None:
            check_int("fail_after_empty_rounds", fail_after_empty_rounds, 1, None)
        self.expected_data_kind = expected_data_kind
        self.weight_meta_key = weight_meta_key
        self.default_weight = default_weight
        self.max_update_norm = max_update_norm
        self.estimator = estimator
        self.trim_fraction = trim_fraction
        self.max_weight = max_weight
        self.equal_weights_when_withheld = equal_weights_when_withheld
        self.fail_after_empty_rounds = fail_after_empty_rounds
        register_sparse_decomposers()  # so that sparse partial updates can be received
        self._empty_rounds = 0
        self.reset(None)

    def reset(self, fl_ctx: Optional[FLContext]):
        super().reset(fl_ctx)
        #: self._accepted: (site, update in the model's dtypes, weight or None when withheld, masks or None, norm)
        self._spec = None
        self._torch_params = False

    # accepting (the peer, return code, round, duplicate and kind checks: ContributionIntake) -----

    def _accepted_detail(self, contribution: tuple) -> str:
        weight = contribution[2]
        return f"weight {'withheld' if weight is None else f'{weight:g}'}, norm {contribution[4]:.4g}"

    def _checked(self, dxo: DXO, shareable: Shareable, site: str, fl_ctx: FLContext):
        weight = self._weight(dxo)
        spec = self._model_spec(fl_ctx)
        sharer_mean = self.estimator == "sharer_mean"
        data, sent = self._restored(dxo.data, spec, with_masks=sharer_mean)
        data, norm = checked_contribution(data, spec, self.max_update_norm)
        masks = None
        if sharer_mean:
            if sent is None and dxo.get_meta_prop(PERCENTILE_SHARING):
                sent = {k: v != 0 for k, v in data.items()}  # dense partial update: zeros were withheld
            masks = sent or {k: np.ones(v.shape, bool) for k, v in data.items()}
        return site, data, weight, masks, norm

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

    def _weight(self, dxo: DXO) -> Optional[float]:
        """The site's weight; None when it is withheld and the job weights such rounds equally."""
        weight = dxo.get_meta_prop(self.weight_meta_key)
        if weight is None:
            if self.equal_weights_when_withheld:
                return None
            if self.default_weight is None:
                raise ContributionRejected(
                    f"no weight ({self.weight_meta_key}) and neither default_weight nor equal_weights_when_withheld set"
                )
            return float(self.default_weight)
        return check_weight(weight, self.weight_meta_key, self.max_weight)

    def _model_spec(self, fl_ctx: FLContext):
        if self._spec is None:
            global_model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            weights = global_model.get(ModelLearnableKey.WEIGHTS) if isinstance(global_model, dict) else None
            if not isinstance(weights, dict) or not weights:
                raise ContributionRejected(
                    "the server has no global model to check it against (AppConstants.GLOBAL_MODEL holds "
                    f"{type(global_model).__name__}); nothing is aggregated without one"
                )
            self._spec = model_spec(weights)
        return self._spec

    # the FLModel interface (NVFlare's FedAvg controller, FedAvgRecipe) ------------------------

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        # accept_model() gets no FLContext: keep the controller's, which holds CURRENT_ROUND and
        # the global model (AppConstants.GLOBAL_MODEL) the contributions are checked against
        if event_type in _CONTEXT_EVENTS:
            self.fl_ctx = fl_ctx

    def accept_model(self, model: FLModel) -> bool:
        """Check and keep one site's ``FLModel``, as :meth:`accept` does a ``Shareable``."""
        try:
            shareable = _contribution_from_model(model)
        except Exception as e:  # fail closed: what cannot be read is not aggregated
            site = (getattr(model, "meta", None) or {}).get("client_name") if isinstance(model, FLModel) else None
            return self._reject(site, self._fl_ctx_round(), f"not a readable FLModel ({type(e).__name__}: {e})", self.fl_ctx)
        accepted = self.accept(shareable, self.fl_ctx)  # may start the round afresh (reset)
        self._torch_params = self._torch_params or (accepted and _holds_tensors(model.params))
        return accepted

    def aggregate_model(self) -> FLModel:
        """The round's aggregate as an ``FLModel`` (tensors again if the sites sent tensors)."""
        torch_params = self._torch_params
        aggregated = FLModelUtils.from_shareable(self.aggregate(self.fl_ctx))
        if torch_params:
            import torch

            aggregated.params = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in aggregated.params.items()}
        return aggregated

    def reset_stats(self):
        self.reset(self.fl_ctx)

    def _fl_ctx_round(self):
        return self.fl_ctx.get_prop(AppConstants.CURRENT_ROUND) if self.fl_ctx is not None else None

    # aggregating ---------------------------------------------------------------------------

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        accepted = sorted(self._accepted, key=lambda c: c[0])  # site order: same inputs, same bits
        meta = {
            AGGREGATION_META_KEY: {
                "estimator": self.estimator,
                "accepted": [c[0] for c in accepted],
                "rejected": dict(self._rejected),
                "update_norms": {c[0]: float(c[4]) for c in accepted},
            }
        }
        self._mark_aggregated(current_round)
        global_model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        global_weights = global_model.get(ModelLearnableKey.WEIGHTS, {}) if isinstance(global_model, dict) else {}
        spec = self._spec
        self.reset(fl_ctx)
        if not accepted:
            self._count_empty_round(current_round, fl_ctx)
            return self._unchanged(global_weights, meta)
        self._empty_rounds = 0
        sites, updates, weights, masks, _ = zip(*accepted)
        weights, meta[AGGREGATION_META_KEY]["weighting"] = self._round_weights(sites, weights, current_round, fl_ctx)
        dtypes = {k: dtype for k, (_, dtype) in spec.items()}
        combined = combine(list(updates), weights, self.estimator, list(masks), self.trim_fraction, dtypes)
        meta[NUM_STEPS] = total_weight(weights)
        self.log_info(
            fl_ctx,
            f"round {current_round}: {self.estimator} of {len(sites)} contributions ({', '.join(sites)}); "
            f"rejected: {meta[AGGREGATION_META_KEY]['rejected'] or 'none'}",
        )
        return DXO(data_kind=self.expected_data_kind, data=combined, meta=meta).to_shareable()

    def _round_weights(self, sites, weights, current_round, fl_ctx: FLContext) -> tuple[list[float], str]:
        withheld = [s for s, w in zip(sites, weights) if w is None]
        if self.estimator in _UNWEIGHTED:
            return [1.0] * len(sites), "unweighted"
        if withheld:
            self.log_warning(
                fl_ctx,
                f"round {current_round}: {', '.join(withheld)} withheld {self.weight_meta_key}; "
                f"every accepted site is weighted equally this round",
            )
            return [1.0] * len(sites), f"equal (weight withheld by: {', '.join(withheld)})"
        return list(weights), f"by {self.weight_meta_key}"

    def _count_empty_round(self, current_round, fl_ctx: FLContext) -> None:
        self._empty_rounds += 1
        self.log_error(fl_ctx, f"round {current_round}: no contribution accepted; the global model is unchanged")
        if self.fail_after_empty_rounds is not None and self._empty_rounds >= self.fail_after_empty_rounds:
            reason = (
                f"{self._empty_rounds} consecutive rounds without an accepted contribution "
                f"(fail_after_empty_rounds={self.fail_after_empty_rounds}); stopping the job"
            )
            self.log_error(fl_ctx, reason)
            self.system_panic(reason, fl_ctx)

    def _unchanged(self, global_weights: dict, meta: dict) -> Shareable:
        if self.expected_data_kind == DataKind.WEIGHTS:
            data = {k: np.array(v, copy=True) for k, v in global_weights.items()}
        else:
            data = {k: np.zeros(np.shape(v), dtype=model_spec({k: v})[k][1]) for k, v in global_weights.items()}
        return DXO(data_kind=self.expected_data_kind, data=data, meta=meta).to_shareable()


def _holds_tensors(params) -> bool:
    return isinstance(params, dict) and any(hasattr(v, "detach") for v in params.values())


def _contribution_from_model(model: FLModel) -> Shareable:
    """A site's ``FLModel`` as the ``Shareable`` ``ScatterAndGather`` would have handed over:
    the DXO, the site's name as the peer (``meta["client_name"]``, which NVFlare's model
    controller sets from the task's client) and the round as the contribution cookie."""
    if not isinstance(model, FLModel):
        raise TypeError(f"expected an FLModel, got {type(model).__name__}")
    if _holds_tensors(model.params):
        model = FLModel(
            params_type=model.params_type,
            params={k: v.detach().cpu().numpy() if hasattr(v, "detach") else v for k, v in model.params.items()},
            metrics=model.metrics,
            meta=model.meta,
            current_round=model.current_round,
        )
    shareable = FLModelUtils.to_shareable(model)
    meta = model.meta or {}
    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: meta.get("client_name")})
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, model.current_round)
    return shareable
