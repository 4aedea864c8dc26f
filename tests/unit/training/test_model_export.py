"""TorchScript and ONNX exports of a network, reloaded and checked against it; an export that
computes something else is refused and never left under a valid name."""

from __future__ import annotations

import hashlib
import json
import math
import re

import numpy as np
import pytest
import torch

from medflare import optional_dependencies
from medflare.optional_dependencies import EXPORT_EXTRA_HINT, MissingDependency
from medflare.training.model_export import export_model, random_inputs, report_path
from medflare.training.model_spec import build_model
from medflare.training.outcome_networks import OutcomeNet

TINY_SEGRESNET = {
    "path": "monai.networks.nets.SegResNet",
    "args": {"spatial_dims": 3, "in_channels": 4, "out_channels": 3, "init_filters": 4,
             "blocks_down": [1, 1, 1], "blocks_up": [1, 1], "norm": ["group", {"num_groups": 4}]},
}
_IMAGE_NETWORK = {"path": "monai.networks.nets.ResNet", "args": {"block": "basic", "layers": [1, 1, 1, 1],
                  "block_inplanes": [4, 8, 8, 8], "spatial_dims": 2, "n_input_channels": 1, "num_classes": 8}}


def _outcome_net():
    return OutcomeNet(num_outputs=2, clinical_features=3, image_network=_IMAGE_NETWORK, image_features=8,
                      clinical_hidden=[4], dropout=0.5, seed=0)


class BatchBranch(torch.nn.Module):
    """Python control flow on the batch size: a trace at batch 1 freezes the ``x`` branch."""

    def forward(self, x):
        if x.shape[0] > 1:
            return x * 2
        return x


class Untraceable(torch.nn.Module):
    def forward(self, x):
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            raise RuntimeError("this network refuses to be traced")
        return x + 1


@pytest.fixture(scope="module")
def segresnet_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("seg")
    model = build_model(TINY_SEGRESNET)
    model.train()
    report = export_model(model, torch.randn(1, 4, 16, 16, 16), str(out), "seg")
    return model, report, out


def test_a_segresnet_exports_to_both_formats_and_the_reloaded_files_agree(segresnet_export):
    model, report, out = segresnet_export
    assert report.passed and [e.format for e in report.exports] == ["torchscript", "onnx"]
    assert model.training, "the caller's mode is restored"
    assert sorted(p.name for p in out.iterdir()) == ["seg.export.json", "seg.onnx", "seg.torchscript.pt"]
    model.eval()
    x = torch.randn(3, 4, 16, 16, 16)  # a third batch size, checked here by hand
    with torch.no_grad():
        want = model(x).numpy()
        got_ts = torch.jit.load(str(out / "seg.torchscript.pt"))(x).numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "seg.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_0"]
    got_onnx = session.run(None, {"input_0": x.numpy()})[0]
    assert want.shape == (3, 3, 16, 16, 16)
    np.testing.assert_allclose(got_ts, want, atol=1e-5)
    np.testing.assert_allclose(got_onnx, want, atol=1e-4, rtol=1e-3)
    model.train()


