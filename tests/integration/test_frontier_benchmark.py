"""The privacy-utility frontier benchmark keeps running and measures what it says (a quick pass)."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
pytestmark = pytest.mark.integration

import privacy_utility_frontier as frontier  # noqa: E402


def test_quick_frontier_runs_every_kind_of_row_and_spends_what_it_says(tmp_path):
    out = tmp_path / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "privacy_utility_frontier.py"), "--quick",
         "--out", str(tmp_path / "frontier"), "--json", str(out)],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    runs = {r["row"]: r for r in results["runs"]}
    assert set(runs) == {row.label for row in frontier.rows_of(frontier.QUICK)}
    for run in runs.values():
        assert all(0.0 <= run["dice"][k] <= 1.0 for k in ("tc", "wt", "et", "mean") if math.isfinite(run["dice"][k]))
        assert math.isfinite(run["dice"]["mean"])
    # sharing everything is FedAvg, bit for bit: the sharing path adds nothing of its own
    assert runs["sharing 100%"]["dice"] == runs["FedAvg"]["dice"]
    # each site's patients spend the target, not more, over exactly the steps they took
    dp = runs["DP-SGD, patient eps 8"]
    assert set(dp["patient_epsilon"]) == {"site-1", "site-2", "site-3"}
    assert all(7.9 <= e <= 8.0 + 1e-6 for e in dp["patient_epsilon"].values())
    assert all(s >= 2 for s in dp["steps"].values())
    gaussian = runs["Gaussian DP, site eps 30"]
    assert 29.9 <= gaussian["site_epsilon"] <= 30.0 + 1e-6
    # distributed DP: the same z charged, each of the 3 sites adding z/sqrt(3) of it
    distributed = runs["distributed DP, site eps 30"]
    assert distributed["noise_multiplier"] == gaussian["noise_multiplier"] == gaussian["site_noise_multiplier"]
    assert distributed["site_noise_multiplier"] == pytest.approx(gaussian["noise_multiplier"] / math.sqrt(3))
    assert distributed["site_epsilon"] == gaussian["site_epsilon"] and distributed["sites"] == 3
    # the table, the targets and the two figures
    for text in ("| centralized |", "/ centralized", "target >= 0.98x", "target >= 0.8x", "site eps 30, local vs distributed"):
        assert text in done.stdout
    for png in ("dice_vs_fraction_shared.png", "dice_vs_epsilon.png"):
        assert (tmp_path / "frontier" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dp_sgd_plan_calibrates_each_site_to_its_own_sample_rate():
    config = frontier.QUICK
    plan = frontier.dp_sgd_plan(config, 4.0, {"a": 10, "b": 10, "c": 40})
    from medflare.privacy.dp_sgd import dp_sgd_epsilon

    assert plan["a"] == plan["b"]
    (za, qa, sa), (zc, qc, sc) = plan["a"], plan["c"]
    assert (qa, qc) == (0.2, 0.05) and (sa, sc) == (config.rounds * 5, config.rounds * 20)
    for z, q, steps in (plan["a"], plan["c"]):
        assert 3.95 <= dp_sgd_epsilon(z, q, steps, frontier.DELTA) <= 4.0


def _run(kind, value, seed, mean):
    label = frontier.Row(kind, value).label
    return {"row": label, "kind": kind, "value": value, "seed": seed, "dice": {"tc": mean, "wt": mean, "et": mean, "mean": mean}}


def test_ratios_are_taken_against_the_same_seeds_baseline_and_targets_are_judged_honestly():
    config = frontier.QUICK
    runs = [
        _run("centralized", None, 0, 0.5), _run("centralized", None, 1, 0.8),
        _run("fedavg", None, 0, 0.5), _run("fedavg", None, 1, 0.76),
        _run("sharing", 0.1, 0, 0.45), _run("sharing", 0.1, 1, 0.8),
        _run("dp_sgd", 8.0, 0, 0.1), _run("dp_sgd", 8.0, 1, 0.76),
    ]
    table, ratios = frontier.summarise(config, runs)
    assert ratios["FedAvg"]["central"] == pytest.approx((1.0 + 0.95) / 2)
    assert ratios["sharing 10%"]["central"] == pytest.approx((0.9 + 1.0) / 2)
    assert ratios["DP-SGD, patient eps 8"]["fedavg"] == pytest.approx((0.2 + 1.0) / 2)
    lines = frontier.target_lines(ratios)
    assert "FAIL  FedAvg: 0.975x centralized" in lines[0]
    assert lines[1].startswith("PASS  sharing 10%: 0.950x")
    assert lines[2].startswith("FAIL  DP-SGD, patient eps 8: 0.600x non-private FedAvg")
    assert "| FedAvg | 0.630 ± 0.184 |" in table


def test_rows_can_be_selected_by_kind_and_every_distributed_row_has_its_gaussian_pair():
    for config in (frontier.QUICK, frontier.FULL):
        assert set(config.distributed_epsilons) <= set(config.gaussian_epsilons)
    labels = [row.label for row in frontier.rows_of(frontier.FULL, ("centralized", "distributed"))]
    assert labels == ["centralized", "distributed DP, site eps 8", "distributed DP, site eps 30"]


def test_local_and_distributed_rows_are_compared_seed_by_seed():
    def run(kind, value, seed, mean):
        return _run(kind, value, seed, mean) | {"sites": 4, "noise_multiplier": 2.0, "num_parameters": 100}

    runs = [
        run("centralized", None, 0, 0.5), run("centralized", None, 1, 0.8),
        run("gaussian", 8.0, 0, 0.1), run("gaussian", 8.0, 1, 0.2),
        run("distributed", 8.0, 0, 0.2), run("distributed", 8.0, 1, 0.4),
    ]
    (line,) = frontier.local_vs_distributed_lines(frontier.QUICK, runs)
    assert "local 0.150 ± 0.071 (0.225 ± 0.035x centralized) vs distributed 0.300 ± 0.141 (0.450 ± 0.071x centralized)" in line
    assert "distributed - local 0.150 ± 0.071 over seeds [0, 1]" in line
    # noise norm of the mean: z C sqrt(d / N) = 2 * 1 * 10 / 2 locally, z C sqrt(d) / N = 5 distributed
    assert "~ 10 (local" in line and "vs 5 (distributed" in line


def test_a_rerun_keeps_only_finished_runs_of_the_same_settings(tmp_path):
    row = frontier.Row("sharing", 0.1)
    key = frontier.run_key(frontier.QUICK, row, 0)
    assert key != frontier.run_key(frontier.QUICK, row, 1)
    from dataclasses import replace

    assert key != frontier.run_key(replace(frontier.QUICK, learning_rate=0.01), row, 0)
    assert key == frontier.run_key(replace(frontier.QUICK, seeds=(0, 1, 2)), row, 0)  # the seed list is not a setting
    path = tmp_path / "runs.jsonl"
    path.write_text(
        json.dumps({"key": key, "row": row.label, "dice": {"mean": 0.4}}) + "\n"
        + "[1, 2]\n"  # not a run
        + json.dumps({"row": "no key"}) + "\n"
        + '{"key": "torn'  # an interrupted write
    )
    assert list(frontier.load_finished(str(path))) == [key]
    assert frontier.load_finished(str(tmp_path / "absent.jsonl")) == {}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sites", "0"], "--sites must be >= 2"),
        (["--sites", "1"], "--sites must be >= 2"),
        (["--seeds", "-1"], "--seeds must be distinct ints >= 0"),
        (["--seeds", "3", "3"], "--seeds must be distinct ints >= 0"),
        (["--jobs", "0"], "--jobs must be >= 1"),
    ],
)
def test_bad_arguments_are_refused_before_any_data_or_run(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        frontier.main(["--quick", "--out", str(tmp_path / "out")] + argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
