"""The clinical profile's default scope (patient-level DP-SGD) around the shipped jobs' executors.

The site's policy is read by NVFlare's own configurator from the installed ``privacy.json`` and
applied by NVFlare's own filter code (:func:`nvflare.apis.utils.task_utils.apply_filters`: the
site's scope first, then the job's filters), around the job's executor as its client config
builds it. What a real clinical site does with:

- a non-DP job (``brats_fedavg``: BatchNorm SegResNet): refused before anything is trained,
  with a log line naming the layers and the DP-SGD job to use; nothing leaves, nothing is charged;
- a DP job carrying the same filter itself (``cxr_emr_dpsgd``): trained with at least the site's
  noise, released with its DP-SGD record and charged to the site's ledger once, not twice.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReturnCode
from nvflare.apis.signal import Signal
from nvflare.apis.utils.task_utils import apply_filters
from nvflare.apis.workspace import Workspace
from nvflare.private.fed.app.fl_conf import create_privacy_manager

from medflare.data.site_data_config import ENV_VAR
from medflare.privacy.accounting import epsilon_of_history
from medflare.privacy.budget_ledger import LEDGER_FILE_NAME, PrivacyBudgetLedger
from medflare.privacy.site_budget import SITE_BUDGET_FILE_NAME
from medflare.sites.site_profiles import resolve_profile
from medflare.training.model_spec import build_model
from medflare.wire_contract import DATA_DEPENDENT_META, DP_SGD, DP_SGD_REQUIRED
from tests.integration.job_copies import JOBS_DIR, SMALL_NETWORK, load_json
from tests.unit.executors.flare_objects import install_data, site_context, weights_task

DATA_CHAIN, RESULT_CHAIN = "task_data_filters", "task_result_filters"


def _clinical_site(tmp_path, data_config):
    """A client workspace with the clinical profile's privacy.json and budget, NVFlare's reading
    of it, and the site's data: ``(fl_ctx with the default scope, local folder)``."""
    fl_ctx = site_context(tmp_path)
    local = tmp_path / "site-1" / "local"
    profile = resolve_profile("clinical")
    for name in ("privacy.json", SITE_BUDGET_FILE_NAME):
        shutil.copyfile(os.path.join(profile.folder, name), local / name)
    install_data(tmp_path, data_config)
    manager = create_privacy_manager(Workspace(str(tmp_path / "site-1"), "site-1"), names_only=False)
    scope = manager.get_scope(None)  # a job naming no scope gets the default
    assert scope.name == "dp_sgd"
    fl_ctx.set_prop(FLContextKey.SCOPE_OBJECT, scope, private=True, sticky=False)
    return fl_ctx, local


def _job_executor(job: str, **overrides):
    """The job's executor as its client config builds it (``overrides`` shrink it for a CPU test)."""
    import importlib

    config = load_json(os.path.join(JOBS_DIR, job, "app", "config", "config_fed_client.json"))
    spec = config["executors"][0]["executor"]
    args = json.loads(json.dumps(spec["args"]))
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(args.get(key), dict):
            args[key].update(value)
        else:
            args[key] = value
    module, _, name = spec["path"].rpartition(".")
    executor = getattr(importlib.import_module(module), name)(**args)
    return executor, args, config


def _job_filters(config, chain: str, direction: str) -> dict:
    """The job's own filters of ``chain`` as NVFlare's client config holds them: ``{task#direction: [filter]}``."""
    import importlib

    table = {}
    for entry in config.get(chain, []):
        built = []
        for f in entry["filters"]:
            module, _, name = f["path"].rpartition(".")
            built.append(getattr(importlib.import_module(module), name)(**f.get("args", {})))
        for task in entry["tasks"]:
            table[f"{task}{FilterKey.DELIMITER}{direction}"] = built
    return table


def _round_trip(executor, fl_ctx, weights, config=None):
    """Task data filters in, the executor, task result filters out, as the FLARE client runs them."""
    config = config or {}
    task = apply_filters(DATA_CHAIN, weights_task(weights), fl_ctx, _job_filters(config, DATA_CHAIN, FilterKey.IN), "train", FilterKey.IN)
    reply = executor.execute("train", task, fl_ctx, Signal())
    return task, apply_filters(
        RESULT_CHAIN, reply, fl_ctx, _job_filters(config, RESULT_CHAIN, FilterKey.OUT), "train", FilterKey.OUT
    )


def _releases(local):
    path = local / LEDGER_FILE_NAME
    return PrivacyBudgetLedger.read_releases(str(path)) if path.exists() else []


@pytest.fixture(scope="module")
def cxr_site(tmp_path_factory):
    from medflare.data.cxr_synthetic import generate_cxr_sites

    return generate_cxr_sites(str(tmp_path_factory.mktemp("cxr")), sites=2, cases=16, size=32, seed=2)["site-1"]


NON_DP_JOBS = {
    # job: (executor overrides for a CPU test, what the refusal must name: the layers' problem and fix)
    "brats_fedavg": (
        dict(model={"args": SMALL_NETWORK}, local_epochs=1, roi_size=[16, 16, 16], val_roi_size=[32, 32, 32]),
        ["(ResBlock) adds its residual in place (x += identity)", "(ReLU(inplace=True)) overwrites its input",
         "down_layers.0.1", "use SeededDPSegResNet"],
    ),
    "cxr_emr_fedavg": (
        dict(image_size=[32, 32], local_epochs=1, device="cpu"),
        ["(BatchNorm2d) mixes patients in a batch and keeps running statistics", "image_net.bn1", "use GroupNorm"],
    ),
}


