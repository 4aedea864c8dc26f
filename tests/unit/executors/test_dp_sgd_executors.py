"""Both executors under patient-level DP-SGD, through NVFlare's real task objects."""

from __future__ import annotations

import copy
import math

import pytest

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal

from medflare.executors.outcome_executor import OutcomeExecutor
from medflare.executors.segmentation_executor import SegmentationExecutor
from medflare.training.dp_networks import DPIncompatibleNetworkError
from medflare.wire_contract import DP_SGD, DP_SGD_REQUIRED, check_result_meta
from tests.conftest import TINY_SEGRESNET
from tests.unit.executors.test_outcome_executor import MODES, _model, _ready, outcome_site  # noqa: F401 (fixture)
from tests.unit.executors.flare_objects import weights_task

DP = {"noise_multiplier": 0.8, "max_grad_norm": 2.0, "expected_patients_per_step": 2, "secure_noise": False}
DP_SEGRESNET = {"path": "medflare.training.seeded_networks.SeededDPSegResNet", "args": dict(TINY_SEGRESNET["args"])}


def _task(weights, required=None):
    task = weights_task(weights)
    if required is not None:
        task.set_header(DP_SGD_REQUIRED, required)
    return task


def _train(executor, fl_ctx, weights, required=None):
    reply = executor.execute("train", _task(weights, required), fl_ctx, Signal())
    return reply, (from_shareable(reply) if reply.get_return_code() == ReturnCode.OK else None)


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
