"""Patient-level DP-SGD on the real NVFlare simulator: the BraTS DP-SGD job, 2 rounds, small data.

The heart-disease and chest X-ray DP-SGD jobs run through POC instead, under the research
profile (``tests/integration/test_poc_federation.py``) and the clinical one
(``test_poc_clinical_jobs.py``, which checks each site's ledger the same way); the simulator
path of the outcome jobs is ``test_outcome_jobs_simulator.py``.

Each job carries ``PatientDPSGDFilter`` itself (the simulator applies no site policy), so what
the server received is the site's enforcement: every result carries a DP-SGD record completed
by the filter (the per-patient epsilon it charged), nothing data-dependent besides the update,
and every simulated site's ledger holds the DP-SGD releases (train rounds, plus the site-only
model that ``submit_model`` returns where the job has one).
"""

from __future__ import annotations

import json
import os

import pytest

from medflare.cli.run_job import RunOptions, run_job
from medflare.wire_contract import DP_SGD
from tests.integration.job_copies import load_json, small_job

pytestmark = pytest.mark.integration

def _executor_args(job_dir):
    return load_json(os.path.join(job_dir, "app", "config", "config_fed_client.json"))["executors"][0]["executor"]["args"]


def _check_dp_sgd_run(result, job_dir, sites, site_only):
    z = _executor_args(job_dir)["dp_sgd"]["noise_multiplier"]
    records = result["records"]
    assert [r["round"] for r in records] == [0, 1]
    for record in records:
        assert sorted(record["aggregation"]["accepted"]) == sites, record["aggregation"]
        assert record["aggregation"]["weighting"].startswith("equal"), record["aggregation"]
        for site in sites:
            seen = record["sites"][site]
            dp = seen["privacy"][DP_SGD]
            assert dp["noise_multiplier"] == pytest.approx(z) and dp["steps"] >= 1, (site, dp)
            assert 0.0 < dp["epsilon_round"] <= dp["epsilon_site"] <= dp["max_epsilon"] <= 10.0, (site, dp)
            # DP scopes release nothing data-dependent besides the update
            assert seen["steps"] is None and seen["train_loss"] is None and seen["global_model_metrics"] == {}, site
            assert {"filter": "PatientDPSGDFilter", "source": "job"} in seen["filters_applied"], site
    for site in sites:
        with open(os.path.join(result["simulation_dir"], site, "local", "medflare_privacy_ledger.json")) as f:
            releases = [r for r in json.load(f)["records"] if r.get("event") == "release"]
        assert all(r["mechanism"] == "dp_sgd" and r["noise_multiplier"] == pytest.approx(z) for r in releases), site
        # one release per round, and the site-only model's cumulative record at submit_model
        assert len(releases) == 2 + (1 if site_only else 0), (site, releases)
        if site_only:
            assert releases[-1]["steps"] == releases[0]["steps"] + releases[1]["steps"], site


def test_brats_dpsgd_job_on_small_generated_sites(tmp_path):
    job = small_job("brats_dpsgd", str(tmp_path))
    result = run_job(
        RunOptions(job_dir=job, sites=2, rounds=2, workspace=str(tmp_path / "ws"), cases=5, size=32, seed=1),
        log=lambda m: None,
    )
    _check_dp_sgd_run(result, job, ["site-1", "site-2"], site_only=False)