def test_the_report_names_each_file_its_hash_and_its_agreement(segresnet_export):
    _, report, out = segresnet_export
    saved = json.loads((out / "seg.export.json").read_text())
    assert saved == json.loads(json.dumps(report.to_dict()))
    assert saved["input_shapes"] == [[1, 4, 16, 16, 16]] and saved["check_batch_sizes"] == [1, 2]
    assert saved["tolerance"]["atol"] == 1e-4 and saved["tolerance"]["rtol"] == 1e-3
    assert set(saved["versions"]) == {"torch", "onnx", "onnxruntime"}
    for entry in saved["exports"]:
        assert entry["passed"] and entry["error"] is None
        assert entry["sha256"] == hashlib.sha256(open(entry["file"], "rb").read()).hexdigest()
        assert [c["batch"] for c in entry["checks"]] == [1, 2]
        assert 0 <= entry["max_abs_error"] < 1e-4 and 0 <= entry["max_rel_error"] < 1e-3
    onnx_entry = saved["exports"][1]
    assert onnx_entry["opset"] == 17 and saved["exports"][0]["opset"] is None
    import onnx

    graph = onnx.load(onnx_entry["file"]).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_an_outcome_network_with_image_and_clinical_inputs_exports_by_name(tmp_path):
    net = _outcome_net()
    sample = {"image": torch.randn(1, 1, 16, 16), "clinical": torch.randn(1, 3)}
    report = export_model(net, sample, str(tmp_path), "outcome")
    assert report.passed and report.input_names == ["image", "clinical"]
    assert report.input_shapes == [[1, 1, 16, 16], [1, 3]]
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "outcome.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", "clinical"]
    image, clinical = torch.randn(4, 1, 16, 16), torch.randn(4, 3)
    net.eval()
    with torch.no_grad():
        want = net(image=image, clinical=clinical).numpy()
        got_ts = torch.jit.load(str(tmp_path / "outcome.torchscript.pt"))(image, clinical).numpy()
    got = session.run(None, {"image": image.numpy(), "clinical": clinical.numpy()})[0]
    np.testing.assert_allclose(got_ts, want, atol=1e-6)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_table_only_network_takes_its_one_input_by_name(tmp_path):
    net = OutcomeNet(num_outputs=1, clinical_features=13, clinical_hidden=[], seed=0)
    report = export_model(net, {"clinical": torch.randn(1, 13)}, str(tmp_path), "table", formats=["onnx"])
    assert report.passed and [e.format for e in report.exports] == ["onnx"]
    assert not (tmp_path / "table.torchscript.pt").exists()


def test_an_export_that_disagrees_on_another_batch_size_is_refused_and_left_as_failed(tmp_path):
    (tmp_path / "branch.onnx").write_bytes(b"an earlier export")  # stale: must not survive
    report = export_model(BatchBranch(), torch.randn(1, 3), str(tmp_path), "branch")
    assert not report.passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["branch.export.json", "branch.onnx.failed", "branch.torchscript.pt.failed"]
    second = random_inputs([(1, 3)], 2, seed=0)[0]
    expected = float(second.abs().max())  # eager doubles, the trace does not: |2x - x| = |x|
    for entry in report.exports:
        assert not entry.passed and entry.file.endswith(".failed")
        assert [c["passed"] for c in entry.checks] == [True, False]
        assert entry.max_abs_error == pytest.approx(expected, rel=1e-6)
        assert entry.max_rel_error == pytest.approx(0.5)
        assert f"second input (batch 2): output 0 differs by up to {expected:.3g} absolute" in entry.error
        assert any("Python boolean" in w for w in entry.tracer_warnings)
    saved = json.loads((tmp_path / "branch.export.json").read_text())
    assert saved["passed"] is False and all(e["file"].endswith(".failed") for e in saved["exports"])


