"""The benchmarks keep running: a quick pass of each, checking they measure and report."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.integration


def test_privacy_filter_benchmark_quick_run(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "privacy_filters.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "NVFlare PercentilePrivacy" in done.stdout and "Targets" in done.stdout
    assert out.stat().st_size > 0
    json.loads(out.read_text())
