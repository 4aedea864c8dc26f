"""The outcome jobs on the real NVFlare simulator, with NVFlare's cross-site model evaluation.

Heart disease runs on the four real hospitals as shipped, only with fewer rounds; the chest
X-ray + clinical job on small generated sites. What is checked is what a user reads afterwards:
the per-round records, the cross-site matrix (every site's own model and the server's models
scored on every site's test data) and EXAM's measures computed from it.
"""

import json
import math
import os

import pytest

from medflare.cli.run_job import RunOptions, run_job
from tests.integration.job_copies import small_job, tensorboard_series

pytestmark = pytest.mark.integration

HOSPITALS = ["site-1", "site-2", "site-3", "site-4"]
SERVER_MODELS = {"SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt"}


def _check_cross_site(result, sites, metrics=("auc", "accuracy")):
    matrix = result["global_eval"]
    assert sorted(matrix) == sites
    for data_site in sites:
        # each site's own (site-only) model and both server models, scored on this site's test data
        assert set(matrix[data_site]) == set(sites) | SERVER_MODELS, data_site
        for model, scores in matrix[data_site].items():
            for metric in metrics:
                assert 0.0 <= scores[metric] <= 1.0 or math.isnan(scores[metric]), (data_site, model, metric)
    return matrix


def _check_exam_report(result, matrix, sites):
    with open(os.path.join(result["run_dir"], "exam_report.json")) as f:
        report = json.load(f)
    assert report["metric"] == "auc" and report["global_model"] == "SRV_best_FL_global_model.pt"
    rows = {row["site"]: row for row in report["per_site"]}
    for site in sites:
        # the report's numbers are the matrix's cells and their means over the other sites
        assert rows[site]["local_own"] == pytest.approx(matrix[site][site]["auc"])
        assert rows[site]["global_own"] == pytest.approx(matrix[site]["SRV_best_FL_global_model.pt"]["auc"])
        others = [matrix[j][site]["auc"] for j in sites if j != site]
        assert rows[site]["local_generalizability"] == pytest.approx(sum(others) / len(others))
    assert os.path.getsize(os.path.join(result["run_dir"], "cross_site_auc.png")) > 1000


def test_heart_disease_job_runs_on_the_four_hospitals_with_cross_site_evaluation(tmp_path):
    # the FedYogi variant (server-side adaptive optimisation over the same executor); plain FedAvg
    # runs in the POC federation (test_poc_federation.py), DP-SGD in the benchmark's quick pass
    job = small_job("heart_disease_fedyogi", str(tmp_path), rounds=2)
    result = run_job(RunOptions(job_dir=job, workspace=str(tmp_path / "ws"), tracking="tensorboard"), log=lambda m: None)
    # no site filter in the simulator: each site's loss and scores were released, so TensorBoard has them
    series = tensorboard_series(os.path.join(result["server_run_dir"], "tb_events"))
    for site in HOSPITALS:
        assert {"train_loss", "validation/auc", "validation/accuracy", "update_bytes"} <= set(series[site]), series[site]
        assert [step for step, _ in series[site]["train_loss"]] == [0, 1]
    assert [step for step, _ in series["server"]["global/auc"]] == [0, 1]

    records = result["records"]
    assert [r["round"] for r in records] == [0, 1]
    for record in records:
        assert sorted(record["aggregation"]["accepted"]) == HOSPITALS
        for site, seen in record["sites"].items():
            assert seen["steps"] == 100, site  # FLamby's 100 local updates per round
            assert {"auc", "accuracy", "num_cases"} <= set(seen["global_model_metrics"]), site
    matrix = _check_cross_site(result, HOSPITALS)
    # the test sets are FLamby's: 104, 89, 16 and 45 patients
    assert [matrix[s]["site-1"]["num_cases"] for s in HOSPITALS] == [104, 89, 16, 45]
    # a site-only model is not the global one: trained on one hospital, it scores differently somewhere
    assert any(
        matrix[d][s]["auc"] != pytest.approx(matrix[d]["SRV_FL_global_model.pt"]["auc"], abs=1e-9)
        for d in HOSPITALS for s in HOSPITALS
    )
    _check_exam_report(result, matrix, HOSPITALS)


def test_chest_xray_and_clinical_job_runs_with_cross_site_evaluation(tmp_path):
    job = small_job("cxr_emr_fedavg", str(tmp_path), rounds=2, local_steps=3)  # the simulator path; POC runs the job too
    lines = []
    # fewer simulator threads than sites: NVFlare rebuilds each client when its turn comes, and
    # the site-only models (EXAM's single-site models) must survive that (executor state on disk)
    options = RunOptions(job_dir=job, sites=3, threads=2, workspace=str(tmp_path / "ws"), cases=12, size=32)
    result = run_job(options, log=lines.append)
    sites = ["site-1", "site-2", "site-3"]

    records = result["records"]
    assert [r["round"] for r in records] == [0, 1]
    for record in records:
        assert sorted(record["aggregation"]["accepted"]) == sites, record["aggregation"]
        for site, seen in record["sites"].items():
            # multi-label: AUC and accuracy per label and their means
            assert {"auc", "auc_o2_24h", "auc_o2_72h", "accuracy_o2_24h"} <= set(seen["global_model_metrics"]), site
    # the global model moved: the round-1 model is not scored like the round-0 one
    assert records[0]["global_model_metrics"] != records[1]["global_model_metrics"]
    matrix = _check_cross_site(result, sites, metrics=("auc", "auc_o2_24h", "auc_o2_72h", "accuracy"))
    _check_exam_report(result, matrix, sites)
    # site-3 stores DICOM: it trained and was scored like the PNG sites
    assert matrix["site-3"]["site-3"]["num_cases"] > 0
    assert any(line.startswith("# EXAM measures") for line in lines)
    with open(os.path.join(tmp_path, "ws", "runs", "cxr_emr_fedavg", "simulator.log")) as f:
        assert "resumed this job's executor state" in f.read()  # the rebuild happened, and was survived
    # the server exported the two-input (image, clinical) global models at END_RUN, each checked
    app_server = os.path.join(result["server_run_dir"], "app_server")
    with open(os.path.join(app_server, "model_exports.json")) as f:
        exports = json.load(f)["models"]
    for stem in ("FL_global_model", "best_FL_global_model"):
        assert exports[f"{stem}.pt"]["status"] == "exported", exports[f"{stem}.pt"]
        assert all(os.path.isfile(os.path.join(app_server, stem + suffix)) for suffix in (".torchscript.pt", ".onnx"))
        with open(os.path.join(app_server, f"{stem}.export.json")) as f:
            report = json.load(f)
        assert report["passed"] and report["input_names"] == ["image", "clinical"]
        assert report["input_shapes"] == [[1, 1, 64, 64], [1, 8]]
