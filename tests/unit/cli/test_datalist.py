"""``medflare data datalist ROOT``, through a parser built the way cli/main.py builds ``data``
(the CLI module is medflare.cli.datalist; this test lives beside the layouts it drives)."""

from __future__ import annotations

import argparse
import json
import re

import pytest
from tests.unit.data.tumour_layout_fixtures import brats2023_subject, legacy_subject, msd_task

from medflare.cli.datalist import add_datalist_parser, run_datalist_command
from medflare.data.brats_layout import DataListError, load_datalist


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="medflare")
    sub = top.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data")
    add_datalist_parser(data.add_subparsers(dest="dataset", required=True))
    return top


def test_datalist_command_detects_prints_and_writes(tmp_path):
    for i in range(3):
        brats2023_subject(tmp_path / "d", f"BraTS-MET-0000{i}-000")
    args = parser().parse_args(["data", "datalist", str(tmp_path / "d"), "--val-fraction", "0.34", "--seed", "3"])
    assert (args.dataset, args.val_fraction, args.seed, args.out, args.force) == ("datalist", 0.34, 3, None, False)
    lines = []
    assert run_datalist_command(args, log=lines.append) == 0
    text = "\n".join(lines)
    assert "brats2023 layout, label convention brats2023" in text and "3 subjects, 3 labelled, 0 without a label" in text
    assert "cohorts: MET 3" in text and "label values present: {0: 3, 1: 3, 2: 3, 3: 3}" in text
    datalist = tmp_path / "d" / "datalist.json"
    assert f"datalist: {datalist} (3 labelled subjects)" in text
    assert json.loads((tmp_path / "d" / "data_config.json").read_text()) == {"data_root": ".", "datalist": "datalist.json"}
    train, val = load_datalist(str(datalist), str(tmp_path / "d"))
    assert (len(train), len(val)) == (2, 1)

    with pytest.raises(ValueError, match="exists; pass force=True"):
        run_datalist_command(args, log=lines.append)
    forced = parser().parse_args(["data", "datalist", str(tmp_path / "d"), "--force"])
    assert run_datalist_command(forced, log=lines.append) == 0


def test_datalist_command_writes_elsewhere_with_out(tmp_path):
    msd_task(tmp_path / "msd", n_train=2, n_test=1)
    out = tmp_path / "site" / "lists" / "brain.json"
    args = parser().parse_args(["data", "datalist", str(tmp_path / "msd"), "--out", str(out)])
    lines = []
    run_datalist_command(args, log=lines.append)
    assert any("4-D image channels {'0': 'FLAIR', '1': 'T1w', '2': 't1gd', '3': 'T2w'}, reordered to ['t1', 't1ce', 't2', 'flair']" in line for line in lines)
    config = json.loads((out.parent / "data_config.json").read_text())
    assert config == {"data_root": str(tmp_path / "msd"), "datalist": "brain.json"}
    train, _ = load_datalist(str(out), config["data_root"])
    assert train[0]["label_convention"] == "msd_task01"


def test_datalist_command_refuses_a_folder_without_a_layout(tmp_path):
    legacy_subject(tmp_path / "d", "S0", modalities=("t1",))
    args = parser().parse_args(["data", "datalist", str(tmp_path / "d")])
    with pytest.raises(DataListError, match=r"no brain-tumour data layout found in .*: found 1 folder\(s\) with .nii/.nii.gz files"):
        run_datalist_command(args, log=lambda line: None)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--val-fraction", "nan"], r"--val-fraction must be a number in \(0, 1\), got 'nan'"),
        (["--val-fraction", "1"], r"got '1'"),
        (["--val-fraction", "0"], r"got '0'"),
        (["--val-fraction", "a fifth"], r"got 'a fifth'"),
        (["--seed", "-1"], r"--seed must be an int >= 0, got '-1'"),
        (["--seed", "1.5"], r"got '1.5'"),
        ([], r"the following arguments are required: ROOT"),
    ],
)
def test_bad_arguments_are_refused_by_the_parser(tmp_path, capsys, argv, message):
    root = [] if not argv else [str(tmp_path)]
    with pytest.raises(SystemExit):
        parser().parse_args(["data", "datalist", *root, *argv])
    assert re.search(message, capsys.readouterr().err)
