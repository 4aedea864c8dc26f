"""A saved global model is read back into its network, or refused naming the file, and exported."""

from __future__ import annotations

import json
import os

import pytest
import torch

from medflare.export.global_checkpoint import (
    CheckpointError,
    EncryptedCheckpointError,
    export_checkpoint,
    load_global_weights,
)
from medflare.export.global_model_exporter import EXPORTS_FILE, GlobalModelExporter, export_global_models
from medflare.training.outcome_networks import OutcomeNet


def _table_net(seed=0):
    return OutcomeNet(num_outputs=1, clinical_features=3, clinical_hidden=[4], seed=seed)


@pytest.fixture()
def checkpoint(tmp_path):
    trained = _table_net(seed=7)
    path = tmp_path / "FL_global_model.pt"
    torch.save({"model": trained.state_dict(), "train_conf": {"train": {"model": "OutcomeNet"}}}, path)
    return trained, path


def test_the_checkpoint_is_loaded_into_the_network(checkpoint):
    trained, path = checkpoint
    loaded = load_global_weights(str(path), _table_net(seed=0))
    for name, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)


def test_export_writes_the_formats_next_to_the_checkpoint_which_is_left_alone(checkpoint):
    _, path = checkpoint
    before = path.read_bytes()
    report = export_checkpoint(str(path), _table_net(), {"clinical": [1, 3]})
    assert report.passed and report.input_names == ["clinical"] and report.input_shapes == [[1, 3]]
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == [
        "FL_global_model.export.json", "FL_global_model.onnx", "FL_global_model.pt", "FL_global_model.torchscript.pt"]


def test_a_single_input_network_takes_it_by_position_under_its_name(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU())
    torch.save({"model": net.state_dict()}, tmp_path / "m.pt")
    report = export_checkpoint(str(tmp_path / "m.pt"), net, {"image": [1, 2, 8, 8]}, str(tmp_path / "out"))
    assert report.passed and report.input_names == ["image"]
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]


@pytest.mark.parametrize(
    "content, error, message",
    [
        (None, CheckpointError, "no such file"),
        (b"not a checkpoint", CheckpointError, "not a PyTorch checkpoint"),
        ({"model": {}}, CheckpointError, "holds no state dict"),
        ([1, 2], CheckpointError, "holds no state dict"),
        ({"model": {"head.weight": b"ckks", "head.bias": b"ckks"}}, EncryptedCheckpointError, "medflare model decrypt"),
        ({"model": {"head.weight": [1.0]}}, CheckpointError, "not tensors: \\['head.weight'\\]"),
        ({"model": {"head.weight": torch.zeros(1, 4)}}, CheckpointError, "does not fit the network OutcomeNet: missing"),
        ("renamed", CheckpointError, "unexpected \\['extra'\\]"),
        ("reshaped", CheckpointError, "'head.weight' has shape \\[4, 1\\], the network's is \\[1, 4\\]"),
        ("nan", CheckpointError, "'head.bias' holds NaN"),
    ],
    ids=["missing", "junk", "empty", "a-list", "he-ciphertexts", "not-tensors", "other-network", "extra-key",
         "wrong-shape", "nan"],
)
def test_a_checkpoint_that_cannot_be_exported_is_named_and_nothing_is_written(tmp_path, content, error, message):
    path = tmp_path / "FL_global_model.pt"
    state = _table_net().state_dict()
    if content == "renamed":
        content = {"model": {**state, "extra": torch.zeros(1)}}
    elif content == "reshaped":
        content = {"model": {**state, "head.weight": state["head.weight"].reshape(4, 1)}}
    elif content == "nan":
        content = {"model": {**state, "head.bias": torch.tensor([float("nan")])}}
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(error, match=message):
        export_checkpoint(str(path), _table_net(), {"clinical": [1, 3]}, str(tmp_path / "out"))
    assert str(path) in str(pytest.raises(error, load_global_weights, str(path), _table_net()).value)
    assert not (tmp_path / "out").exists()


def test_a_pickled_object_is_not_run(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"model": {"head.weight": Boom()}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint of weights"):
        load_global_weights(str(tmp_path / "evil.pt"), _table_net())
    assert not (tmp_path / "pwned").exists()


def test_the_server_summary_covers_exported_encrypted_and_missing_models(tmp_path, checkpoint):
    _, path = checkpoint
    torch.save({"model": {"head.weight": b"ckks"}}, tmp_path / "best_FL_global_model.pt")
    heard = []
    summary = export_global_models(
        _table_net(), str(tmp_path), ["FL_global_model.pt", "best_FL_global_model.pt", "absent.pt"], {"clinical": [1, 3]},
        log=lambda level, message: heard.append((level, message)),
    )
    assert json.loads((tmp_path / EXPORTS_FILE).read_text()) == summary
    models = summary["models"]
    assert models["FL_global_model.pt"]["status"] == "exported" and models["FL_global_model.pt"]["passed"]
    assert set(models["FL_global_model.pt"]["formats"]) == {"torchscript", "onnx"}
    assert models["best_FL_global_model.pt"]["status"] == "skipped"
    assert "medflare model decrypt" in models["best_FL_global_model.pt"]["reason"]
    assert models["absent.pt"]["status"] == "missing"
    assert [level for level, _ in heard] == ["info", "info", "info"]


def test_a_failing_export_on_the_server_is_recorded_and_logged_as_an_error_not_raised(tmp_path):
    torch.save({"model": {"weight": torch.zeros(2)}}, tmp_path / "FL_global_model.pt")
    heard = []
    summary = export_global_models(torch.nn.Linear(3, 1), str(tmp_path), ["FL_global_model.pt"], {"x": [1, 3]},
                                   log=lambda level, message: heard.append((level, message)))
    entry = summary["models"]["FL_global_model.pt"]
    assert entry["status"] == "failed" and "does not fit the network Linear" in entry["reason"]
    assert heard[0][0] == "error" and "EXPORT FAILED" in heard[0][1]


@pytest.mark.parametrize(
    "args, message",
    [
        ({"inputs": {}}, "inputs must be a non-empty"),
        ({"inputs": {"image": [1, 0, 8]}}, "must be a shape of ints >= 1"),
        ({"inputs": {"image": [True, 4]}}, "must be a shape of ints >= 1"),
        ({"inputs": {"image": [1, 4], "clinical": [2, 3]}}, "same batch size"),
        ({"inputs": {"x-y": [1, 4]}}, "input names must be identifiers"),
        ({"formats": ["gif"]}, "'gif' is not one of"),
        ({"atol": float("nan")}, "atol must be a real"),
        ({"persistor_id": ""}, "persistor_id must be a component id"),
    ],
)
def test_the_server_component_refuses_bad_arguments_at_construction(args, message):
    full = {"inputs": {"clinical": [1, 3]}, **args}
    with pytest.raises(ValueError, match=message):
        GlobalModelExporter(**full)
