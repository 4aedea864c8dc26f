"""The site's DP-SGD filter through NVFlare's real objects: it tells, checks, charges, or blocks."""

import json

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import FilterKey, FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.workspace import Workspace
from nvflare.app_common.app_constant import AppConstants

from medflare.filters.patient_dp_sgd import PatientDPSGDFilter
from medflare.privacy.budget_ledger import LEDGER_FILE_NAME, PrivacyBudgetLedger
from medflare.privacy.site_budget import SITE_BUDGET_FILE_NAME
from medflare.privacy.update_checks import UnsafeUpdateError
from medflare.wire_contract import DP_SGD, DP_SGD_REQUIRED, check_result_meta


@pytest.fixture()
def local(tmp_path):
    (tmp_path / "startup").mkdir()
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / SITE_BUDGET_FILE_NAME).write_text(json.dumps({"max_epsilon": 8.0, "delta": 1e-5, "accountant": "rdp"}))
    return tmp_path / "local"


def _ctx(local, direction=FilterKey.OUT):
    ctx = FLContext()
    ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, Workspace(str(local.parent), "site-1"), private=True, sticky=True)
    ctx.set_prop(FLContextKey.FILTER_DIRECTION, direction, private=True, sticky=False)
    return ctx


def _record(z=1.1, c=1.0, q=0.05, steps=40):
    return {"mechanism": "dp_sgd", "neighbouring_relation": "add/remove one patient", "noise_multiplier": z,
            "max_grad_norm": c, "sample_rate": q, "steps": steps, "secure_noise": True}


def _result(record=None, data=None, kind=DataKind.WEIGHT_DIFF, round_number=0):
    meta = {} if record is None else {DP_SGD: record}
    data = {"conv.weight": np.full((3, 3), 0.01, np.float32), "gn.weight": np.ones(3, np.float32)} if data is None else data
    result = DXO(data_kind=kind, data=data, meta=meta).to_shareable()
    result.set_header(AppConstants.CURRENT_ROUND, round_number)
    return result


def _filter(**kwargs):
    args = dict(noise_multiplier=1.0, max_grad_norm=1.0)
    args.update(kwargs)
    return PatientDPSGDFilter(**args)


def test_on_the_way_in_it_tells_the_executor_what_the_site_requires(local):
    task = DXO(data_kind=DataKind.WEIGHTS, data={"w": np.zeros(2, np.float32)}).to_shareable()
    task.set_header(DP_SGD_REQUIRED, {"noise_multiplier": 0.01, "max_grad_norm": 100.0})  # a server asking for less
    out = _filter().process(task, _ctx(local, FilterKey.IN))
    assert out.get_header(DP_SGD_REQUIRED) == {"noise_multiplier": 1.0, "max_grad_norm": 1.0}


@pytest.mark.parametrize(
    "site, job, told",
    [
        ((1.0, 1.0), (1.5, 2.0), (1.5, 1.0)),  # the job's copy asks for more noise: kept
        ((1.0, 1.0), (0.5, 0.5), (1.0, 0.5)),  # ... for a smaller norm: kept, the site's z stays
        ((2.0, 0.5), (1.0, 1.0), (2.0, 0.5)),  # a weaker job copy cannot replace the site's
    ],
)
def test_a_second_filter_on_the_way_in_only_tightens_the_first(local, site, job, told):
    task = DXO(data_kind=DataKind.WEIGHTS, data={"w": np.zeros(2, np.float32)}).to_shareable()
    for z, c in (site, job):  # the site's scope runs first, then the job's own filter
        task = _filter(noise_multiplier=z, max_grad_norm=c).process(task, _ctx(local, FilterKey.IN))
    assert task.get_header(DP_SGD_REQUIRED) == {"noise_multiplier": told[0], "max_grad_norm": told[1]}


@pytest.mark.parametrize("header", ["z=0", {"noise_multiplier": -1, "max_grad_norm": 1}, {"noise_multiplier": 0.1}, 7])
def test_a_malformed_requirement_on_the_task_is_replaced_by_the_sites(local, header):
    task = DXO(data_kind=DataKind.WEIGHTS, data={"w": np.zeros(2, np.float32)}).to_shareable()
    task.set_header(DP_SGD_REQUIRED, header)
    out = _filter().process(task, _ctx(local, FilterKey.IN))
    assert out.get_header(DP_SGD_REQUIRED) == {"noise_multiplier": 1.0, "max_grad_norm": 1.0}


def test_a_result_meeting_the_requirement_is_charged_then_released(local):
    f = _filter(noise_multiplier=1.1)
    out = from_shareable(f.process(_result(_record()), _ctx(local)))
    record = out.get_meta_prop(DP_SGD)
    check_result_meta(out.meta)
    reference = RDPAccountant()
    reference.history = [(1.1, 0.05, 40)]
    assert record["epsilon_round"] == pytest.approx(reference.get_epsilon(1e-5))
    assert record["epsilon_site"] == pytest.approx(record["epsilon_round"])
    assert record["max_epsilon"] == 8.0
    (release,) = PrivacyBudgetLedger.read_releases(str(local / LEDGER_FILE_NAME))
    assert (release["mechanism"], release["noise_multiplier"], release["sample_rate"], release["steps"]) == ("dp_sgd", 1.1, 0.05, 40)
    # a second round composes: 80 steps in all
    second = from_shareable(f.process(_result(_record(), round_number=1), _ctx(local))).get_meta_prop(DP_SGD)
    reference.history = [(1.1, 0.05, 80)]
    assert second["epsilon_site"] == pytest.approx(reference.get_epsilon(1e-5))
    assert second["epsilon_run"] == pytest.approx(second["epsilon_site"])


