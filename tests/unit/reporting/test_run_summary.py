import json

import pytest

from medflare.reporting import run_summary
from medflare.reporting.round_metrics_writer import _nan_to_none, weighted_mean_metrics


def _record(round_number, dice, seconds=10.0):
    return {
        "round": round_number,
        "round_seconds": seconds,
        "sites": {
            "site-1": {"train_loss": 0.9 - 0.1 * round_number, "train_seconds": 4.0, "validate_seconds": 2.0},
            "site-2": {"train_loss": 0.8 - 0.1 * round_number, "train_seconds": 5.0, "validate_seconds": 1.0},
        },
        "global_model_metrics": {"dice_mean": dice, "dice_tc": dice, "dice_wt": dice, "dice_et": dice},
    }


def test_weighted_mean_uses_validation_case_counts():
    out = weighted_mean_metrics(
        {
            "a": {"dice_wt": 0.2, "dice_et": float("nan"), "num_cases": 1},
            "b": {"dice_wt": 0.8, "dice_et": 0.5, "num_cases": 3},
            "c": {},
        }
    )
    assert out["dice_wt"] == pytest.approx((0.2 * 1 + 0.8 * 3) / 4)
    assert out["dice_et"] == pytest.approx(0.5)  # NaN from a site without the region is left out


def test_nan_becomes_null_in_records():
    assert json.dumps(_nan_to_none({"a": [float("nan"), 1.0], "b": {"c": float("inf")}})) == (
        '{"a": [null, 1.0], "b": {"c": null}}'
    )


def test_records_file_skips_a_partly_written_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(_record(0, 0.1)) + "\n" + '{"round": 1, "si')
    assert [r["round"] for r in run_summary.read_round_records(str(path))] == [0]
    assert run_summary.read_round_records(str(tmp_path / "absent.jsonl")) == []


def test_progress_line_and_summary_table():
    line = run_summary.format_round_line(_record(2, 0.4567))
    assert line.startswith("round 2: train loss site-1=0.700 site-2=0.600 | global model Dice mean 0.457")
    evaluation = {"site-1": {"SRV_FL_global_model.pt": {"dice_mean": 0.5, "dice_tc": 0.4, "dice_wt": 0.7, "dice_et": 0.4}}}
    summary = run_summary.format_summary([_record(0, 0.1), _record(1, 0.3)], evaluation, wall_seconds=42)
    rows = [r.split() for r in summary.splitlines()]
    # round 1: mean, TC, WT, ET, round s, slowest site's train s, val s, and the rest as overhead
    assert ["1", "0.300", "0.300", "0.300", "0.300", "10.0", "5.0", "2.0", "3.0"] in rows
    assert ["site-1", "SRV_FL_global_model.pt", "0.500", "0.400", "0.700", "0.400"] in rows
    assert "wall time 42 s" in summary


def test_final_metrics_average_over_sites_by_case_count():
    evaluation = {
        "site-1": {"SRV_FL_global_model.pt": {"dice_mean": 0.2, "dice_tc": float("nan"), "num_cases": 1}},
        "site-2": {"SRV_FL_global_model.pt": {"dice_mean": 0.6, "dice_tc": 0.5, "num_cases": 3}},
        "site-3": {"SRV_best_FL_global_model.pt": {"dice_mean": 0.9}},
    }
    final = run_summary.final_global_metrics(evaluation)
    assert final["dice_mean"] == pytest.approx(0.5) and final["dice_tc"] == pytest.approx(0.5)


def test_plot_is_a_png(tmp_path):
    path = run_summary.plot_metrics_per_round(
        [_record(0, 0.1), _record(1, 0.3)], {}, str(tmp_path / "dice.png"), title="t"
    )
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_outcome_jobs_show_auc_and_accuracy():
    record = {
        "round": 3,
        "round_seconds": 2.0,
        "sites": {"site-1": {"train_loss": 0.5}},
        "global_model_metrics": {"auc": 0.8123, "accuracy": 0.75},
    }
    assert "global model AUC 0.812, accuracy 0.750" in run_summary.format_round_line(record)
    evaluation = {"site-1": {"site-2": {"auc": 0.61, "accuracy": 0.5, "num_cases": 9}}}
    rows = [r.split() for r in run_summary.format_summary([record], evaluation).splitlines()]
    assert ["3", "0.812", "0.750", "2.0", "0.0", "0.0", "2.0"] in rows
    assert ["site-1", "site-2", "0.610", "0.500"] in rows
    assert "Dice" not in run_summary.format_summary([record], evaluation)


def test_weighted_mean_covers_auc_and_accuracy():
    out = weighted_mean_metrics({"a": {"auc": 0.6, "accuracy": 0.5, "num_cases": 1}, "b": {"auc": float("nan"), "accuracy": 0.9, "num_cases": 3}})
    assert out == pytest.approx({"auc": 0.6, "accuracy": (0.5 + 2.7) / 4})


def test_a_round_whose_scores_were_withheld_still_names_the_jobs_metric():
    # under a DP scope the sites send no validation scores: the line says AUC, not Dice, for an outcome job
    record = {"round": 3, "sites": {"site-1": {"train_loss": None}}, "global_model_metrics": {}, "round_seconds": 2.0}
    assert "global model AUC -, accuracy -" in run_summary.format_round_line(record, "outcome")
    assert "global model Dice mean -" in run_summary.format_round_line(record)
