"""Both executors under patient-level DP-SGD, through NVFlare's real task objects."""

from __future__ import annotations

import copy
import csv
import json
import logging
import math

import numpy as np
import pytest

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from medflare.executors.outcome_executor import OutcomeExecutor
from medflare.executors.segmentation_executor import SegmentationExecutor
from medflare.privacy.dp_sgd import dp_sgd_epsilon
from medflare.training.dp_networks import DPIncompatibleNetworkError
from medflare.wire_contract import DP_SGD, DP_SGD_REQUIRED, check_result_meta
from tests.conftest import TINY_SEGRESNET
from tests.unit.executors.test_outcome_executor import CLINICAL, MODES, _model, _ready, outcome_site  # noqa: F401 (fixture)
from tests.unit.executors.flare_objects import weights_task

DP = {"noise_multiplier": 0.8, "max_grad_norm": 2.0, "expected_patients_per_step": 2, "secure_noise": False}
DP_SEGRESNET = {"path": "medflare.training.seeded_networks.SeededDPSegResNet", "args": dict(TINY_SEGRESNET["args"])}


TARGET = {"target_epsilon": 2.0, "max_grad_norm": 1.0, "expected_patients_per_step": 2, "secure_noise": False}


def _task(weights, required=None, rounds=None, round_number=0):
    task = weights_task(weights, round_number)
    if required is not None:
        task.set_header(DP_SGD_REQUIRED, required)
    if rounds is not None:  # what ScatterAndGather puts on every train task
        task.set_header(AppConstants.NUM_ROUNDS, rounds)
    return task


def _train(executor, fl_ctx, weights, required=None, rounds=None, round_number=0):
    reply = executor.execute("train", _task(weights, required, rounds, round_number), fl_ctx, Signal())
    return reply, (from_shareable(reply) if reply.get_return_code() == ReturnCode.OK else None)


