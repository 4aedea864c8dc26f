"""``medflare model export``: a job's global model to TorchScript and ONNX, checked, from its job folder."""

from __future__ import annotations

import json
import os

import pytest
import torch

from medflare.cli.main import main
from medflare.cli.model import export_model_file
from medflare.export.job_model import job_export_inputs
from medflare.recipes.job_definition import JobDefinition
from medflare.training.model_spec import build_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
HEART = os.path.join(REPO, "jobs", "heart_disease_fedavg")


def _heart_checkpoint(tmp_path, name="FL_global_model.pt"):
    definition = JobDefinition.from_folder(HEART)
    spec, _ = job_export_inputs(definition.server, definition.client)
    path = tmp_path / name
    torch.save({"model": build_model(spec).state_dict()}, path)
    return path


def test_the_heart_model_exports_and_the_command_prints_the_agreement(tmp_path, capsys):
    path = _heart_checkpoint(tmp_path)
    assert main(["model", "export", str(path), "--job", HEART, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "sample input: clinical [1, 13]; checked at batch sizes [1, 2]" in out
    assert "torchscript: " in out and "onnx: " in out and out.count(": agrees, max abs error") == 2
    report = json.loads((tmp_path / "out" / "FL_global_model.export.json").read_text())
    assert report["passed"] and report["input_names"] == ["clinical"]
    assert sorted(os.listdir(tmp_path / "out")) == ["FL_global_model.export.json", "FL_global_model.onnx",
                                                    "FL_global_model.torchscript.pt"]


def test_formats_choose_what_is_written_next_to_the_model(tmp_path, capsys):
    path = _heart_checkpoint(tmp_path, "best_FL_global_model.pt")
    assert main(["model", "export", str(path), "--job", HEART, "--formats", "torchscript"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["best_FL_global_model.export.json", "best_FL_global_model.pt",
                                            "best_FL_global_model.torchscript.pt"]


def test_the_network_is_the_servers_read_through_its_variables():
    # brats_fedyogi declares its network as the component "model" with the variable model_args
    definition = JobDefinition.from_folder(os.path.join(REPO, "jobs", "brats_fedyogi"))
    spec, shapes = job_export_inputs(definition.server, definition.client)
    assert spec["path"] == "medflare.training.seeded_networks.SeededSegResNet" and spec["args"]["in_channels"] == 4
    assert shapes == {"image": [1, 4, 32, 32, 32]}
    cxr = JobDefinition.from_folder(os.path.join(REPO, "jobs", "cxr_emr_fedavg"))
    assert job_export_inputs(cxr.server, cxr.client)[1] == {"image": [1, 1, 64, 64], "clinical": [1, 8]}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--formats", "onnx,gif"], "'gif' is not one of"),
        (["--formats", ","], "formats must be a non-empty list"),
        (["--atol", "nan"], "atol must be a real"),
        (["--rtol", "-1"], "rtol must be a real"),
    ],
)
def test_bad_options_exit_2_naming_them(tmp_path, capsys, argv, message):
    path = _heart_checkpoint(tmp_path)
    assert main(["model", "export", str(path), "--job", HEART, *argv]) == 2
    assert message in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["FL_global_model.pt"]


def test_an_encrypted_model_is_refused_with_the_decrypt_step(tmp_path, capsys):
    torch.save({"model": {"head.weight": b"ckks", "head.bias": b"ckks"}}, tmp_path / "FL_global_model.pt")
    assert main(["model", "export", str(tmp_path / "FL_global_model.pt"), "--job",
                 os.path.join(REPO, "jobs", "heart_disease_he")]) == 2
    err = capsys.readouterr().err
    assert "is encrypted" in err and "medflare model decrypt" in err
    assert sorted(os.listdir(tmp_path)) == ["FL_global_model.pt"]


@pytest.mark.parametrize(
    "model, job, message",
    [
        ("missing.pt", HEART, "no such file"),
        ("FL_global_model.pt", os.path.join(REPO, "jobs", "cxr_emr_fedavg"), "does not fit the network"),
        ("FL_global_model.pt", "no_such_job", "job file not found"),
    ],
)
def test_a_wrong_model_or_job_is_named_and_nothing_is_written(tmp_path, model, job, message):
    _heart_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=message):
        export_model_file(str(tmp_path / model), str(tmp_path / job) if job == "no_such_job" else job)
    assert sorted(os.listdir(tmp_path)) == ["FL_global_model.pt"]


def test_a_job_without_a_known_executor_is_refused(tmp_path):
    definition = JobDefinition.from_folder(HEART)
    definition.client["executors"][0]["executor"]["path"] = "somewhere.Else"
    job = definition.write(str(tmp_path / "jobs"))
    path = _heart_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="--job .*: the sample input of a model trained by 'somewhere.Else' is not known"):
        export_model_file(str(path), job)


class BranchyLinear(torch.nn.Module):
    """A linear model that doubles its output for batches of more than one: a trace at batch 1
    does not, so its exports must fail the check at batch 2."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(13, 1)

    def forward(self, x):
        y = self.head(x)
        if x.shape[0] > 1:
            y = y * 2
        return y


def test_a_failed_check_exits_1_and_leaves_the_files_as_failed(tmp_path, capsys):
    definition = JobDefinition.from_folder(HEART)
    definition.server.pop("model_args", None)
    definition.server["components"] = [c for c in definition.server["components"] if c["id"] != "model"]
    persistor = next(c for c in definition.server["components"] if c["id"] == "persistor")
    persistor["args"]["model"] = "{model}"
    definition.server["model"] = {"path": f"{__name__}.BranchyLinear", "args": {}}
    job = definition.write(str(tmp_path / "jobs"))
    torch.save({"model": BranchyLinear().state_dict()}, tmp_path / "FL_global_model.pt")
    assert main(["model", "export", str(tmp_path / "FL_global_model.pt"), "--job", job]) == 1
    out = capsys.readouterr().out
    assert out.count("FAILED: ") == 2 and "second input (batch 2): output 0 differs by up to" in out
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "FL_global_model.export.json", "FL_global_model.onnx.failed", "FL_global_model.pt",
        "FL_global_model.torchscript.pt.failed"]
