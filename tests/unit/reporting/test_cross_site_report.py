import copy
import csv
import json
import math
import re

import pytest
from PIL import Image

from medflare.reporting.cross_site_report import (
    BEST_GLOBAL_MODEL,
    FINAL_GLOBAL_MODEL,
    ReportError,
    exam_measures,
    find_cross_site_results,
    format_report,
    load_cross_site_results,
    write_report,
)

BEST, FINAL = BEST_GLOBAL_MODEL, FINAL_GLOBAL_MODEL
# AUC of each model (row) on each site's test data (columns site-1, site-2, site-3).
AUC = {
    "site-1": (0.90, 0.60, 0.70),
    "site-2": (0.50, 0.80, 0.60),
    "site-3": (0.70, 0.50, 0.80),
    BEST: (0.92, 0.85, 0.88),
    FINAL: (0.90, 0.80, 0.85),
}
SITES = ("site-1", "site-2", "site-3")


def _results():
    """NVFlare's layout {data_client: {model_owner: metrics}}, accuracy = AUC - 0.1, 10 cases per site."""
    return {
        site: {model: {"auc": row[c], "accuracy": row[c] - 0.1, "num_cases": 10} for model, row in AUC.items()}
        for c, site in enumerate(SITES)
    }


def _write(path, results):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))  # json writes NaN as NaN, as ValidationJsonGenerator does
    return path


def _table_rows(report):
    return [[c.strip() for c in line.strip("|").split("|")] for line in report.splitlines() if line.startswith("|")]


def test_three_sites_by_hand_with_the_best_global_model_by_default():
    m = exam_measures(_results())
    # site-1: own 0.90 vs 0.92; generalizability L: (0.60+0.70)/2 = 0.65, G on the same sites: (0.85+0.88)/2 = 0.865
    # site-2: own 0.80 vs 0.85; L: (0.50+0.60)/2 = 0.55, G: (0.92+0.88)/2 = 0.90
    # site-3: own 0.80 vs 0.88; L: (0.70+0.50)/2 = 0.60, G: (0.92+0.85)/2 = 0.885
    expected = {
        "site-1": (0.90, 0.92, 0.65, 0.865),
        "site-2": (0.80, 0.85, 0.55, 0.90),
        "site-3": (0.80, 0.88, 0.60, 0.885),
    }
    assert m.global_model == BEST and m.metric == "auc" and m.sites == SITES
    for s in m.per_site:
        got = (s.local_own, s.global_own, s.local_generalizability, s.global_generalizability)
        assert got == pytest.approx(expected[s.site])
    # means: local own 2.5/3, global own 2.65/3, local gen 1.8/3 = 0.6, global gen 2.65/3 (= global own:
    # every D_j enters two of the three inner means with weight 1/2)
    means = m.means
    assert means.local_own == pytest.approx(2.5 / 3)
    assert means.global_own == pytest.approx(2.65 / 3)
    assert means.local_generalizability == pytest.approx(0.6)
    assert means.global_generalizability == pytest.approx(2.65 / 3)
    # (2.65/3 - 2.5/3) / (2.5/3) = 0.15/2.5 = +6%;  (2.65/3 - 0.6) / 0.6 = 0.28333/0.6 = +47.22%
    assert m.own_improvement_percent == pytest.approx(6.0)
    assert m.generalizability_improvement_percent == pytest.approx(47.2222222)
    assert m.notes == ()
    assert m.models == ("site-1", "site-2", "site-3", BEST, FINAL)
    assert m.matrix.shape == (5, 3) and m.matrix[3].tolist() == pytest.approx([0.92, 0.85, 0.88])


@pytest.mark.parametrize("choice", ["final", FINAL, "FL_global_model.pt"])
def test_final_global_model_by_short_name_or_key(choice):
    m = exam_measures(_results(), global_model=choice)
    assert m.global_model == FINAL
    # own: global (0.90+0.80+0.85)/3 = 2.55/3 vs local 2.5/3 -> +2%
    assert m.own_improvement_percent == pytest.approx(2.0)
    # site-1 generalizability of G: (0.80+0.85)/2
    assert m.per_site[0].global_generalizability == pytest.approx(0.825)


def test_final_model_is_the_default_without_a_best_one_and_other_metrics_work():
    results = _results()
    for by_model in results.values():
        del by_model[BEST]
    m = exam_measures(results, metric="accuracy")
    assert m.global_model == FINAL
    # local own accuracy (0.8+0.7+0.7)/3 = 2.2/3, final global (0.8+0.7+0.75)/3 = 2.25/3 -> 0.05/2.2 = +2.2727%
    assert m.own_improvement_percent == pytest.approx(100 * 0.05 / 2.2)


