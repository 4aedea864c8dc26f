"""medflare prepare segmentation | xray | report, through medflare.cli.main.main."""

import json
import os

import pytest

from medflare import optional_dependencies
from medflare.cli.main import main
from tests.unit.preparation.preparation_fixtures import brats_site, xray_site


def test_prepare_segmentation_prints_every_failed_case_and_report_summarises(tmp_path, capsys):
    datalist, root = brats_site(tmp_path / "in")
    out = str(tmp_path / "out")
    assert main(["prepare", "segmentation", "--datalist", datalist, "--data-root", root, "--out", out, "--spacing", "1.5", "1.5", "1.5"]) == 0
    printed = capsys.readouterr().out
    assert "prepared 3 of 6 case(s) into" in printed and "medflare-brats-prep 1.0.0" in printed
    for case, code in (("corrupt", "unreadable_file"), ("three-modalities", "modality_count"), ("with-nan", "non_finite")):
        assert f"FAIL {case} (" in printed and f"): {code}: " in printed
    assert f"data config: {os.path.join(out, 'data_config.json')}" in printed
    with open(os.path.join(out, "medflare_preparation.json")) as f:
        assert json.load(f)["parameters"]["target_spacing"] == [1.5, 1.5, 1.5]

    assert main(["prepare", "report", out]) == 0
    report = capsys.readouterr().out
    assert "cases 6: 3 passed, 3 failed, 0 with warnings" in report and "fail non_finite: 1" in report
    assert "output spacing range: 1.5-1.5 x 1.5-1.5 x 1.5-1.5" in report
    assert main(["prepare", "--report", out]) == 0
    assert "failed case corrupt: unreadable_file" in capsys.readouterr().out


def test_report_without_matplotlib_prints_the_note(tmp_path, capsys, monkeypatch):
    table, root = xray_site(tmp_path / "in")
    out = str(tmp_path / "out")
    assert main(["prepare", "xray", "--table", table, "--data-root", root, "--out", out, "--size", "16", "--bit-depth", "8"]) == 0
    assert "prepared 2 of 8 case(s)" in capsys.readouterr().out
    monkeypatch.setattr(optional_dependencies, "available", lambda module: False)
    assert main(["prepare", "report", out]) == 0
    printed = capsys.readouterr().out
    assert "note: matplotlib is not installed" in printed and "intensity_histograms.json" in printed
    assert not os.path.exists(os.path.join(out, "qc_report", "intensity_histograms.png"))


def test_a_split_with_no_passing_case_exits_2(tmp_path, capsys):
    datalist, root = brats_site(tmp_path / "in")
    with open(datalist) as f:
        content = json.load(f)
    content["validation"] = content["validation"][1:]  # only the NaN case
    with open(datalist, "w") as f:
        json.dump(content, f)
    assert main(["prepare", "segmentation", "--datalist", datalist, "--data-root", root, "--out", str(tmp_path / "o")]) == 2
    assert "no case of split(s) ['validation'] passed QC" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["segmentation", "--spacing", "nan", "1", "1"], "--spacing: target_spacing[0] must be a finite real number"),
        (["segmentation", "--normalise", "minmax"], "--normalise: normalise must be one of ['zscore', 'none'], got 'minmax'"),
        (["segmentation", "--crop-pad", "0", "8", "8"], "--crop-pad: crop_pad[0] must be an int in [1, 4096], got 0"),
        (["xray", "--size", "big"], "--size must be an int in [8, 4096] or 'keep', got 'big'"),
        (["xray", "--bit-depth", "12"], "--bit-depth: bit_depth must be one of [8, 16], got 12"),
        (["xray", "--scaling", "clahe"], "--scaling: scaling must be one of ['percentile', 'minmax'], got 'clahe'"),
    ],
)
def test_bad_arguments_exit_2_naming_the_option_and_value(tmp_path, capsys, arguments, message):
    kind = arguments[0]
    source = ["--datalist", str(tmp_path / "d.json")] if kind == "segmentation" else ["--table", str(tmp_path / "t.csv")]
    assert main(["prepare", kind, *source, "--data-root", str(tmp_path), "--out", str(tmp_path / "o"), *arguments[1:]]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_missing_inputs_and_subcommands_are_named(tmp_path, capsys):
    assert main(["prepare", "segmentation", "--datalist", str(tmp_path / "none.json"), "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "datalist not found" in capsys.readouterr().err
    assert main(["prepare", "report", str(tmp_path)]) == 2
    assert "this site has not prepared its data with medflare prepare" in capsys.readouterr().err
    assert main(["prepare"]) == 2
    assert "give a subcommand (segmentation, xray, report) or --report OUT" in capsys.readouterr().err
    assert main(["prepare", "--report", str(tmp_path), "report", str(tmp_path)]) == 2
    assert "not both" in capsys.readouterr().err
