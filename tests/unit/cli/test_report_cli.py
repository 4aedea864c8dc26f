import json

import pytest

from medflare.cli.main import main

BEST, FINAL = "SRV_best_FL_global_model.pt", "SRV_FL_global_model.pt"
# AUC of each model (row) on site-1, site-2, site-3's test data; the hand computation is in
# tests/unit/reporting/test_cross_site_report.py: own +6.0%, generalizability +47.2% with the best model.
AUC = {
    "site-1": (0.90, 0.60, 0.70),
    "site-2": (0.50, 0.80, 0.60),
    "site-3": (0.70, 0.50, 0.80),
    BEST: (0.92, 0.85, 0.88),
    FINAL: (0.90, 0.80, 0.85),
}


def _simulator_workspace(root):
    """A `medflare run` workspace with the results where the simulator leaves them."""
    results = {
        f"site-{c + 1}": {model: {"auc": row[c], "accuracy": row[c] - 0.1, "num_cases": 10} for model, row in AUC.items()}
        for c in range(3)
    }
    folder = root / "runs" / "cxr_fedavg" / "simulator" / "server" / "simulate_job" / "cross_site_val"
    folder.mkdir(parents=True)
    (folder / "cross_val_results.json").write_text(json.dumps(results))
    return folder


def test_report_prints_the_table_and_writes_next_to_the_results(tmp_path, capsys):
    folder = _simulator_workspace(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"source: {folder / 'cross_val_results.json'}" in out
    assert "| site-1 |     0.900 |      0.920 |                  0.650 |                   0.865 |" in out
    assert "| mean   |     0.833 |      0.883 |                  0.600 |                   0.883 |" in out
    assert "global vs local model, own data: +6.0%" in out
    assert "global vs local model, generalizability: +47.2%" in out
    assert f"metric: auc; global model: {BEST} (best global model)" in out
    for name in ("exam_report.md", "exam_report.json", "exam_report.csv", "cross_site_auc.png"):
        assert (folder / name).is_file()
        assert str(folder / name) in out


def test_report_options_pick_metric_global_model_and_output(tmp_path, capsys):
    _simulator_workspace(tmp_path)
    out_dir = tmp_path / "report"
    argv = ["report", str(tmp_path), "--metric", "accuracy", "--global-model", "final", "--out", str(out_dir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    # accuracy = AUC - 0.1: local own mean 2.2/3, final global 2.25/3 -> +2.3%
    assert "global vs local model, own data: +2.3%" in out
    assert f"metric: accuracy; global model: {FINAL} (final global model)" in out
    written = json.loads((out_dir / "exam_report.json").read_text())
    assert written["metric"] == "accuracy" and written["global_model"] == FINAL
    assert (out_dir / "cross_site_accuracy.png").is_file()


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["--metric", "dice"], "metric 'dice' is in none of the results; metrics available: ['accuracy', 'auc']"),
        (["--global-model", "SRV_other.pt"], "global_model 'SRV_other.pt' is not among the server models evaluated"),
    ],
)
def test_report_bad_choices_exit_2(tmp_path, capsys, argv_tail, message):
    _simulator_workspace(tmp_path)
    assert main(["report", str(tmp_path), *argv_tail]) == 2
    assert message in capsys.readouterr().err


def test_report_on_a_folder_without_results_exits_2_naming_it(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"medflare report: error: no cross_val_results.json under {tmp_path}")
    assert "CrossSiteModelEval" in err