def test_nan_and_missing_cells_are_left_out_in_pairs_and_named():
    results = _results()
    results["site-3"]["site-1"]["auc"] = float("nan")  # site-1's model on a one-class test set at site-3
    del results["site-3"]["site-3"]  # site-3's own evaluation of its local model never came back
    m = exam_measures(results)
    s1, s2, s3 = m.per_site
    # site-1: generalizability only over site-2 (its value at site-3 is NaN): L 0.60, G 0.85
    assert (s1.local_generalizability, s1.global_generalizability) == pytest.approx((0.60, 0.85))
    assert (s2.local_own, s2.global_own, s2.local_generalizability) == pytest.approx((0.80, 0.85, 0.55))
    # site-3: no local own value; generalizability unaffected: L 0.60, G 0.885
    assert math.isnan(s3.local_own) and s3.global_own == pytest.approx(0.88)
    assert (s3.local_generalizability, s3.global_generalizability) == pytest.approx((0.60, 0.885))
    # own means over site-1 and site-2 only: L (0.9+0.8)/2 = 0.85, G (0.92+0.85)/2 = 0.885 -> 0.035/0.85 = +4.1176%
    assert m.own_sites_in_mean == ("site-1", "site-2")
    assert (m.means.local_own, m.means.global_own) == pytest.approx((0.85, 0.885))
    assert m.own_improvement_percent == pytest.approx(100 * 0.035 / 0.85)
    # generalizability over all three: L 1.75/3, G 2.635/3 -> 0.885/1.75 = +50.571%
    assert m.means.local_generalizability == pytest.approx(1.75 / 3)
    assert m.means.global_generalizability == pytest.approx(2.635 / 3)
    assert m.generalizability_improvement_percent == pytest.approx(100 * 0.885 / 1.75)
    notes = "\n".join(m.notes)
    assert "no auc for: site-3's local model on site-3" in notes
    assert "NaN or infinite (e.g. a test set with one class) for: site-1's local model on site-3" in notes
    assert "site-1: generalizability over site-2; left out site-3" in notes
    assert "means of the own-data measures over 2 of 3 sites; left out site-3" in notes
    report = format_report(m)
    assert ["site-3", "n/a", "0.880", "0.600", "0.885"] in _table_rows(report)
    assert "- no auc for: site-3's local model on site-3" in report


def test_a_site_without_a_local_model_is_shown_as_such():
    results = _results()
    results["site-4"] = {BEST: {"auc": 0.75}, FINAL: {"auc": 0.70}}  # evaluated the server models only
    m = exam_measures(results)
    assert m.sites == ("site-1", "site-2", "site-3", "site-4") and "site-4" not in m.models
    s4 = m.per_site[3]
    assert math.isnan(s4.local_own) and s4.global_own == pytest.approx(0.75)
    assert math.isnan(s4.local_generalizability) and math.isnan(s4.global_generalizability)
    # the other sites' local models were not evaluated on site-4: pairs drop it, means stay over 3 sites
    assert m.per_site[0].local_generalizability == pytest.approx(0.65)
    assert m.own_improvement_percent == pytest.approx(6.0)
    notes = "\n".join(m.notes)
    assert "site-4 has no local model in the results (never a model owner)" in notes
    assert "no auc for: site-1's local model on site-4" in notes


def test_a_local_model_nobody_could_test_on_its_own_site():
    results = _results()
    results["site-1"]["site-9"] = {"auc": 0.66}
    m = exam_measures(results)
    assert "site-9" in m.sites and "site-9" in m.models
    assert "site-9 has no results on its test data (never a data client)" in "\n".join(m.notes)
    assert m.per_site[-1].local_generalizability == pytest.approx(0.66)  # its model was scored at site-1
    assert m.per_site[-1].global_generalizability == pytest.approx(0.92)


def test_sites_sort_naturally():
    results = {f"site-{k}": {f"site-{k}": {"auc": 0.7}, BEST: {"auc": 0.8}} for k in (10, 2, 1)}
    assert exam_measures(results).sites == ("site-1", "site-2", "site-10")


@pytest.mark.parametrize(
    "metric, message",
    [
        ("AUC", r"metric 'AUC' is in none of the results \(did you mean 'auc'\?\); metrics available: \['accuracy', 'auc'\]"),
        ("dice", r"metric 'dice' is in none of the results; metrics available: \['accuracy', 'auc'\]"),
        ("num_cases", "metric 'num_cases' counts cases, it is no metric"),
        ("", "metric must be a metric name"),
    ],
)
def test_bad_metric_names_the_available_ones(metric, message):
    with pytest.raises(ReportError, match=message):
        exam_measures(_results(), metric=metric)


@pytest.mark.parametrize(
    "change, global_model, message",
    [
        (None, "best_model", r"global_model 'best_model' is not among the server models evaluated: \['SRV_best"),
        (None, "", "global_model must be 'best', 'final' or a server model key"),
        ("no_server", None, r"no server \(global\) model in the results; model owners are \['site-1'"),
        ("no_best", "best", "global_model 'best' is not among the server models evaluated"),
    ],
)
def test_bad_global_model_choice(change, global_model, message):
    results = _results()
    for by_model in results.values():
        if change == "no_server":
            del by_model[BEST], by_model[FINAL]
        if change == "no_best":
            del by_model[BEST]
    with pytest.raises(ReportError, match=message):
        exam_measures(results, global_model=global_model)


