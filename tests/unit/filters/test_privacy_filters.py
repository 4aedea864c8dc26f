"""Both privacy filters against NVFlare's real DXO, Shareable and FLContext: they fail closed."""

import json
import math
import os

import numpy as np
import pytest

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.workspace import Workspace
from nvflare.app_common.app_constant import AppConstants

from medflare.filters.gaussian_privacy import PRIVACY_META_KEY, GaussianPrivacyFilter
from medflare.filters.percentile_sharing import SHARING_META_KEY, PercentileSharingFilter
from medflare.privacy.accounting import epsilon_spent
from medflare.privacy.budget_ledger import LEDGER_FILE_NAME, PrivacyBudgetLedger
from medflare.privacy.site_budget import SITE_BUDGET_FILE_NAME
from medflare.privacy.update_checks import UnsafeUpdateError


@pytest.fixture()
def fl_ctx(tmp_path):
    (tmp_path / "startup").mkdir()
    (tmp_path / "local").mkdir()
    write_site_budget(tmp_path / "local", max_epsilon=1000.0)
    ctx = FLContext()
    ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, Workspace(str(tmp_path), "site-1"), private=True, sticky=True)
    return ctx


def write_site_budget(local_dir, max_epsilon, delta=1e-5, accountant="rdp"):
    """What a site profile installs: the site's own lifetime cap."""
    (local_dir / SITE_BUDGET_FILE_NAME).write_text(
        json.dumps({"max_epsilon": max_epsilon, "delta": delta, "accountant": accountant})
    )


def _releases(tmp_path):
    return PrivacyBudgetLedger.read_releases(str(tmp_path / "local" / LEDGER_FILE_NAME))


def _update():
    rng = np.random.default_rng(0)
    return {"conv.weight": rng.standard_normal((4, 3)).astype(np.float32), "bn.count": np.array(7, np.int64)}


def _result(data=None, kind=DataKind.WEIGHT_DIFF, round_number=0):
    result = DXO(data_kind=kind, data=_update() if data is None else data, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 5}).to_shareable()
    result.set_header(AppConstants.CURRENT_ROUND, round_number)
    return result


def _gaussian(**kwargs):
    args = dict(clipping_norm=1.0, max_epsilon=20.0, noise_multiplier=2.0, noise_seed=0)
    args.update(kwargs)
    return GaussianPrivacyFilter(**args)


FILTERS = {
    "percentile": lambda: PercentileSharingFilter(fraction_shared=0.5, gamma=0.5),
    "gaussian": _gaussian,
}


@pytest.mark.parametrize("name", FILTERS)
def test_a_weight_diff_is_filtered_and_recorded(name, fl_ctx):
    original = _update()
    out = from_shareable(FILTERS[name]().process(_result(), fl_ctx))
    assert out.data_kind == DataKind.WEIGHT_DIFF
    # the step count is data-dependent: partial sharing releases it by default, DP withholds it
    assert out.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == (5 if name == "percentile" else None)
    assert out.get_meta_prop(MetaKey.FILTER_HISTORY)[-1] in ("PercentileSharingFilter", "GaussianPrivacyFilter")
    assert not np.array_equal(out.data["conv.weight"], original["conv.weight"])
    assert out.data["bn.count"] == 0  # non-float buffers are withheld


@pytest.mark.parametrize("name", FILTERS)
@pytest.mark.parametrize(
    "result",
    [
        _result({"w": np.array([1.0, np.nan], np.float32)}),
        _result({"w": np.array([np.inf], np.float32)}),
        _result({}),
        _result({"w": 2.5}),
        _result(kind=DataKind.WEIGHTS),
        _result(kind=DataKind.COLLECTION),
        Shareable(),
    ],
    ids=["nan", "inf", "empty", "scalar", "full-weights", "collection", "not-a-dxo"],
)
def test_unsafe_results_are_blocked(name, result, fl_ctx):
    with pytest.raises(UnsafeUpdateError):
        FILTERS[name]().process(result, fl_ctx)


@pytest.mark.parametrize("name", FILTERS)
def test_error_replies_leave_with_their_return_code_alone(name, fl_ctx):
    empty_error = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    out = FILTERS[name]().process(empty_error, fl_ctx)
    assert dict(out) == {"__headers__": {"__rc__": ReturnCode.EXECUTION_EXCEPTION}}
    leaky = _result()
    leaky.set_return_code(ReturnCode.EXECUTION_EXCEPTION)
    leaky.set_header("secret", np.ones(3))
    out = FILTERS[name]().process(leaky, fl_ctx)
    assert dict(out) == {"__headers__": {"__rc__": ReturnCode.EXECUTION_EXCEPTION}}
    other_payload = make_reply(ReturnCode.EXECUTION_RESULT_ERROR)
    other_payload["weights"] = {"w": np.ones(3)}
    out = FILTERS[name]().process(other_payload, fl_ctx)
    assert dict(out) == {"__headers__": {"__rc__": ReturnCode.EXECUTION_RESULT_ERROR}}


