"""Reading a job folder for an audit: its executor and filters as the FLARE client builds them."""

from __future__ import annotations

import json
import os

import pytest
import torch
from nvflare.apis.fl_constant import FilterKey

from medflare.audit.job_under_audit import load_job
from medflare.audit.scratch_site import AuditError
from medflare.executors.outcome_executor import OutcomeExecutor
from medflare.executors.segmentation_executor import SegmentationExecutor
from medflare.filters.patient_dp_sgd import PatientDPSGDFilter
from tests.unit.audit.audit_sites import JOBS, job_copy

SHIPPED = sorted(d for d in os.listdir(JOBS) if os.path.isfile(os.path.join(JOBS, d, "meta.json")))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_job_reads_with_its_executor_kind_and_planned_rounds(name):
    job = load_job(os.path.join(JOBS, name))
    assert job.kind == ("segmentation" if name.startswith("brats") else "outcome")
    assert isinstance(job.num_rounds, int) and job.num_rounds >= 1
    with open(os.path.join(JOBS, name, "app", "config", "config_fed_server.json")) as f:
        server = json.load(f)
    assert job.num_rounds == server["num_rounds"]


def test_the_executor_is_built_with_nested_components_and_overrides_update_dict_arguments():
    job = load_job(os.path.join(JOBS, "cxr_emr_dpsgd"))
    executor = job.build_executor(batch_size=1, dp_sgd={"expected_patients_per_step": 1})
    assert isinstance(executor, OutcomeExecutor)
    assert isinstance(executor.model, torch.nn.Module)  # NVFlare's builder built the nested model spec
    assert executor.batch_size == 1
    assert executor.dp_sgd["expected_patients_per_step"] == 1 and executor.dp_sgd["noise_multiplier"] == 1.7
    assert job.executor_args["batch_size"] == 8  # the job as read is left alone
    filters = job.build_filters()
    assert [type(f) for f in filters[f"train{FilterKey.DELIMITER}{FilterKey.IN}"]] == [PatientDPSGDFilter]
    assert [type(f) for f in filters[f"train{FilterKey.DELIMITER}{FilterKey.OUT}"]] == [PatientDPSGDFilter]


def test_the_global_model_is_the_seeded_spec_the_server_persistor_builds():
    job = load_job(os.path.join(JOBS, "brats_fedavg"))
    first, second = job.global_weights(), job.global_weights()
    assert first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)
    model = job.network(first)
    assert set(model.state_dict()) == set(first)
    assert isinstance(job.build_executor(), SegmentationExecutor)


def test_a_bad_executor_argument_is_refused_naming_it(tmp_path):
    folder = job_copy(tmp_path, "cxr_emr_fedavg", "bad", learning_rate=7)
    with pytest.raises(AuditError, match="learning_rate must be a number in \\(0, 1\\], got 7"):
        load_job(folder).build_executor()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "not a folder"),
        ("no_meta", "no meta.json"),
        ("bad_client_json", "cannot read the job config"),
        ("no_client_config", "no app with config/config_fed_client.json"),
        ("custom_code", "brings its own code"),
        ("no_train_executor", "no executor answers the 'train' task"),
        ("foreign_executor", "knows the medflare executors, not"),
        ("undefined_variable", "batch_size must be a positive int, got None"),  # NVFlare resolves an unknown variable to null
    ],
)
def test_a_job_that_cannot_be_audited_is_named(tmp_path, damage, message):
    folder = job_copy(tmp_path, "heart_disease_fedavg", "job")
    client = os.path.join(folder, "app", "config", "config_fed_client.json")
    with open(client) as f:
        config = json.load(f)
    if damage == "missing":
        folder = str(tmp_path / "nowhere")
    elif damage == "no_meta":
        os.remove(os.path.join(folder, "meta.json"))
    elif damage == "bad_client_json":
        open(client, "w").write("{")
    elif damage == "no_client_config":
        os.remove(client)
    elif damage == "custom_code":
        os.makedirs(os.path.join(folder, "app", "custom"))
        open(os.path.join(folder, "app", "custom", "evil.py"), "w").write("import os\n")
    elif damage == "no_train_executor":
        config["executors"][0]["tasks"] = ["validate"]
    elif damage == "foreign_executor":
        config["executors"][0]["executor"]["path"] = "nvflare.app_common.executors.model_learner_executor.ModelLearnerExecutor"
    elif damage == "undefined_variable":
        config["executors"][0]["executor"]["args"]["batch_size"] = "{no_such_variable}"
    if damage in ("no_train_executor", "foreign_executor", "undefined_variable"):
        with open(client, "w") as f:
            json.dump(config, f)
    with pytest.raises(AuditError, match=message):
        load_job(folder).build_executor()
