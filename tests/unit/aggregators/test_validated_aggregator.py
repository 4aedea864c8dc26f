"""Fault injection at the aggregator: in every case the result is exactly the aggregate of the
good contributions, computed independently in numpy."""

import numpy as np
import pytest

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
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
        "missing-weight": (_contribution("site-3", base, steps=None), "no weight"),
        "nan-weight": (_contribution("site-3", base, steps=float("nan")), "not a positive number"),
        "same-site-twice": (_contribution("site-1", base), "already contributed"),
        "old-round": (_contribution("site-3", base, round_number=0), "for round 0"),
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
    ],
)
def test_bad_configuration_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ValidatedAggregator(**kwargs)