@pytest.mark.parametrize("job", sorted(NON_DP_JOBS))
def test_a_non_dp_job_at_a_clinical_site_is_refused_with_its_network_named_and_nothing_charged(
    job, tmp_path, tiny_sites, cxr_site, monkeypatch, caplog
):
    overrides, named = NON_DP_JOBS[job]
    monkeypatch.delenv(ENV_VAR, raising=False)
    fl_ctx, local = _clinical_site(tmp_path, cxr_site if job.startswith("cxr") else tiny_sites["site-1"])
    executor, args, _ = _job_executor(job, **overrides)
    assert args.get("dp_sgd") is None
    executor.handle_event(EventType.START_RUN, fl_ctx)
    weights = {k: v.numpy() for k, v in build_model(args["model"]).state_dict().items()}
    before = executor._trainer.get_weights()

    task, result = _round_trip(executor, fl_ctx, weights)

    assert task.get_header(DP_SGD_REQUIRED) == {"noise_multiplier": 1.0, "max_grad_norm": 1.0}  # the site told the executor
    assert result.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert set(result) == {"__headers__"} and set(result.get_header("__headers__", {}) or {}) <= {"__rc__"}  # only the code leaves
    after = executor._trainer.get_weights()
    assert all(np.array_equal(after[k], before[k]) for k in before)  # nothing trained
    assert _releases(local) == []  # no epsilon charged
    refusal = [r.getMessage() for r in caplog.records if "requires patient-level DP-SGD" in r.getMessage()]
    assert len(refusal) == 1, caplog.text
    message = refusal[0]
    for part in named + [
        "noise multiplier >= 1", "clipping norm <= 1",
        "nothing trained, nothing sent, no privacy budget spent",
        "jobs/brats_dpsgd", "jobs/cxr_emr_dpsgd",  # the jobs to submit instead
    ]:
        assert part in message, (part, message)
    assert "Traceback" not in caplog.text  # a refusal, not a crash


def test_a_dp_job_carrying_the_filter_is_charged_once_with_at_least_the_sites_noise(tmp_path, cxr_site, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    fl_ctx, local = _clinical_site(tmp_path, cxr_site)
    executor, args, config = _job_executor("cxr_emr_dpsgd", image_size=[32, 32], local_steps=2, device="cpu")
    job_z = args["dp_sgd"]["noise_multiplier"]
    assert job_z > 1.0  # the job asks for more noise than the site requires
    executor.handle_event(EventType.START_RUN, fl_ctx)
    weights = {k: v.numpy() for k, v in build_model(args["model"]).state_dict().items()}

    _, result = _round_trip(executor, fl_ctx, weights, config)

    assert result.get_return_code() == ReturnCode.OK
    dxo = from_shareable(result)
    assert dxo.data_kind == DataKind.WEIGHT_DIFF
    record = dxo.get_meta_prop(DP_SGD)
    assert record["noise_multiplier"] == job_z and record["max_grad_norm"] == 1.0 and record["secure_noise"] is True
    # the site's filter charged it; the job's own copy of the filter checked it and charged nothing
    (release,) = _releases(local)
    assert release["mechanism"] == "dp_sgd" and release["source"] == "PatientDPSGDFilter"
    assert (release["noise_multiplier"], release["sample_rate"], release["steps"]) == (job_z, record["sample_rate"], 2)
    expected = epsilon_of_history([(job_z, record["sample_rate"], 2)], 1e-5, "rdp")
    assert record["epsilon_site"] == pytest.approx(expected) == release["epsilon_after"]
    assert record["max_epsilon"] == 8.0
    assert [f["filter"] for f in dxo.get_meta_prop("medflare_filters_applied")] == ["PatientDPSGDFilter", "PatientDPSGDFilter"]
    assert not set(dxo.meta) & set(DATA_DEPENDENT_META)  # no loss, counts, timings or scores


def test_a_job_filter_behind_the_sites_still_enforces_its_own_stricter_requirement(tmp_path, cxr_site, monkeypatch):
    """The job's filter asks for z >= 3; the executor trained with the job's 1.7 (the job's data
    filter told it 3, but it runs after the site's and the record is what was trained): blocked,
    though the site's filter, which asks for 1.0, has charged it; over-counting, never under."""
    from medflare.filters.patient_dp_sgd import PatientDPSGDFilter
    from medflare.privacy.update_checks import UnsafeUpdateError

    monkeypatch.delenv(ENV_VAR, raising=False)
    fl_ctx, local = _clinical_site(tmp_path, cxr_site)
    executor, args, _ = _job_executor("cxr_emr_dpsgd", image_size=[32, 32], local_steps=1, device="cpu")
    executor.handle_event(EventType.START_RUN, fl_ctx)
    weights = {k: v.numpy() for k, v in build_model(args["model"]).state_dict().items()}
    task = apply_filters(DATA_CHAIN, weights_task(weights), fl_ctx, {}, "train", FilterKey.IN)
    reply = executor.execute("train", task, fl_ctx, Signal())
    stricter = PatientDPSGDFilter(noise_multiplier=3.0, max_grad_norm=1.0)
    with pytest.raises(UnsafeUpdateError, match="noise_multiplier 1.7 is below the site's 3"):
        apply_filters(RESULT_CHAIN, reply, fl_ctx, {f"train{FilterKey.DELIMITER}{FilterKey.OUT}": [stricter]}, "train", FilterKey.OUT)
    assert len(_releases(local)) == 1
