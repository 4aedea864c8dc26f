"""Fault injection at the aggregator: in every case the result is exactly the aggregate of the
good contributions, computed independently in numpy."""

import numpy as np
import pytest

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants

from medflare.aggregators.validated_aggregator import AGGREGATION_META_KEY, ValidatedAggregator

GLOBAL = {"conv.weight": np.zeros((3, 2), np.float32), "conv.bias": np.zeros(3, np.float32)}


def _ctx(round_number=1):
    ctx = FLContext()
    ctx.set_prop(AppConstants.CURRENT_ROUND, round_number, private=True, sticky=True)
    ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(GLOBAL, {}), private=True, sticky=True)
    return ctx


def _update(seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in GLOBAL.items()}


def _contribution(site, data, steps=10, round_number=1, kind=DataKind.WEIGHT_DIFF, meta=None):
    m = {MetaKey.NUM_STEPS_CURRENT_ROUND: steps} if steps is not None else {}
    m.update(meta or {})
    s = DXO(data_kind=kind, data=data, meta=m).to_shareable()
    s.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    if round_number is not None:
        s.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_number)
    return s


def _reference(good):
    total = sum(w for _, w in good)
    return {k: sum(u[k].astype(np.float64) * w for u, w in good) / total for k in GLOBAL}


def _aggregate(agg, ctx):
    return from_shareable(agg.aggregate(ctx))


GOOD = [("site-1", _update(1), 10), ("site-2", _update(2), 30)]


