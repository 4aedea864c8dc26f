"""A BraTS job whose model is a MONAI bundle each simulated site installed and allow-listed.

The job is jobs/brats_fedavg, shrunk as the other simulator tests shrink it, with the client's
model replaced by a bundle request (the name only, plus the plain network the server builds)
and the server's persistor starting from the bundle's weights (the server's own copy, a
pretrained start). Each site's registry comes from ``MEDFLARE_BUNDLES`` with ``{site_name}``,
as ``MEDFLARE_DATA_CONFIG`` gives the sites their data.
"""

import copy
import os

import pytest
import torch

from medflare.cli.run_job import RunOptions, run_job
from medflare.training.bundle_registry import ENV_VAR
from tests.integration.job_copies import load_json, save_json, small_job
from tests.unit.training.bundle_fixture import TINY_BUNDLE_SPEC, make_bundle, write_registry

pytestmark = pytest.mark.integration


def _bundle_job(tmp_path, bundle_weights):
    job = small_job("brats_fedavg", str(tmp_path), rounds=2, name="brats_bundle")
    config = os.path.join(job, "app", "config")
    client = load_json(os.path.join(config, "config_fed_client.json"))
    args = client["executors"][0]["executor"]["args"]
    args["model"] = {
        "bundle": "tiny_brats",
        "version": "0.1.0",
        "network_key": "network_def",
        "use_preprocessing": True,
        "load_weights": True,
        "network": copy.deepcopy(TINY_BUNDLE_SPEC),
    }
    save_json(os.path.join(config, "config_fed_client.json"), client)
    server = load_json(os.path.join(config, "config_fed_server.json"))
    server["model"] = copy.deepcopy(TINY_BUNDLE_SPEC)
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    persistor["args"]["source_ckpt_file_full_name"] = bundle_weights
    save_json(os.path.join(config, "config_fed_server.json"), server)
    return job


def test_a_bundle_job_trains_the_sites_bundle_in_the_simulator(tmp_path, monkeypatch):
    registries = tmp_path / "registries"
    for site in ("site-1", "site-2"):  # each site installs its own copy and allows it
        folder = make_bundle(tmp_path / "installed" / site)
        write_registry(registries / f"{site}.json", {"tiny_brats": folder})
    monkeypatch.setenv(ENV_VAR, str(registries / "{site_name}.json"))
    weights = os.path.join(folder, "models", "model.pt")
    initial = torch.load(weights, weights_only=True)

    job = _bundle_job(tmp_path, weights)
    result = run_job(
        RunOptions(job_dir=job, sites=2, workspace=str(tmp_path / "ws"), cases=5, size=32, seed=1), log=lambda m: None
    )

    saved = torch.load(os.path.join(result["server_run_dir"], "app_server", "FL_global_model.pt"), map_location="cpu", weights_only=False)
    state = saved.get("model", saved)
    # the global model is the bundle network's, started from its weights and moved by training
    assert {k: tuple(torch.as_tensor(v).shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in initial.items()}
    moved = sum(float((torch.as_tensor(state[k]).float() - initial[k].float()).abs().sum()) for k in initial)
    assert moved > 0
    records = result["records"]
    assert [r["round"] for r in records] == [0, 1]
    for record in records:
        assert sorted(record["aggregation"]["accepted"]) == ["site-1", "site-2"]
        assert 0.0 <= record["global_model_metrics"]["dice_mean"] <= 1.0
    for models in result["global_eval"].values():
        assert 0.0 <= models["SRV_FL_global_model.pt"]["dice_wt"] <= 1.0
    log = open(os.path.join(result["run_dir"], "simulator.log")).read()
    assert "bundle 'tiny_brats' version 0.1.0" in log and "preprocessing used for validation" in log
    print(
        f"bundle job: {len(records)} rounds in {result['wall_seconds']:.0f} s; global dice_mean per round "
        f"{[round(r['global_model_metrics']['dice_mean'], 4) for r in records]}; final "
        f"{ {s: round(m['SRV_FL_global_model.pt']['dice_mean'], 4) for s, m in result['global_eval'].items()} }"
    )
