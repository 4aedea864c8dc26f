"""The benchmarks keep running: a quick pass of each, checking they measure and report."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "script, expected",
    [
        ("privacy_filters.py", "NVFlare PercentilePrivacy"),
        ("aggregation.py", "NVFlare InTimeAccumulateWeightedAggregator"),
        ("heart_disease.py", "FLamby Fed-Heart-Disease through medflare on NVFlare"),
    ],
)
def test_benchmark_quick_run(tmp_path, script, expected):
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", script), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert expected in done.stdout
    assert out.stat().st_size > 0
    results = json.loads(out.read_text())
    if script == "heart_disease.py":
        # centralised baselines, FedYogi and FedAvg with Gaussian DP were run (plain FedAvg is left
        # to test_outcome_jobs_simulator.py in the quick pass)
        assert {"pooled", "local 0", "local 3", "fedyogi", "fedavg dp eps=10"} <= set(results["methods"])
        assert all(0.0 <= m["mean"] <= 1.0 for m in results["methods"].values())