def _bad_cases():
    base = _update(3)
    nan = {**base, "conv.bias": np.array([1.0, np.nan, 0.0], np.float32)}
    inf = {**base, "conv.weight": np.full((3, 2), np.inf, np.float32)}
    shape = {**base, "conv.bias": np.zeros((3, 1), np.float32)}
    broadcastable = {**base, "conv.bias": np.zeros(1, np.float32)}
    missing = {"conv.weight": base["conv.weight"]}
    extra = {**base, "head.weight": np.zeros(2, np.float32)}
    dtype = {**base, "conv.bias": np.zeros(3, np.int64)}
    return {
        "nan": (_contribution("site-3", nan), "NaN or infinite"),
        "inf": (_contribution("site-3", inf), "NaN or infinite"),
        "shape": (_contribution("site-3", shape), r"shape \(3, 1\), the model has \(3,\)"),
        "broadcastable-shape": (_contribution("site-3", broadcastable), r"shape \(1,\)"),
        "missing-key": (_contribution("site-3", missing), r"missing keys \['conv.bias'\]"),
        "extra-key": (_contribution("site-3", extra), r"unexpected keys \['head.weight'\]"),
        "dtype": (_contribution("site-3", dtype), "dtype int64"),
        "zero-weight": (_contribution("site-3", base, steps=0), "not a positive number"),
        "f64-overflow": (_contribution("site-3", {**base, "conv.bias": np.full(3, 1e300)}), "outside the range of the model's dtype float32"),
        "missing-weight": (_contribution("site-3", base, steps=None), "no weight"),
        "nan-weight": (_contribution("site-3", base, steps=float("nan")), "not a positive number"),
        "same-site-twice": (_contribution("site-1", base), "already contributed"),
        "old-round": (_contribution("site-3", base, round_number=0), "for round 0, the current round is 1"),
        "no-round": (_contribution("site-3", base, round_number=None), "CONTRIBUTION_ROUND cookie is missing"),
        "wrong-kind": (_contribution("site-3", base, kind=DataKind.WEIGHTS), "data kind WEIGHTS"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_a_bad_contribution_changes_nothing(case, caplog):
    bad, reason = _bad_cases()[case]
    agg, ctx = ValidatedAggregator(), _ctx()
    for site, update, steps in GOOD[:1]:
        assert agg.accept(_contribution(site, update, steps), ctx)
    assert not agg.accept(bad, ctx)
    for site, update, steps in GOOD[1:]:
        assert agg.accept(_contribution(site, update, steps), ctx)
    result = _aggregate(agg, ctx)
    expected = _reference([(u, w) for _, u, w in GOOD])
    for key in GLOBAL:
        np.testing.assert_allclose(result.data[key], expected[key], rtol=1e-6)
    info = result.get_meta_prop(AGGREGATION_META_KEY)
    assert info["accepted"] == ["site-1", "site-2"]
    import re

    assert any(re.search(reason, text) for text in info["rejected"].values())


def test_error_replies_are_not_aggregated():
    agg, ctx = ValidatedAggregator(), _ctx()
    bad = _contribution("site-3", _update(3))
    bad.set_return_code(ReturnCode.EXECUTION_EXCEPTION)
    assert not agg.accept(bad, ctx)


def test_default_weight_only_when_the_job_allows_it():
    agg, ctx = ValidatedAggregator(default_weight=5.0), _ctx()
    assert agg.accept(_contribution("site-1", _update(1), steps=None), ctx)
    assert agg.accept(_contribution("site-2", _update(2), steps=15), ctx)
    expected = _reference([(_update(1), 5.0), (_update(2), 15.0)])
    np.testing.assert_allclose(_aggregate(agg, ctx).data["conv.weight"], expected["conv.weight"], rtol=1e-6)


def test_norm_bound_rejects_large_updates():
    agg, ctx = ValidatedAggregator(max_update_norm=1.0), _ctx()
    assert not agg.accept(_contribution("site-1", {k: v * 100 for k, v in _update(1).items()}), ctx)
    small = {k: v * 1e-3 for k, v in _update(2).items()}
    assert agg.accept(_contribution("site-2", small), ctx)


def test_no_accepted_contribution_leaves_the_global_model_unchanged():
    agg, ctx = ValidatedAggregator(), _ctx()
    assert not agg.accept(_contribution("site-1", {"x": np.ones(2, np.float32)}), ctx)
    result = _aggregate(agg, ctx)
    assert all(not np.any(v) for v in result.data.values()) and set(result.data) == set(GLOBAL)


def test_equivalent_to_numpy_reference_with_many_sites():
    agg, ctx = ValidatedAggregator(), _ctx()
    good = [(_update(s), float(s + 1)) for s in range(13)]
    for s, (u, w) in enumerate(good):
        assert agg.accept(_contribution(f"site-{s}", u, steps=w), ctx)
    result = _aggregate(agg, ctx)
    expected = _reference(good)
    for key in GLOBAL:
        np.testing.assert_allclose(result.data[key], expected[key], rtol=1e-6)
    assert result.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == sum(w for _, w in good)


def test_robust_estimators_ignore_an_outlier_site():
    updates = [_update(s) for s in range(5)]
    outlier = {k: np.full(v.shape, 1e6, np.float32) for k, v in GLOBAL.items()}
    for estimator, kwargs in (("median", {}), ("trimmed_mean", {"trim_fraction": 0.2})):
        agg, ctx = ValidatedAggregator(estimator=estimator, **kwargs), _ctx()
        for s, u in enumerate(updates + [outlier]):
            assert agg.accept(_contribution(f"site-{s}", u), ctx)
        result = _aggregate(agg, ctx)
        stack = np.stack([u["conv.weight"] for u in updates + [outlier]]).astype(np.float64)
        if estimator == "median":
            expected = np.median(stack, axis=0)
        else:
            expected = np.sort(stack, axis=0)[1:5].mean(axis=0)
        np.testing.assert_allclose(result.data["conv.weight"], expected, rtol=1e-6)
        assert np.abs(result.data["conv.weight"]).max() < 10


def test_sharer_mean_averages_each_entry_over_the_sites_that_shared_it():
    shared_meta = {"medflare_percentile_sharing": {"fraction_shared": 0.5}}
    a = {"conv.weight": np.array([[2, 0], [0, 4], [6, 0]], np.float32), "conv.bias": np.array([1, 0, 0], np.float32)}
    b = {"conv.weight": np.array([[4, 2], [0, 0], [0, 0]], np.float32), "conv.bias": np.array([3, 0, 5], np.float32)}
    for estimator, expected_w, expected_b in (
        ("sharer_mean", [[3, 2], [0, 4], [6, 0]], [2, 0, 5]),
        ("weighted_mean", [[3, 1], [0, 2], [3, 0]], [2, 0, 2.5]),
    ):
        agg, ctx = ValidatedAggregator(estimator=estimator), _ctx()
        assert agg.accept(_contribution("site-1", a, steps=10, meta=shared_meta), ctx)
        assert agg.accept(_contribution("site-2", b, steps=10, meta=shared_meta), ctx)
        result = _aggregate(agg, ctx)
        np.testing.assert_allclose(result.data["conv.weight"], expected_w)
        np.testing.assert_allclose(result.data["conv.bias"], expected_b)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"expected_data_kind": "METRICS"}, "expected_data_kind must be"),
        ({"default_weight": 0}, "default_weight must be in"),
        ({"max_update_norm": float("nan")}, "max_update_norm must be a finite"),
        ({"estimator": "mean"}, "estimator must be one of"),
        ({"trim_fraction": 0.5}, r"trim_fraction must be in \[0.0, 0.5\)"),
        ({"weight_meta_key": ""}, "weight_meta_key must be"),
        ({"weight_meta_key": "num_train_case"}, "a count the wire contract declares"),
        ({"weight_meta_key": "train_loss"}, "a count the wire contract declares"),
        ({"max_weight": 0}, r"max_weight must be in \(0.0, inf\), got 0.0"),
        ({"max_weight": float("inf")}, "max_weight must be a finite"),
        ({"max_weight": 10, "default_weight": 20}, "default_weight 20 exceeds max_weight 10"),
        ({"default_weight": 1.0, "equal_weights_when_withheld": True}, "set one of them"),
        ({"fail_after_empty_rounds": 0}, r"fail_after_empty_rounds must be an int in \[1, inf\], got 0"),
    ],
)
def test_bad_configuration_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ValidatedAggregator(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_weight": True}, "max_weight must be a real number"),
        ({"max_weight": "100"}, "max_weight must be a real number"),
        ({"equal_weights_when_withheld": "yes"}, "equal_weights_when_withheld must be true or false, got 'yes'"),
        ({"equal_weights_when_withheld": 1}, "equal_weights_when_withheld must be true or false, got 1"),
        ({"fail_after_empty_rounds": 1.5}, "fail_after_empty_rounds must be an int"),
        ({"fail_after_empty_rounds": True}, "fail_after_empty_rounds must be an int"),
    ],
)
def test_badly_typed_configuration_is_refused(kwargs, message):
    with pytest.raises(TypeError, match=message):
        ValidatedAggregator(**kwargs)


