"""The benchmarks keep running: a quick pass of each, checking they measure and report."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.integration


@pytest.mark.parametrize("script, expected", [("privacy_filters.py", "NVFlare PercentilePrivacy"), ("aggregation.py", "NVFlare InTimeAccumulateWeightedAggregator")])
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
    json.loads(out.read_text())
