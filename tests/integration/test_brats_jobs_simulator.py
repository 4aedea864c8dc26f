"""The BraTS jobs on the real NVFlare simulator: 2 sites, 2 rounds, small volumes.

The job is copied only to shrink it for CI (rounds, network, crop size) and to start from a
known checkpoint, so the test can tell that the global model written at the end moved away
from the initial one. Everything else (workflow, persistor, aggregator, executor, site data
lookup, final evaluation) is the job as shipped.
"""

import json
import os

import pytest
import torch

from medflare.cli.run_job import RunOptions, run_job
from medflare.training.model_spec import build_model
from tests.integration.job_copies import load_json, save_json, small_job, tensorboard_series

pytestmark = pytest.mark.integration


def _small_job(tmp_path, name="brats_fedavg"):
    job = small_job(name, str(tmp_path))
    server_path = os.path.join(job, "app", "config", "config_fed_server.json")
    server = load_json(server_path)
    spec = server["model"] if "model" in server else {"path": "medflare.training.seeded_networks.SeededSegResNet", "args": server["model_args"]}
    torch.manual_seed(0)
    initial = build_model(spec).state_dict()
    checkpoint = tmp_path / "initial.pt"
    torch.save(initial, checkpoint)
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    persistor["args"]["source_ckpt_file_full_name"] = str(checkpoint)
    save_json(server_path, server)
    return job, initial


# brats_fedyogi differs only in the server's optimizer (unit-tested in tests/unit/aggregators/):
# it runs end to end through POC with every other shipped job (tests/integration/test_poc_federation.py)
@pytest.mark.parametrize("name", ["brats_fedavg"])
def test_fedavg_jobs_run_in_the_simulator(tmp_path, name):
    job, initial = _small_job(tmp_path, name)
    lines = []
    result = run_job(
        RunOptions(job_dir=job, sites=2, rounds=2, workspace=str(tmp_path / "ws"), cases=5, size=32, seed=1),
        log=lines.append,
    )

    # a global model was written and it is not the initial one
    model_path = os.path.join(result["server_run_dir"], "app_server", "FL_global_model.pt")
    assert os.path.isfile(model_path)
    saved = torch.load(model_path, map_location="cpu", weights_only=False)
    state = saved.get("model", saved)
    assert set(state) == set(initial)
    moved = sum(float((torch.as_tensor(state[k]).float() - initial[k].float()).abs().sum()) for k in initial)
    assert moved > 0
    # the server exported the final and best global models at END_RUN, each checked against the network
    app_server = os.path.dirname(model_path)
    with open(os.path.join(app_server, "model_exports.json")) as f:
        exports = json.load(f)["models"]
    for stem in ("FL_global_model", "best_FL_global_model"):
        entry = exports[f"{stem}.pt"]
        assert entry["status"] == "exported" and entry["passed"], entry
        for fmt, suffix in (("torchscript", ".torchscript.pt"), ("onnx", ".onnx")):
            assert entry["formats"][fmt]["passed"] and entry["formats"][fmt]["max_abs_error"] < 1e-4
            assert os.path.isfile(os.path.join(app_server, stem + suffix))
        with open(os.path.join(app_server, f"{stem}.export.json")) as f:
            assert json.load(f)["input_shapes"] == [[1, 4, 32, 32, 32]]
    assert any(line.startswith("  FL_global_model.pt onnx:") and "agrees" in line for line in lines)

    # every round recorded both sites' training and the global model's validation Dice
    records = result["records"]
    assert [r["round"] for r in records] == [0, 1]
    for record in records:
        assert set(record["sites"]) == {"site-1", "site-2"}
        assert sorted(record["aggregation"]["accepted"]) == ["site-1", "site-2"]
        assert record["aggregation"]["rejected"] == {}
        assert all(s["steps"] > 0 and s["train_loss"] > 0 for s in record["sites"].values())
        assert 0.0 <= record["global_model_metrics"]["dice_mean"] <= 1.0
    # the final global models were scored at both sites
    assert set(result["global_eval"]) == {"site-1", "site-2"}
    for models in result["global_eval"].values():
        assert 0.0 <= models["SRV_FL_global_model.pt"]["dice_wt"] <= 1.0
    assert os.path.isfile(result["plot"])
    assert any(line.startswith("round 1:") for line in lines)


