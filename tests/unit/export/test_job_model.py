"""A job's server network and the sample input its exports are checked on, read from its configs;
every shipped job's server exports its global models on that input."""

from __future__ import annotations

import pytest

from medflare.export.global_model_exporter import GlobalModelExporter, export_summary_lines
from medflare.export.job_model import job_export_inputs, sample_input_shapes, server_model_spec
from medflare.recipes.shipped_jobs import SHIPPED_JOBS

_SEG = "medflare.executors.segmentation_executor.SegmentationExecutor"
_OUT = "medflare.executors.outcome_executor.OutcomeExecutor"


@pytest.mark.parametrize("name", sorted(SHIPPED_JOBS))
def test_every_shipped_server_exports_on_the_input_its_sites_train_on(name):
    definition = SHIPPED_JOBS[name]()
    exporters = [c for c in definition.server["components"] if c["path"].endswith("GlobalModelExporter")]
    assert len(exporters) == 1 and exporters[0]["args"]["persistor_id"] == "persistor"
    _, shapes = job_export_inputs(definition.server, definition.client)
    assert exporters[0]["args"]["inputs"] == shapes
    GlobalModelExporter(**exporters[0]["args"])  # builds as the server would
    expected = {"brats": {"image": [1, 4, 32, 32, 32]}, "cxr": {"image": [1, 1, 64, 64], "clinical": [1, 8]},
                "heart": {"clinical": [1, 13]}}
    assert shapes == expected[name.split("_")[0]]


@pytest.mark.parametrize(
    "executor, model, shapes",
    [
        ({"path": _SEG, "args": {}}, {"args": {"in_channels": 2}}, {"image": [1, 2, 48, 48, 48]}),
        ({"path": _SEG, "args": {"roi_size": [8, 16, 24]}}, {"args": {"in_channels": 4}}, {"image": [1, 4, 8, 16, 24]}),
        ({"path": _OUT, "args": {"image_column": "img"}}, {"args": {"image_network": {"args": {"in_channels": 3}}}},
         {"image": [1, 3, 64, 64]}),
        ({"path": _OUT, "args": {"image_column": "img", "image_size": [32, 16]}}, {"args": {}}, {"image": [1, 1, 32, 16]}),
        ({"path": _OUT, "args": {"clinical_columns": ["a", "b"]}}, {"args": {}}, {"clinical": [1, 2]}),
    ],
)
def test_sample_shapes_follow_the_executor_and_the_network(executor, model, shapes):
    assert sample_input_shapes(executor, model) == shapes


@pytest.mark.parametrize(
    "executor, model, message",
    [
        ({"path": "x.Other", "args": {}}, {"args": {}}, "is not known"),
        ("not a dict", {}, "is not known"),
        ({"path": _SEG, "args": {}}, {"args": {}}, r"must be a shape of ints >= 1, batch first, got \[1, None"),
        ({"path": _SEG, "args": {"roi_size": [16, -1, 16]}}, {"args": {"in_channels": 4}}, "must be a shape of ints"),
        ({"path": _SEG, "args": {"roi_size": [16.0, 16, 16]}}, {"args": {"in_channels": 4}}, "must be a shape of ints"),
        ({"path": _OUT, "args": {}}, {"args": {}}, "must be a non-empty"),
    ],
)
def test_arguments_that_do_not_give_a_shape_are_refused(executor, model, message):
    with pytest.raises(ValueError, match=message):
        sample_input_shapes(executor, model)


_PERSISTOR = "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor"


@pytest.mark.parametrize(
    "server, message",
    [
        ({"components": []}, "must have one .*PTFileModelPersistor, it has 0"),
        ({"components": [{"path": _PERSISTOR, "args": {"model": "{model}"}}]}, "variable '{model}', which it does not define"),
        ({"components": [{"path": _PERSISTOR, "args": {"model": "net"}}]}, "component 'net', which the server config does not have"),
        ({"components": [{"path": _PERSISTOR, "args": {"model": 3}}]}, "must be {'path', 'args'}"),
        ({"model": {"path": "a.B", "args": [1]}, "components": [{"path": _PERSISTOR, "args": {"model": "{model}"}}]},
         "must be {'path', 'args'}"),
        ("not a config", "must have one"),
    ],
)
def test_a_server_whose_network_cannot_be_resolved_is_refused(server, message):
    with pytest.raises(ValueError, match=message):
        server_model_spec(server)


def test_the_run_summary_lines_name_each_file_and_its_figures(tmp_path):
    assert export_summary_lines(str(tmp_path)) == [f"model exports: none ({tmp_path}/model_exports.json: FileNotFoundError)"]
    (tmp_path / "model_exports.json").write_text(
        '{"models": {"FL_global_model.pt": {"status": "exported", "formats": {"onnx": {"file": "/m.onnx", "passed": true,'
        ' "max_abs_error": 1e-06, "max_rel_error": 2e-05}}}, "best_FL_global_model.pt": {"status": "skipped",'
        ' "reason": "encrypted"}}, "notes": []}'
    )
    assert export_summary_lines(str(tmp_path))[1:] == [
        "  FL_global_model.pt onnx: /m.onnx: agrees (max abs error 1e-06, max rel error 2e-05)",
        "  best_FL_global_model.pt: skipped: encrypted",
    ]
    (tmp_path / "model_exports.json").write_text("[1]")
    assert "TypeError" in export_summary_lines(str(tmp_path))[0]