def test_a_passing_export_after_a_failed_one_leaves_no_failed_file(tmp_path):
    export_model(BatchBranch(), torch.randn(1, 3), str(tmp_path), "m", formats=["torchscript"])
    assert (tmp_path / "m.torchscript.pt.failed").exists()
    report = export_model(BatchBranch(), torch.randn(2, 3), str(tmp_path), "m", formats=["torchscript"])
    # traced at batch 2, checked at batch 1: the frozen x * 2 branch differs there too
    assert not report.passed
    report = export_model(torch.nn.Identity(), torch.randn(2, 3), str(tmp_path), "m", formats=["torchscript"])
    assert report.passed and report.check_batch_sizes == [2, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.export.json", "m.torchscript.pt"]


def test_an_exporter_that_raises_leaves_no_file_and_says_why(tmp_path):
    report = export_model(Untraceable(), torch.randn(1, 3), str(tmp_path), "u")
    assert not report.passed
    for entry in report.exports:
        assert entry.file is None and entry.sha256 is None
        assert "RuntimeError: this network refuses to be traced" in entry.error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.export.json"]


def test_without_onnx_the_onnx_export_is_refused_with_the_hint_and_torchscript_still_works(tmp_path, monkeypatch):
    real_import = optional_dependencies.importlib.import_module

    def without_onnxruntime(name, *a):
        if name == "onnxruntime":
            raise ImportError(name)
        return real_import(name, *a)

    monkeypatch.setattr(optional_dependencies.importlib, "import_module", without_onnxruntime)
    with pytest.raises(MissingDependency, match=re.escape(f"ONNX export needs onnxruntime, which is not installed: {EXPORT_EXTRA_HINT}")):
        export_model(torch.nn.Identity(), torch.randn(1, 3), str(tmp_path / "out"), "m")
    assert not (tmp_path / "out").exists()
    report = export_model(torch.nn.Identity(), torch.randn(1, 3), str(tmp_path / "out"), "m", formats=("torchscript",))
    assert report.passed and report.versions == {"torch": torch.__version__}


def test_a_network_returning_something_else_than_tensors_is_refused(tmp_path):
    class Dict(torch.nn.Module):
        def forward(self, x):
            return {"y": x}

    with pytest.raises(ValueError, match="must return a tensor or a tuple of tensors"):
        export_model(Dict(), torch.randn(1, 3), str(tmp_path), "d")


_T = torch.zeros(1, 3)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"formats": "onnx"}, "formats must be a non-empty list"),
        ({"formats": []}, "formats must be a non-empty list"),
        ({"formats": None}, "formats must be a non-empty list"),
        ({"formats": ["pdf"]}, "'pdf' is not one of"),
        ({"formats": ["onnx", "onnx"]}, "names a format twice"),
        ({"rtol": math.nan}, r"rtol must be a real in \[0, 1\], got nan"),
        ({"atol": -1e-4}, r"atol must be a real in \[0, 1\], got -0.0001"),
        ({"atol": True}, r"atol must be a real in \[0, 1\], got True"),
        ({"rtol": math.inf}, "rtol must be a real"),
        ({"rtol": "1e-3"}, "rtol must be a real"),
        ({"rtol": 2.0}, "rtol must be a real"),
        ({"rtol": 0, "atol": 0.0}, "both 0"),
        ({"opset": 16}, r"opset must be an int in \[17, 20\], got 16"),
        ({"opset": True}, "opset must be an int"),
        ({"opset": 21}, "opset must be an int"),
        ({"seed": -1}, "seed must be an int >= 0"),
        ({"stem": "../escape"}, "stem must be a file name"),
        ({"stem": "a/b"}, "stem must be a file name"),
        ({"stem": ""}, "stem must be a file name"),
        ({"stem": ".hidden"}, "stem must be a file name"),
        ({"model": "not a module"}, "model must be a torch.nn.Module"),
        ({"sample_inputs": []}, "sample_inputs is empty"),
        ({"sample_inputs": 3}, "sample_inputs must be a tensor"),
        ({"sample_inputs": "x"}, "sample_inputs must be a tensor"),
        ({"sample_inputs": {"1bad": _T}}, "input names must be identifiers"),
        ({"sample_inputs": torch.zeros(1, 3, dtype=torch.int64)}, "must be a floating-point tensor"),
        ({"sample_inputs": torch.tensor(1.0)}, "must be a floating-point tensor with a batch axis"),
        ({"sample_inputs": torch.zeros(0, 3)}, "must be a floating-point tensor with a batch axis"),
        ({"sample_inputs": torch.tensor([[math.nan, 0.0]])}, "NaN or infinite"),
        ({"sample_inputs": [torch.zeros(1, 3), torch.zeros(2, 3)]}, "share one batch size"),
        ({"sample_inputs": [torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.float64)]}, "share one dtype"),
        ({"sample_inputs": [_T], "input_names": ["a", "b"]}, "input_names must be 1 distinct identifiers"),
    ],
)
def test_bad_arguments_are_refused_by_name_and_nothing_is_written(tmp_path, change, message):
    args = {"model": torch.nn.Identity(), "sample_inputs": _T, "out_dir": str(tmp_path / "out"), "stem": "m"}
    args.update(change)
    with pytest.raises(ValueError, match=message):
        export_model(**args)
    assert not (tmp_path / "out").exists()


def test_an_out_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="out_dir must be a folder"):
        export_model(torch.nn.Identity(), _T, str(tmp_path / "file"), "m")
    assert report_path("d", "m") == "d/m.export.json"