def _client_filter(job_dir):
    with open(os.path.join(job_dir, "app", "config", "config_fed_client.json")) as f:
        client = json.load(f)
    return client["task_result_filters"][0]["filters"][0]


def test_gaussian_dp_job_reports_epsilon_per_round(tmp_path):
    from medflare.privacy.accounting import epsilon_spent, noise_multiplier_for
    from medflare.privacy.budget_ledger import PrivacyBudgetLedger

    job, _ = _small_job(tmp_path, "brats_gaussian_dp")
    args = _client_filter(job)["args"]
    z = noise_multiplier_for(args["target_epsilon"], args["target_delta"], args["num_rounds"], args["accountant"])
    options = RunOptions(job_dir=job, sites=2, rounds=2, workspace=str(tmp_path / "ws"), cases=5, size=32, seed=1, tracking="tensorboard")
    result = run_job(options, log=lambda m: None)
    # TensorBoard through NVFlare's receiver holds what the sites released and nothing more:
    # epsilon and the update's size per site; no loss, no scores (withheld under DP)
    series = tensorboard_series(os.path.join(result["server_run_dir"], "tb_events"))
    for site in ("site-1", "site-2"):
        assert set(series[site]) == {"medflare_gaussian_dp/epsilon_run", "medflare_gaussian_dp/epsilon_site", "update_bytes"}, series[site]
        assert [step for step, _ in series[site]["medflare_gaussian_dp/epsilon_run"]] == [0, 1]
    assert series["server"]["accepted_sites"] == [(0, 2.0), (1, 2.0)]
    for record in result["records"]:
        for site, report in record["sites"].items():
            assert report["filter_history"] == ["GaussianPrivacyFilter"], site
            dp = report["privacy"]["medflare_gaussian_dp"]
            assert dp["noise_multiplier"] == pytest.approx(z) and dp["secure_noise"] is True
            releases = record["round"] + 1
            assert dp["epsilon_run"] == pytest.approx(epsilon_spent([(z, releases)], args["target_delta"]))
            assert dp["epsilon_site"] <= args["max_epsilon"]
            # nothing data-dependent leaves under DP: no step counts, losses, timings or scores
            assert report["steps"] is None and report["train_loss"] is None and report["global_model_metrics"] == {}
        # the sites withheld their weights, so the round is an unweighted mean of both
        assert sorted(record["aggregation"]["accepted"]) == ["site-1", "site-2"]
    # each site's ledger recorded both rounds' releases
    for site in ("site-1", "site-2"):
        ledger = os.path.join(result["simulation_dir"], site, "local", "medflare_privacy_ledger.json")
        assert [r["round"] for r in PrivacyBudgetLedger.read_releases(ledger)] == [0, 1]


def _set_sparse(job_dir, sparse):
    path = os.path.join(job_dir, "app", "config", "config_fed_client.json")
    with open(path) as f:
        client = json.load(f)
    client["task_result_filters"][0]["filters"][0]["args"]["sparse_transport"] = sparse
    with open(path, "w") as f:
        json.dump(client, f)


def test_partial_sharing_sends_the_shared_fraction_and_sparse_transport_gives_the_dense_global_model(tmp_path):
    """The shipped partial-sharing job (sent sparse) and the same round sent dense: each site
    shared the fraction asked, proven from what the server received, and the global models agree."""
    models = {}
    for sparse in (True, False):
        job, _ = _small_job(tmp_path / f"sparse_{sparse}", "brats_percentile")
        fraction = _client_filter(job)["args"]["fraction_shared"]
        if not sparse:
            _set_sparse(job, False)
        result = run_job(
            RunOptions(job_dir=job, sites=2, rounds=1, workspace=str(tmp_path / f"ws_{sparse}"), cases=5, size=32, seed=1),
            log=lambda m: None,
        )
        for site, report in result["records"][0]["sites"].items():
            assert report["filter_history"] == ["PercentileSharingFilter"], site
            sharing = report["privacy"]["medflare_percentile_sharing"]
            assert sharing["sparse"] is sparse and sharing["num_shared"] == round(fraction * sharing["num_total"]), site
        saved = torch.load(os.path.join(result["server_run_dir"], "app_server", "FL_global_model.pt"), map_location="cpu", weights_only=False)
        models[sparse] = saved.get("model", saved)
    for key in models[False]:
        torch.testing.assert_close(torch.as_tensor(models[True][key]), torch.as_tensor(models[False][key]), rtol=1e-5, atol=1e-7)