@pytest.mark.parametrize(
    "results, message",
    [
        ({}, "expected a non-empty {data_client"),
        ([1], "expected a non-empty {data_client"),
        ({"site-1": [0.9]}, "results of data client 'site-1' are \\[0.9\\], not a mapping"),
        ({"site-1": {"site-1": 0.9}}, "model 'site-1' on data client 'site-1' is 0.9, not a metric mapping"),
        (
            {"site-1": {"site-1": {"auc": "tensor(0.9)"}}},  # what the JSON widget writes for a tensor
            "'auc' of model 'site-1' on data client 'site-1' is 'tensor\\(0.9\\)', not a number",
        ),
        ({"site-1": {"site-1": {"auc": True}}}, "'auc' of model 'site-1' on data client 'site-1' is True, not a number"),
    ],
)
def test_malformed_results_are_refused(results, message):
    with pytest.raises(ReportError, match=message):
        exam_measures(results)


def test_find_results_file_nested_none_several_and_missing(tmp_path):
    server_run = tmp_path / "ws" / "runs" / "job" / "simulator" / "server" / "simulate_job"
    nested = _write(server_run / "cross_site_val" / "cross_val_results.json", {})
    assert find_cross_site_results(str(tmp_path / "ws")) == str(nested)
    assert find_cross_site_results(str(nested)) == str(nested)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match=re.escape(f"no cross_val_results.json under {tmp_path / 'empty'}:")):
        find_cross_site_results(str(tmp_path / "empty"))
    downloaded = tmp_path / "ws" / "download" / "job-2" / "workspace"  # FLARE API download_job_result layout
    other = _write(downloaded / "cross_site_val" / "cross_val_results.json", {})
    with pytest.raises(ReportError, match="2 cross_val_results.json files under") as info:
        find_cross_site_results(str(tmp_path / "ws"))
    assert str(nested) in str(info.value) and str(other) in str(info.value) and "pass one of them" in str(info.value)
    with pytest.raises(ReportError, match="does not exist"):
        find_cross_site_results(str(tmp_path / "absent"))


def test_load_reads_nan_and_null_as_nan_and_refuses_bad_json(tmp_path):
    results = _results()
    results["site-2"]["site-1"]["auc"] = float("nan")
    results["site-2"]["site-3"]["auc"] = None
    path = _write(tmp_path / "cross_site_val" / "cross_val_results.json", results)
    assert "NaN" in path.read_text()
    loaded = load_cross_site_results(str(tmp_path))
    assert math.isnan(loaded["site-2"]["site-1"]["auc"]) and math.isnan(loaded["site-2"]["site-3"]["auc"])
    assert loaded["site-1"]["site-1"]["num_cases"] == 10
    path.write_text('{"site-1": ')
    with pytest.raises(ReportError, match="is not valid JSON"):
        load_cross_site_results(str(path))


def test_report_table_and_written_files(tmp_path):
    results = _results()
    results["site-3"]["site-1"]["auc"] = float("nan")
    m = exam_measures(results)
    report = format_report(m)
    rows = _table_rows(report)
    assert ["site-1", "0.900", "0.920", "0.600", "0.850"] in rows
    assert ["site-2", "0.800", "0.850", "0.550", "0.900"] in rows
    assert rows[1 + 4][0] == "mean"
    assert "global vs local model, own data: +6.0%" in report
    assert f"metric: auc; global model: {BEST} (best global model)" in report
    assert [f"{BEST} (global, used)", "0.920", "0.850", "0.880"] in rows

    paths = write_report(m, str(tmp_path / "out"))
    assert set(paths) == {"md", "json", "csv", "png"}
    assert (tmp_path / "out" / "exam_report.md").read_text().startswith("# EXAM measures")
    text = (tmp_path / "out" / "exam_report.json").read_text()
    data = json.loads(text, parse_constant=lambda token: pytest.fail(f"{token} in exam_report.json"))
    assert data["matrix"][0][2] is None and data["matrix"][0][1] == pytest.approx(0.60)
    assert data["own_improvement_percent"] == pytest.approx(6.0)
    assert data["global_model"] == BEST and data["per_site"][0]["local_generalizability"] == pytest.approx(0.60)
    with open(paths["csv"], newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["site", "local_own", "global_own", "local_generalizability", "global_generalizability"]
    assert table[1] == ["site-1", "0.9", "0.92", "0.6", "0.85"] and table[-1][0] == "mean"
    png = tmp_path / "out" / "cross_site_auc.png"
    assert paths["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] >= 400 and image.size[1] >= 250


def test_csv_and_json_leave_nan_means_empty_and_null(tmp_path):
    results = copy.deepcopy(_results())
    for site in SITES:
        del results[site][site]  # no site evaluated its own model: every own-data mean is n/a
    m = exam_measures(results)
    assert math.isnan(m.own_improvement_percent) and m.own_sites_in_mean == ()
    assert "global vs local model, own data: n/a" in format_report(m)
    paths = write_report(m, str(tmp_path))
    assert json.loads(open(paths["json"]).read())["own_improvement_percent"] is None
    with open(paths["csv"], newline="") as f:
        assert list(csv.reader(f))[-1][:3] == ["mean", "", ""]
