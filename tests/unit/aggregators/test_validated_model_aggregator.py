"""ValidatedAggregator through NVFlare's FLModel interface (the FedAvg controller that
FedAvgRecipe builds): the same checks as through ScatterAndGather, on FLModels."""

import numpy as np
import pytest
import torch

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from medflare.aggregators.validated_aggregator import AGGREGATION_META_KEY, ValidatedAggregator

GLOBAL = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


def _controller_ctx(round_number=0):
    ctx = FLContext()
    ctx.set_prop(AppConstants.CURRENT_ROUND, round_number, private=True, sticky=False)
    ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(GLOBAL, {}), private=True, sticky=True)
    return ctx


def _site_model(site, params, steps=10, round_number=0, kind=ParamsType.DIFF):
    meta = {"client_name": site}
    if steps is not None:
        meta["NUM_STEPS_CURRENT_ROUND"] = steps
    model = FLModel(params_type=kind, params={"placeholder": 0}, meta=meta, current_round=round_number)
    model.params = params  # what a hostile site can make arrive, past FLModel's own checks
    return model


def _update(value):
    return {k: np.full(v.shape, value, np.float32) for k, v in GLOBAL.items()}


def _started(**kwargs):
    agg = ValidatedAggregator(**kwargs)
    ctx = _controller_ctx()
    agg.handle_event(AppEventType.ROUND_STARTED, ctx)
    agg.reset_stats()
    return agg


def test_it_is_a_model_aggregator_so_nvflare_recipes_keep_it():
    assert isinstance(ValidatedAggregator(), ModelAggregator)
    assert ValidatedAggregator().logger is not None  # FLComponent's init ran


def test_fedavg_path_averages_the_good_and_refuses_the_bad():
    agg = _started(max_update_norm=100.0)
    assert agg.accept_model(_site_model("site-1", _update(1.0), steps=10))
    assert agg.accept_model(_site_model("site-2", _update(4.0), steps=30))
    bad = _update(0.0)
    bad["b"][1] = np.nan
    assert not agg.accept_model(_site_model("site-3", bad))
    assert not agg.accept_model(_site_model("site-4", _update(1e6)))  # norm above the bound
    assert not agg.accept_model(_site_model("site-1", _update(1.0)))  # same site twice
    assert not agg.accept_model(_site_model("site-5", _update(1.0), round_number=7))  # stale round
    assert not agg.accept_model(_site_model("site-6", {"w": GLOBAL["w"]}))  # a key missing
    assert not agg.accept_model(_site_model("site-7", _update(1.0), kind=ParamsType.FULL))  # wrong kind
    assert not agg.accept_model(_site_model(None, _update(1.0)))  # no identity
    assert not agg.accept_model("not a model")
    result = agg.aggregate_model()
    assert isinstance(result, FLModel) and result.params_type == ParamsType.DIFF
    np.testing.assert_allclose(result.params["w"], (1.0 * 10 + 4.0 * 30) / 40)
    record = result.meta[AGGREGATION_META_KEY]
    assert record["accepted"] == ["site-1", "site-2"]
    assert set(record["rejected"]) >= {"site-3", "site-4", "site-5", "site-6", "site-7"}
    assert "NaN" in record["rejected"]["site-3"] or "finite" in record["rejected"]["site-3"]


def test_tensors_in_tensors_out():
    agg = _started()
    params = {k: torch.from_numpy(v) for k, v in _update(2.0).items()}
    assert agg.accept_model(_site_model("site-1", params))
    result = agg.aggregate_model()
    assert isinstance(result.params["w"], torch.Tensor)
    assert torch.allclose(result.params["w"], torch.full((2, 3), 2.0))


def test_without_the_controllers_context_nothing_is_aggregated():
    agg = ValidatedAggregator()
    agg.handle_event(EventType.START_RUN, FLContext())  # no global model in this context
    agg.reset_stats()
    assert not agg.accept_model(_site_model("site-1", _update(1.0)))
    assert agg.aggregate_model().meta[AGGREGATION_META_KEY]["accepted"] == []


@pytest.mark.parametrize("event", [EventType.START_RUN, AppEventType.INITIAL_MODEL_LOADED, AppEventType.ROUND_STARTED])
def test_the_controllers_context_is_kept_from_its_events(event):
    agg = ValidatedAggregator()
    ctx = _controller_ctx()
    agg.handle_event(event, ctx)
    assert agg.fl_ctx is ctx
    agg.handle_event(AppEventType.BEFORE_AGGREGATION, FLContext())
    assert agg.fl_ctx is ctx


@pytest.mark.parametrize(
    "params, reason",
    [
        ({k: np.ones(v.shape, np.int64) for k, v in GLOBAL.items()}, "has dtype int64, the model has float32"),
        ({k: np.ones(v.shape, np.complex64) for k, v in GLOBAL.items()}, "has dtype complex64"),
        ({k: np.array([object()] * v.size, dtype=object).reshape(v.shape) for k, v in GLOBAL.items()}, "has dtype object"),
        ({k: "x" for k in GLOBAL}, "is str, not a numpy array"),
        ({**_update(1.0), "extra": np.zeros(2, np.float32)}, "unexpected keys ['extra']"),
        ([1, 2], "not a readable FLModel"),
    ],
)
def test_hostile_fl_models_are_refused_whole_and_named(params, reason):
    agg = _started()
    assert not agg.accept_model(_site_model("site-1", params))
    (name, why), = agg._rejected.items()
    assert name == "site-1" and reason in why
    assert agg.aggregate_model().meta[AGGREGATION_META_KEY]["accepted"] == []