@pytest.mark.parametrize("name", FILTERS)
def test_validation_metrics_pass_a_site_wide_filter(name, fl_ctx):
    metrics = DXO(data_kind=DataKind.METRICS, data={"dice_mean": 0.5}).to_shareable()
    out = from_shareable(FILTERS[name]().process(metrics, fl_ctx))
    assert out.data == {"dice_mean": 0.5}


def test_round_comes_from_the_context_when_the_result_has_no_header(fl_ctx, tmp_path):
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 4, private=True, sticky=False)
    result = DXO(data_kind=DataKind.WEIGHT_DIFF, data=_update()).to_shareable()
    _gaussian().process(result, fl_ctx)
    assert _releases(tmp_path)[0]["round"] == 4


def test_updates_whose_norm_overflows_are_refused_before_the_budget(fl_ctx, tmp_path):
    huge = {"w": np.full(4, 1e300, np.float64)}
    with pytest.raises(UnsafeUpdateError, match="norm overflows"):
        _gaussian().process(_result(huge), fl_ctx)
    assert not (tmp_path / "local" / LEDGER_FILE_NAME).exists()


def test_internal_errors_block_the_result(fl_ctx, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("medflare.filters.gaussian_privacy.gaussian_release", broken)
    with pytest.raises(UnsafeUpdateError, match="internal error, nothing released: boom"):
        _gaussian().process(_result(), fl_ctx)


def test_gaussian_filter_reports_epsilon_and_blocks_when_the_budget_is_spent(fl_ctx, tmp_path):
    budget = epsilon_spent([(2.0, 2)], 1e-5) + 1e-9  # room for two releases
    f = _gaussian(max_epsilon=budget)
    first = from_shareable(f.process(_result(round_number=0), fl_ctx)).get_meta_prop(PRIVACY_META_KEY)
    second = from_shareable(f.process(_result(round_number=1), fl_ctx)).get_meta_prop(PRIVACY_META_KEY)
    assert first["epsilon_round"] == pytest.approx(epsilon_spent([(2.0, 1)], 1e-5))
    assert second["epsilon_round"] == pytest.approx(first["epsilon_round"])
    assert second["epsilon_run"] == pytest.approx(epsilon_spent([(2.0, 2)], 1e-5))
    assert second["epsilon_site"] == pytest.approx(second["epsilon_run"])
    assert second["noise_multiplier"] == 2.0 and second["secure_noise"] is False
    assert "l2_norm" not in json.dumps(second)  # the update's norm stays at the site
    assert [r["round"] for r in _releases(tmp_path)] == [0, 1]

    ledger = tmp_path / "local" / LEDGER_FILE_NAME
    before = ledger.read_text()
    drawn = []
    original_fill = f._noise.fill
    f._noise.fill = lambda out, chunk=1 << 20: drawn.append(out.size) or original_fill(out)
    with pytest.raises(UnsafeUpdateError, match="privacy budget exhausted"):
        f.process(_result(round_number=2), fl_ctx)
    assert drawn == []  # refused before any noise was drawn
    assert ledger.read_text() == before
    # a new filter (a new job, or a restarted client) reads the same ledger and is refused too
    with pytest.raises(UnsafeUpdateError, match="privacy budget exhausted"):
        _gaussian(max_epsilon=budget).process(_result(), fl_ctx)


def test_the_site_cap_wins_over_a_job_filter_that_asks_for_more(fl_ctx, tmp_path):
    # the site allows two releases; a job's filter claiming a budget of 1000 gets two, not more
    write_site_budget(tmp_path / "local", max_epsilon=epsilon_spent([(2.0, 2)], 1e-5) + 1e-9)
    greedy = _gaussian(max_epsilon=1000.0)
    for r in range(2):
        out = from_shareable(greedy.process(_result(round_number=r), fl_ctx)).get_meta_prop(PRIVACY_META_KEY)
        assert out["max_epsilon"] < 1000.0  # the record states the cap that held
    with pytest.raises(UnsafeUpdateError, match="privacy budget exhausted"):
        greedy.process(_result(round_number=2), fl_ctx)
    with pytest.raises(UnsafeUpdateError, match="privacy budget exhausted"):
        _gaussian(max_epsilon=None).process(_result(round_number=2), fl_ctx)
    assert len(_releases(tmp_path)) == 2


def test_a_site_without_a_budget_releases_nothing(fl_ctx, tmp_path):
    (tmp_path / "local" / SITE_BUDGET_FILE_NAME).unlink()
    with pytest.raises(UnsafeUpdateError, match="site has no privacy budget"):
        _gaussian().process(_result(), fl_ctx)
    assert not (tmp_path / "local" / LEDGER_FILE_NAME).exists()


def test_a_job_cannot_loosen_the_sites_delta(fl_ctx):
    with pytest.raises(UnsafeUpdateError, match="above the site's delta"):
        _gaussian(target_delta=1e-3).process(_result(), fl_ctx)


def test_deleting_the_ledger_mid_job_blocks_the_next_release(fl_ctx, tmp_path):
    f = _gaussian()
    f.process(_result(round_number=0), fl_ctx)
    (tmp_path / "local" / LEDGER_FILE_NAME).unlink()
    for r in (1, 2):  # and stays blocked: the budget is not reset by a missing file
        with pytest.raises(UnsafeUpdateError, match="ledger"):
            f.process(_result(round_number=r), fl_ctx)
    assert not (tmp_path / "local" / LEDGER_FILE_NAME).exists()  # nothing was released or recorded


def test_gaussian_filter_solves_the_noise_multiplier_from_a_target(fl_ctx):
    f = GaussianPrivacyFilter(clipping_norm=1.0, max_epsilon=10.0, target_epsilon=10.0, num_rounds=20)
    assert f.noise_multiplier is None and f.num_rounds == 20
    assert epsilon_spent([(f.effective_noise_multiplier, 20)], 1e-5) <= 10.0 * 1.0001
    out = from_shareable(f.process(_result(), fl_ctx)).get_meta_prop(PRIVACY_META_KEY)
    assert out["secure_noise"] is True


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"clipping_norm": 0}, ValueError, r"clipping_norm must be in \(0.0, inf\), got 0.0"),
        ({"clipping_norm": math.nan}, ValueError, "clipping_norm must be a finite real number"),
        ({"clipping_norm": True}, TypeError, "clipping_norm must be a real number .*got True"),
        ({"max_epsilon": -1}, ValueError, r"max_epsilon must be in \(0.0, inf\), got -1.0"),
        ({"max_epsilon": math.inf}, ValueError, "max_epsilon must be a finite"),
        ({"noise_multiplier": 0.0}, ValueError, "noise_multiplier must be in"),
        ({"noise_multiplier": "1"}, TypeError, "noise_multiplier must be a real number"),
        ({"noise_multiplier": None}, ValueError, "give exactly one of noise_multiplier or target_epsilon"),
        ({"target_epsilon": 5.0}, ValueError, "give exactly one of noise_multiplier or target_epsilon"),
        ({"noise_multiplier": None, "target_epsilon": 5.0}, ValueError, "num_rounds is required"),
        ({"noise_multiplier": None, "target_epsilon": -5.0, "num_rounds": 3}, ValueError, "target_epsilon must be in"),
        ({"noise_multiplier": None, "target_epsilon": 5.0, "num_rounds": 0}, ValueError, "num_rounds must be an int in"),
        ({"num_rounds": 2.5}, TypeError, "num_rounds must be an int"),
        ({"target_delta": 0.0}, ValueError, r"target_delta must be in \(0.0, 1.0\), got 0.0"),
        ({"target_delta": 1.5}, ValueError, "target_delta must be in"),
        ({"accountant": "gdp"}, ValueError, r"accountant must be one of \('rdp', 'prv'\), got 'gdp'"),
        ({"noise_seed": -1}, ValueError, "noise_seed must be an int in"),
        ({"passthrough_data_kinds": ["WEIGHTS"]}, ValueError, "passthrough_data_kinds may only name"),
        ({"passthrough_data_kinds": "METRICS"}, TypeError, "passthrough_data_kinds must be a list"),
    ],
)
def test_bad_gaussian_configuration_is_refused_when_built(kwargs, error, message):
    with pytest.raises(error, match=message):
        _gaussian(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"fraction_shared": 0.0}, ValueError, r"fraction_shared must be in \(0.0, 1.0\], got 0.0"),
        ({"fraction_shared": 10}, ValueError, r"fraction_shared must be in \(0.0, 1.0\], got 10.0"),
        ({"fraction_shared": math.nan}, ValueError, "fraction_shared must be a finite"),
        ({"fraction_shared": True}, TypeError, "fraction_shared must be a real number"),
        ({"gamma": 0}, ValueError, r"gamma must be in \(0.0, inf\), got 0.0"),
        ({"gamma": -math.inf}, ValueError, "gamma must be a finite"),
        ({"gamma": [1]}, TypeError, "gamma must be a real number"),
        ({"passthrough_data_kinds": ["WEIGHT_DIFF"]}, ValueError, "passthrough_data_kinds may only name"),
    ],
)
def test_bad_percentile_configuration_is_refused_when_built(kwargs, error, message):
    args = {"fraction_shared": 0.1, "gamma": 0.1, **kwargs}
    with pytest.raises(error, match=message):
        PercentileSharingFilter(**args)