def _table_site_of(root, train_patients):
    """A table-only site with ``train_patients`` training rows and 6 test rows."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(train_patients)
    with open(root / "cases.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id", "split", *CLINICAL, "o2_24h"])
        for i in range(train_patients + 6):
            writer.writerow([f"c{i}", "train" if i < train_patients else "test", *rng.normal(size=len(CLINICAL)), i % 2])
    (root / "data_config.json").write_text(json.dumps({"data_root": ".", "datalist": "cases.csv"}))
    return str(root / "data_config.json")


@pytest.fixture()
def table_site(tmp_path, outcome_site, monkeypatch):
    def ready(**kwargs):
        return _ready(tmp_path, outcome_site, monkeypatch, "table-binary", **kwargs)

    return ready


# --- job build --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dp_sgd, error, message",
    [
        ({"noise_multiplier": 1.0}, ValueError, "dp_sgd lacks ['max_grad_norm', 'expected_patients_per_step']"),
        ({**DP, "noise_multiplier": 0}, ValueError, "dp_sgd.noise_multiplier must be in (0.0, inf)"),
        ({**DP, "max_grad_norm": -1.0}, ValueError, "dp_sgd.max_grad_norm"),
        ({**DP, "expected_patients_per_step": 0}, ValueError, "dp_sgd.expected_patients_per_step"),
        ({**DP, "clip": 1.0}, ValueError, "dp_sgd has the unknown field 'clip'"),
        (1.0, TypeError, "dp_sgd must be null or a mapping"),
        ({**DP, "target_epsilon": 1.0}, ValueError, "dp_sgd gives both noise_multiplier 0.8 and target_epsilon 1.0"),
        ({"max_grad_norm": 1.0, "expected_patients_per_step": 2}, ValueError, "dp_sgd lacks the noise: give exactly one"),
        ({"target_epsilon": -1.0, "max_grad_norm": 1.0, "expected_patients_per_step": 2}, ValueError, "dp_sgd.target_epsilon must be in (0.0, inf), got -1.0"),
        ({"target_epsilon": 1.0, "target_delta": 0.0, "max_grad_norm": 1.0, "expected_patients_per_step": 2}, ValueError, "dp_sgd.target_delta must be in (0.0, 1.0)"),
    ],
)
def test_bad_dp_sgd_arguments_are_refused_when_the_job_is_built(dp_sgd, error, message):
    with pytest.raises(error) as raised:
        SegmentationExecutor(model=DP_SEGRESNET, dp_sgd=dp_sgd)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: SegmentationExecutor(model=TINY_SEGRESNET, dp_sgd=DP), "(ResBlock) adds its residual in place"),
        (lambda: OutcomeExecutor(model=_model(["o2_24h"], [], "image"), image_column="image", dp_sgd=DP), "(BatchNorm2d)"),
    ],
)
def test_networks_dp_sgd_cannot_train_are_refused_when_the_job_is_built(build, message):
    with pytest.raises(DPIncompatibleNetworkError) as raised:
        build()
    assert message in str(raised.value) and "use" in str(raised.value)


# --- the outcome executor ---------------------------------------------------------------------


def test_outcome_executor_trains_with_dp_sgd_and_the_record_fits_the_contract(table_site):
    executor, fl_ctx, weights = table_site(dp_sgd=DP, local_steps=5)
    reply, dxo = _train(executor, fl_ctx, weights)
    assert reply.get_return_code() == ReturnCode.OK and dxo.data_kind == DataKind.WEIGHT_DIFF
    record = dxo.get_meta_prop(DP_SGD)
    n = executor._trainer.num_train_cases
    assert record == {
        "mechanism": "dp_sgd",
        "neighbouring_relation": "add/remove one patient",
        "noise_multiplier": 0.8,
        "max_grad_norm": 2.0,
        "sample_rate": 2 / n,
        "steps": 5,
        "secure_noise": False,
    }
    assert check_result_meta(dxo.meta)[DP_SGD] == record


@pytest.mark.parametrize(
    "job, required, expected",
    [
        (DP, {"noise_multiplier": 1.5, "max_grad_norm": 0.5}, (1.5, 0.5)),  # the site raises z and lowers C
        (DP, {"noise_multiplier": 0.1, "max_grad_norm": 9.0}, (0.8, 2.0)),  # a weaker site changes nothing
        (None, {"noise_multiplier": 1.2, "max_grad_norm": 1.0}, (1.2, 1.0)),  # the job asked for none
    ],
)
def test_the_site_requirement_header_is_applied_at_least(table_site, job, required, expected):
    executor, fl_ctx, weights = table_site(dp_sgd=job)
    reply, dxo = _train(executor, fl_ctx, weights, required)
    record = dxo.get_meta_prop(DP_SGD)
    assert (record["noise_multiplier"], record["max_grad_norm"]) == expected
    if job is None:  # the job's batch size is the expected patients per step
        assert record["sample_rate"] == pytest.approx(4 / executor._trainer.num_train_cases)


@pytest.mark.parametrize(
    "header",
    [
        {"noise_multiplier": 1.0},
        {"noise_multiplier": 0.0, "max_grad_norm": 1.0},
        {"noise_multiplier": "high", "max_grad_norm": 1.0},
        {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5},
        "z=1",
    ],
)
def test_a_malformed_requirement_refuses_the_task(table_site, header, caplog):
    executor, fl_ctx, weights = table_site(dp_sgd=DP)
    before = executor._trainer.get_weights()
    reply, _ = _train(executor, fl_ctx, weights, header)
    assert reply.get_return_code() == ReturnCode.BAD_TASK_DATA
    assert from_shareable_or_none(reply) is None
    assert "DP-SGD requirement is malformed" in caplog.text
    after = executor._trainer.get_weights()
    assert all((after[k] == before[k]).all() for k in before)  # nothing trained


def from_shareable_or_none(reply):
    try:
        return from_shareable(reply)
    except Exception:
        return None


def test_without_dp_nothing_changes(table_site):
    executor, fl_ctx, weights = table_site()
    _, dxo = _train(executor, fl_ctx, weights)
    assert DP_SGD not in dxo.meta


def test_site_only_model_is_trained_with_dp_sgd_and_submitted_with_its_cumulative_record(table_site):
    executor, fl_ctx, weights = table_site(dp_sgd=DP, local_steps=3, local_model="site_only")
    _train(executor, fl_ctx, weights)
    _train(executor, fl_ctx, weights, {"noise_multiplier": 1.0, "max_grad_norm": 1.0})
    dxo = from_shareable(executor.execute("submit_model", Shareable(), fl_ctx, Signal()))
    assert dxo.data_kind == DataKind.WEIGHTS
    record = dxo.get_meta_prop(DP_SGD)
    # two rounds of 3 steps; the combined record takes the weaker round's noise (an upper bound)
    assert record["steps"] == 6 and record["noise_multiplier"] == 0.8 and record["max_grad_norm"] == 2.0
    check_result_meta(dxo.meta)


def test_heart_job_logistic_regression_under_dp_sgd(table_site):
    executor, fl_ctx, weights = table_site(
        dp_sgd={**DP, "expected_patients_per_step": 4}, local_steps=20, optimizer="sgd", learning_rate=0.1,
    )
    _, dxo = _train(executor, fl_ctx, weights)
    assert dxo.get_meta_prop(DP_SGD)["steps"] == 20
    assert all(math.isfinite(float(abs(v).sum())) for v in dxo.data.values())


# --- a per-patient target instead of a noise multiplier -----------------------------------------


@pytest.fixture()
def sized_site(tmp_path, monkeypatch):
    """An outcome executor at a table site of N training patients, set up for the run."""

    def ready(train_patients, **kwargs):
        root = tmp_path / f"n{train_patients}"
        return _ready(root, _table_site_of(root / "data", train_patients), monkeypatch, "table-binary", **kwargs)

    return ready


def test_each_site_solves_its_own_z_once_and_spends_the_target_over_the_planned_rounds(sized_site, monkeypatch, caplog):
    import medflare.executors.site_training_executor as module

    solved = []
    real = module.settings_for_target
    monkeypatch.setattr(module, "settings_for_target", lambda *a: solved.append(a) or real(*a))
    caplog.set_level(logging.INFO)
    z = {}
    for patients in (40, 10):
        executor, fl_ctx, weights = sized_site(patients, dp_sgd=TARGET, local_steps=4)
        records = []
        for round_number in range(3):
            reply, dxo = _train(executor, fl_ctx, weights, rounds=3, round_number=round_number)
            assert reply.get_return_code() == ReturnCode.OK
            records.append(check_result_meta(dxo.meta)[DP_SGD])
        plan = executor._target_plan
        assert (plan.rounds, plan.steps_per_round, plan.runs, plan.planned_steps) == (3, 4, 1, 12)
        assert {r["noise_multiplier"] for r in records} == {plan.settings.noise_multiplier}  # fixed for the run
        assert {r["sample_rate"] for r in records} == {2 / patients} and sum(r["steps"] for r in records) == 12
        spent = dp_sgd_epsilon(records[0]["noise_multiplier"], 2 / patients, 12, 1e-5)
        assert 1.99 <= spent <= 2.0, (patients, spent)
        z[patients] = records[0]["noise_multiplier"]
        assert f"12 planned steps (3 rounds x 4 steps) at q={2 / patients:.4g}" in caplog.text
        assert f"noise multiplier z={z[patients]:.4g} for the whole run" in caplog.text
        # a fourth round would spend more than the target: refused, nothing sent
        reply, dxo = _train(executor, fl_ctx, weights, rounds=3, round_number=3)
        assert reply.get_return_code() == ReturnCode.BAD_TASK_DATA and dxo is None
        assert "has trained the 3 rounds its noise multiplier was solved for" in caplog.text
    assert len(solved) == 2  # once per site and run, not once per round
    assert z[10] > z[40]  # the smaller site needs more noise for the same epsilon


def test_the_site_only_model_doubles_the_planned_steps(sized_site):
    executor, fl_ctx, weights = sized_site(20, dp_sgd=TARGET, local_steps=3, local_model="site_only")
    released = []
    for round_number in range(2):
        _, dxo = _train(executor, fl_ctx, weights, rounds=2, round_number=round_number)
        released.append(dxo.get_meta_prop(DP_SGD))
    site_only = from_shareable(executor.execute("submit_model", Shareable(), fl_ctx, Signal())).get_meta_prop(DP_SGD)
    released.append(site_only)
    assert executor._target_plan.planned_steps == 2 * 2 * 3 and site_only["steps"] == 6
    assert len({r["noise_multiplier"] for r in released}) == 1
    # what the site's ledger charges: both rounds and the site-only model's record, within the target
    assert dp_sgd_epsilon(site_only["noise_multiplier"], 2 / 20, sum(r["steps"] for r in released), 1e-5) <= 2.0


@pytest.mark.parametrize("rounds", [None, 0, "15", True, 2.0])
def test_without_the_num_rounds_header_a_target_refuses_the_task(sized_site, rounds, caplog):
    executor, fl_ctx, weights = sized_site(20, dp_sgd=TARGET)
    before = executor._trainer.get_weights()
    task = _task(weights)
    if rounds is not None:
        task.set_header(AppConstants.NUM_ROUNDS, rounds)
    reply = executor.execute("train", task, fl_ctx, Signal())
    assert reply.get_return_code() == ReturnCode.BAD_TASK_DATA and from_shareable_or_none(reply) is None
    assert f"carries no valid 'num_rounds' header (got {rounds!r}" in caplog.text
    after = executor._trainer.get_weights()
    assert all((after[k] == before[k]).all() for k in before) and executor._target_plan is None


def test_a_changed_num_rounds_header_refuses_the_task(sized_site, caplog):
    executor, fl_ctx, weights = sized_site(20, dp_sgd=TARGET)
    assert _train(executor, fl_ctx, weights, rounds=2)[0].get_return_code() == ReturnCode.OK
    reply, _ = _train(executor, fl_ctx, weights, rounds=5, round_number=1)
    assert reply.get_return_code() == ReturnCode.BAD_TASK_DATA
    assert "header is 5, but this site solved its noise multiplier for 2 rounds" in caplog.text


@pytest.mark.parametrize("site_z, site_wins", [(40.0, True), (0.01, False)])
def test_the_site_requirement_still_wins_over_a_target_when_higher(sized_site, site_z, site_wins, caplog):
    caplog.set_level(logging.INFO)
    executor, fl_ctx, weights = sized_site(20, dp_sgd=TARGET)
    _, dxo = _train(executor, fl_ctx, weights, {"noise_multiplier": site_z, "max_grad_norm": 0.5}, rounds=2)
    record = dxo.get_meta_prop(DP_SGD)
    solved = executor._target_plan.settings.noise_multiplier
    assert record["max_grad_norm"] == 0.5  # the site's smaller clipping norm, either way
    assert record["noise_multiplier"] == (site_z if site_wins else solved)
    assert (f"this site requires z >= {site_z:g}: training at that" in caplog.text) == site_wins


# --- the segmentation executor ----------------------------------------------------------------


def test_segmentation_executor_end_to_end_under_dp_sgd(tmp_path, tiny_sites, monkeypatch):
    from nvflare.apis.event_type import EventType

    from medflare.data.site_data_config import ENV_VAR
    from medflare.training.model_spec import build_model
    from tests.unit.executors.flare_objects import install_data, site_context

    monkeypatch.delenv(ENV_VAR, raising=False)
    install_data(tmp_path, tiny_sites["site-1"])
    fl_ctx = site_context(tmp_path)
    executor = SegmentationExecutor(
        model=copy.deepcopy(DP_SEGRESNET), roi_size=[16, 16, 16], val_roi_size=[32, 32, 32], batch_size=2,
        dp_sgd=DP, crops_per_patient=2, max_steps_per_round=2, validate_global_model=False,
    )
    executor.handle_event(EventType.START_RUN, fl_ctx)
    weights = {k: v.numpy() for k, v in build_model(DP_SEGRESNET).state_dict().items()}
    reply, dxo = _train(executor, fl_ctx, weights, {"noise_multiplier": 1.1, "max_grad_norm": 1.0})
    assert reply.get_return_code() == ReturnCode.OK and dxo.data_kind == DataKind.WEIGHT_DIFF
    meta = check_result_meta(dxo.meta)
    assert meta[DP_SGD]["steps"] == 2 and meta[DP_SGD]["noise_multiplier"] == 1.1 and meta[DP_SGD]["max_grad_norm"] == 1.0
    assert set(dxo.data) == set(weights)


def test_segmentation_executor_refuses_a_site_requirement_its_network_cannot_meet(tmp_path, tiny_sites, monkeypatch):
    from nvflare.apis.event_type import EventType

    from medflare.data.site_data_config import ENV_VAR
    from medflare.training.model_spec import build_model
    from tests.unit.executors.flare_objects import install_data, site_context

    monkeypatch.delenv(ENV_VAR, raising=False)
    install_data(tmp_path, tiny_sites["site-1"])
    fl_ctx = site_context(tmp_path)
    executor = SegmentationExecutor(model=TINY_SEGRESNET, roi_size=[16, 16, 16], val_roi_size=[32, 32, 32], validate_global_model=False)
    executor.handle_event(EventType.START_RUN, fl_ctx)
    weights = {k: v.numpy() for k, v in build_model(TINY_SEGRESNET).state_dict().items()}
    reply, _ = _train(executor, fl_ctx, weights, {"noise_multiplier": 1.0, "max_grad_norm": 1.0})
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION  # nothing sent


def test_segmentation_executor_solves_a_target_for_its_capped_rounds(tmp_path, tiny_sites, monkeypatch):
    from nvflare.apis.event_type import EventType

    from medflare.data.site_data_config import ENV_VAR
    from medflare.training.model_spec import build_model
    from tests.unit.executors.flare_objects import install_data, site_context

    monkeypatch.delenv(ENV_VAR, raising=False)
    install_data(tmp_path, tiny_sites["site-1"])
    fl_ctx = site_context(tmp_path)
    executor = SegmentationExecutor(
        model=copy.deepcopy(DP_SEGRESNET), roi_size=[16, 16, 16], val_roi_size=[32, 32, 32], batch_size=2,
        dp_sgd={**TARGET, "target_epsilon": 8.0}, max_steps_per_round=2, validate_global_model=False,
    )
    executor.handle_event(EventType.START_RUN, fl_ctx)
    weights = {k: v.numpy() for k, v in build_model(DP_SEGRESNET).state_dict().items()}
    reply, dxo = _train(executor, fl_ctx, weights, rounds=2)
    assert reply.get_return_code() == ReturnCode.OK
    record, plan = dxo.get_meta_prop(DP_SGD), executor._target_plan
    assert plan.steps_per_round == 2 and plan.planned_steps == 4 and record["steps"] == 2  # ceil(1/q) capped at 2
    assert record["noise_multiplier"] == plan.settings.noise_multiplier
    assert dp_sgd_epsilon(record["noise_multiplier"], record["sample_rate"], 4, 1e-5) <= 8.0