def _ctx_without(prop):
    ctx = _ctx()
    ctx.set_prop(prop, None, private=True, sticky=True)
    return ctx


@pytest.mark.parametrize(
    "ctx_prop, message",
    [
        (AppConstants.GLOBAL_MODEL, "the server has no global model to check it against"),
        (AppConstants.CURRENT_ROUND, r"the server has no current round \(AppConstants.CURRENT_ROUND is not set\)"),
    ],
)
def test_without_the_server_state_nothing_is_accepted(ctx_prop, message):
    agg, ctx = ValidatedAggregator(), _ctx_without(ctx_prop)
    assert not agg.accept(_contribution("site-1", _update(1)), ctx)
    assert not agg.accept(_contribution("site-2", _update(2)), ctx)  # the first never set the layout
    import re

    rejected = _aggregate(agg, ctx).get_meta_prop(AGGREGATION_META_KEY)["rejected"]
    assert set(rejected) == {"site-1", "site-2"} and all(re.search(message, r) for r in rejected.values())


def test_a_non_int_server_round_refuses_everything():
    agg, ctx = ValidatedAggregator(), _ctx(round_number="1")
    assert not agg.accept(_contribution("site-1", _update(1), round_number="1"), ctx)


def test_withheld_weights_weight_the_round_equally(caplog):
    agg, ctx = ValidatedAggregator(equal_weights_when_withheld=True), _ctx()
    assert agg.accept(_contribution("site-1", _update(1), steps=10), ctx)
    assert agg.accept(_contribution("site-2", _update(2), steps=None), ctx)
    assert agg.accept(_contribution("site-3", _update(3), steps=None), ctx)
    result = _aggregate(agg, ctx)
    expected = _reference([(_update(s), 1.0) for s in (1, 2, 3)])
    for key in GLOBAL:
        np.testing.assert_allclose(result.data[key], expected[key], rtol=1e-6)
    info = result.get_meta_prop(AGGREGATION_META_KEY)
    assert info["weighting"] == "equal (weight withheld by: site-2, site-3)"
    assert caplog.text.count("weighted equally this round") == 1
    # the next round with every weight present is weighted by them again
    ctx = _ctx(round_number=2)
    for site, update, steps in GOOD:
        assert agg.accept(_contribution(site, update, steps, round_number=2), ctx)
    result = _aggregate(agg, ctx)
    assert result.get_meta_prop(AGGREGATION_META_KEY)["weighting"] == "by NUM_STEPS_CURRENT_ROUND"
    np.testing.assert_allclose(result.data["conv.weight"], _reference([(u, w) for _, u, w in GOOD])["conv.weight"], rtol=1e-6)


def test_a_withheld_weight_is_refused_unless_the_job_allows_it():
    agg, ctx = ValidatedAggregator(), _ctx()
    assert not agg.accept(_contribution("site-1", _update(1), steps=None), ctx)
    rejected = _aggregate(agg, ctx).get_meta_prop(AGGREGATION_META_KEY)["rejected"]
    assert "neither default_weight nor equal_weights_when_withheld" in rejected["site-1"]


def test_weights_that_overflow_their_sum_keep_every_site():
    agg, ctx = ValidatedAggregator(), _ctx()  # no max_weight: the sum itself must not overflow
    assert agg.accept(_contribution("site-1", _update(1), steps=1e308), ctx)
    assert agg.accept(_contribution("site-2", _update(2), steps=1e308), ctx)
    result = _aggregate(agg, ctx)
    expected = _reference([(_update(1), 1.0), (_update(2), 1.0)])
    for key in GLOBAL:
        np.testing.assert_allclose(result.data[key], expected[key], rtol=1e-6)