def test_percentile_filter_reports_what_it_shared(fl_ctx):
    out = from_shareable(PercentileSharingFilter(0.25, None).process(_result(), fl_ctx))
    assert out.get_meta_prop(SHARING_META_KEY) == {
        "fraction_shared": 0.25,
        "gamma": None,
        "num_shared": 3,
        "num_total": 12,
        "sparse": False,
    }
    assert np.count_nonzero(out.data["conv.weight"]) == 3


@pytest.mark.parametrize("profile", ["research", "clinical"])
def test_site_profiles_build_every_filter_with_nvflares_builder(profile):
    from tests.unit.test_job_configs import _Builder

    path = os.path.join(os.path.dirname(__file__), "..", "..", "..", "site_configs", profile, "privacy.json")
    with open(path) as f:
        policy = json.load(f)
    assert policy["default_scope"] in [s["name"] for s in policy["scopes"]]
    for scope in policy["scopes"]:
        for component in scope["task_result_filters"] + scope["task_data_filters"]:
            assert _Builder().build_component(dict(component)) is not None


def test_filters_record_in_order_where_they_were_configured(fl_ctx):
    """NVFlare tags site-policy filters ``source = "site"`` and job filters ``"job"``; the record
    travels in the DXO meta, so the server can tell which filters a site's policy added."""
    from nvflare.apis.filter import FilterContextKey, FilterSource

    from medflare.filters.fail_closed_filter import APPLIED_META_KEY

    site_filter = _gaussian()
    site_filter.set_prop(FilterContextKey.SOURCE, FilterSource.SITE)
    job_filter = PercentileSharingFilter(fraction_shared=0.5, gamma=None)
    job_filter.set_prop(FilterContextKey.SOURCE, FilterSource.JOB)
    out = from_shareable(job_filter.process(site_filter.process(_result(), fl_ctx), fl_ctx))
    assert out.get_meta_prop(APPLIED_META_KEY) == [
        {"filter": "GaussianPrivacyFilter", "source": "site"},
        {"filter": "PercentileSharingFilter", "source": "job"},
    ]
    assert out.get_filter_history() == ["GaussianPrivacyFilter", "PercentileSharingFilter"]
    # a filter built outside NVFlare's chains says so rather than guessing
    untagged = from_shareable(PercentileSharingFilter(fraction_shared=0.5, gamma=0.5).process(_result(), fl_ctx))
    assert untagged.get_meta_prop(APPLIED_META_KEY) == [{"filter": "PercentileSharingFilter", "source": "unknown"}]


def test_normalisation_statistics_are_withheld_never_noised(fl_ctx):
    update = {
        "conv.weight": np.full((4, 3), 0.1, np.float32),
        "bn.running_mean": np.full(4, 0.5, np.float32),
        "bn.running_var": np.full(4, 0.01, np.float32),
        "bn.num_batches_tracked": np.array(3, np.int64),
    }
    out = from_shareable(_gaussian(noise_multiplier=50.0).process(_result(update), fl_ctx))
    assert set(out.data) == set(update)
    for key in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert not out.data[key].any(), key  # a zero difference: the global model keeps its statistics
        assert out.data[key].dtype == update[key].dtype
    assert np.abs(out.data["conv.weight"] - 0.1).max() > 1.0  # the learned weights were noised (z=50)


def test_an_update_of_normalisation_statistics_alone_is_refused(fl_ctx):
    with pytest.raises(UnsafeUpdateError, match="no learned floating-point weights"):
        _gaussian().process(_result({"bn.running_var": np.ones(4, np.float32)}), fl_ctx)