@pytest.mark.parametrize(
    "result, message",
    [
        (_result(None), "no DP-SGD record"),
        (_result(_record(z=0.9)), "noise_multiplier 0.9 is below the site's 1"),
        (_result(_record(c=2.0)), "max_grad_norm 2 is above the site's 1"),
        (_result(_record(q=1.5)), r"sample_rate 1.5 is not in \(0, 1\]"),
        (_result(_record(steps=0)), "steps must be an int >= 1"),
        (_result(_record(c=0.0)), r"max_grad_norm must be a finite number > 0.0"),
        (_result(_record(z=float("nan"))), "noise_multiplier must not be NaN"),
        (_result(_record(z=float("inf"))), "noise_multiplier must be a finite number"),
        (_result(_record(z="2")), "noise_multiplier must be a real number"),
        (_result(_record(q=float("nan"))), "sample_rate must not be NaN"),
        (_result(_record(q=0.0)), r"sample_rate must be a finite number > 0.0"),
        (_result(_record(steps=True)), "steps must be an int >= 1"),
        (_result(_record(steps=1.5)), "steps must be an int >= 1"),
        (_result([1, 2]), "must be a mapping"),
        (_result(dict(_record(), neighbouring_relation="add/remove one site")), "must be one of"),
        (_result(dict(_record(), secure_noise="true")), "secure_noise must be true or false"),
        (_result(_record(steps=10**15)), "privacy budget exhausted"),
        (_result(dict(_record(), epsilon_site=0.0, forged=1)), "undeclared fields"),
        (_result(dict(_record(), mechanism="gaussian")), "must be one of"),
        (_result(dict(_record(), secure_noise=False)), "secure source"),
        (_result({k: v for k, v in _record().items() if k != "secure_noise"}), "secure source"),
        (_result(_record(), data={"w": np.ones(2, np.float32), "bn.running_var": np.ones(2, np.float32)}), "normalisation statistics"),
        (_result(_record(), data={"w": np.array([np.nan], np.float32)}), "NaN"),
        (_result(_record(), kind=DataKind.COLLECTION), "data kind COLLECTION is not released"),
    ],
)
def test_results_that_do_not_meet_the_requirement_are_blocked_before_the_ledger(local, result, message):
    with pytest.raises(UnsafeUpdateError, match=message):
        _filter().process(result, _ctx(local))
    assert not (local / LEDGER_FILE_NAME).exists()


def test_seeded_noise_is_released_only_where_the_site_allows_it(local):
    out = from_shareable(_filter(allow_seeded_noise=True).process(_result(dict(_record(), secure_noise=False)), _ctx(local)))
    assert out.get_meta_prop(DP_SGD)["secure_noise"] is False


def test_the_site_budget_blocks_what_would_exceed_it(local):
    (local / SITE_BUDGET_FILE_NAME).write_text(json.dumps({"max_epsilon": 1.0, "delta": 1e-5, "accountant": "rdp"}))
    with pytest.raises(UnsafeUpdateError, match="privacy budget exhausted"):
        _filter().process(_result(_record(z=1.0, q=0.5, steps=200)), _ctx(local))
    assert PrivacyBudgetLedger.read_releases(str(local / LEDGER_FILE_NAME)) == []


def test_the_site_only_model_is_charged_when_submitted(local):
    out = from_shareable(_filter().process(_result(_record(steps=120), kind=DataKind.WEIGHTS), _ctx(local)))
    assert out.data_kind == DataKind.WEIGHTS
    assert PrivacyBudgetLedger.read_releases(str(local / LEDGER_FILE_NAME))[0]["steps"] == 120


def test_metrics_pass_and_nothing_data_dependent_leaves(local):
    metrics = DXO(data_kind=DataKind.METRICS, data={"auc": 0.7}).to_shareable()
    assert from_shareable(_filter().process(metrics, _ctx(local))).data == {"auc": 0.7}
    result = _result(_record())
    dxo = from_shareable(result)
    dxo.meta.update({"train_loss": 0.3, "num_train_cases": 40})
    dxo.update_shareable(result)
    out = from_shareable(_filter().process(result, _ctx(local)))
    assert "train_loss" not in out.meta and "num_train_cases" not in out.meta


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"noise_multiplier": 0}, ValueError, r"noise_multiplier must be in \(0.0, inf\)"),
        ({"max_grad_norm": -1}, ValueError, "max_grad_norm must be in"),
        ({"max_grad_norm": True}, TypeError, "max_grad_norm must be a real number"),
        ({"target_delta": 1.0}, ValueError, "target_delta must be in"),
        ({"max_epsilon": float("nan")}, ValueError, "max_epsilon must be a finite"),
        ({"accountant": "gdp"}, ValueError, "accountant must be one of"),
        ({"allow_seeded_noise": 1}, TypeError, "allow_seeded_noise must be true or false"),
        ({"release_meta": ["loss"]}, ValueError, "data-dependent keys"),
    ],
)
def test_bad_configuration_is_refused_when_the_job_is_built(kwargs, error, message):
    with pytest.raises(error, match=message):
        _filter(**kwargs)


def test_a_task_that_is_not_a_shareable_is_refused_on_the_way_in(local):
    with pytest.raises(UnsafeUpdateError, match="not a Shareable"):
        _filter().process({"DXO": {}}, _ctx(local, FilterKey.IN))