def test_a_weight_above_max_weight_is_refused():
    agg, ctx = ValidatedAggregator(max_weight=100), _ctx()
    assert agg.accept(_contribution("site-1", _update(1), steps=100), ctx)
    assert not agg.accept(_contribution("site-2", _update(2), steps=101), ctx)
    assert "weight NUM_STEPS_CURRENT_ROUND=101 exceeds max_weight 100" in _aggregate(agg, ctx).get_meta_prop(
        AGGREGATION_META_KEY
    )["rejected"]["site-2"]


@pytest.mark.parametrize("site_dtype", [np.float16, np.float32, np.float64])
def test_the_aggregate_is_in_the_global_models_dtype(site_dtype):
    agg, ctx = ValidatedAggregator(), _ctx()
    first = {k: v.astype(site_dtype) for k, v in _update(1).items()}
    assert agg.accept(_contribution("site-0", first, steps=10), ctx)  # sorts first
    assert agg.accept(_contribution("site-1", _update(2), steps=30), ctx)
    result = _aggregate(agg, ctx)
    expected = _reference([({k: v.astype(site_dtype).astype(np.float32) for k, v in _update(1).items()}, 10), (_update(2), 30)])
    for key in GLOBAL:
        assert result.data[key].dtype == np.float32
        np.testing.assert_allclose(result.data[key], expected[key], rtol=1e-6)


def test_bool_entries_must_match_and_are_a_weighted_majority():
    model = {"w": np.zeros(2, np.float32), "mask": np.zeros(3, bool)}
    ctx = FLContext()
    ctx.set_prop(AppConstants.CURRENT_ROUND, 1, private=True, sticky=True)
    ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(model, {}), private=True, sticky=True)
    agg = ValidatedAggregator(expected_data_kind="WEIGHTS")
    votes = [([True, True, False], 10), ([True, False, False], 20), ([False, True, True], 15)]
    for n, (mask, steps) in enumerate(votes):
        data = {"w": np.ones(2, np.float32), "mask": np.array(mask)}
        assert agg.accept(_contribution(f"site-{n}", data, steps=steps, kind=DataKind.WEIGHTS), ctx)
    assert not agg.accept(
        _contribution("site-9", {"w": np.ones(2, np.float32), "mask": np.ones(3, np.uint8)}, kind=DataKind.WEIGHTS), ctx
    )
    result = _aggregate(agg, ctx)
    # weighted share of True per entry: 30/45, 25/45, 15/45
    np.testing.assert_array_equal(result.data["mask"], [True, True, False])
    assert result.data["mask"].dtype == bool
    assert "dtype uint8, the model has bool" in result.get_meta_prop(AGGREGATION_META_KEY)["rejected"]["site-9"]


class _Engine:
    """Records the events an aggregator fires (the server engine would abort the job)."""

    def __init__(self):
        self.events = []

    def fire_event(self, event_type, fl_ctx):
        self.events.append((event_type, fl_ctx.get_prop(FLContextKey.EVENT_DATA)))


def test_the_job_fails_after_consecutive_empty_rounds():
    agg, engine = ValidatedAggregator(max_update_norm=1.0, fail_after_empty_rounds=2), _Engine()
    huge = {k: v * 1e3 for k, v in _update(1).items()}
    small = {k: v * 1e-3 for k, v in _update(2).items()}

    def one_round(number, update):
        ctx = _ctx(round_number=number)
        ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)
        agg.accept(_contribution("site-1", update, round_number=number), ctx)
        agg.aggregate(ctx)
        agg.reset(ctx)
        return [reason for event, reason in engine.events if event == EventType.FATAL_SYSTEM_ERROR]

    assert one_round(1, huge) == []
    assert one_round(2, small) == []  # an accepted contribution restarts the count
    assert one_round(3, huge) == []
    panics = one_round(4, huge)
    assert panics == ["2 consecutive rounds without an accepted contribution (fail_after_empty_rounds=2); stopping the job"]


def test_a_contribution_for_a_round_that_was_never_reset_does_not_leak():
    agg = ValidatedAggregator()
    ctx1, ctx2 = _ctx(round_number=1), _ctx(round_number=2)
    assert agg.accept(_contribution("site-1", _update(1), round_number=1), ctx1)
    # no aggregate()/reset() for round 1 (another workflow): round 2 starts afresh
    assert agg.accept(_contribution("site-1", _update(2), round_number=2), ctx2)
    result = _aggregate(agg, ctx2)
    np.testing.assert_allclose(result.data["conv.weight"], _update(2)["conv.weight"], rtol=1e-6)
