"""medflare prepare xray: per-row verdicts, prepared PNGs, the prepared table, determinism."""

import csv
import hashlib

import numpy as np
import pytest
from PIL import Image

from medflare.data.data_errors import DataListError
from medflare.data.outcome_table import load_outcome_table
from medflare.data.site_data_config import read_site_data_config
from medflare.preparation.prepare_xray import prepare_xray
from medflare.preparation.recipe import XrayPreparation
from tests.unit.preparation.preparation_fixtures import radiograph, write_png, xray_site

RECIPE = XrayPreparation(size=16, bit_depth=8)


def test_each_row_gets_its_verdict_and_only_passing_rows_reach_the_prepared_table(tmp_path):
    table, root = xray_site(tmp_path / "in")
    result = prepare_xray(table, root, str(tmp_path / "out"), RECIPE)
    verdicts = [(c["case_id"], c["verdict"], [r["code"] for r in c["reasons"]]) for c in result.manifest["cases"]]
    assert verdicts == [
        ("p1", "pass", []),
        ("p2", "pass", []),
        ("p3", "fail", ["constant_image"]),
        ("p4", "fail", ["unreadable_file"]),
        ("p5", "fail", ["image_too_small"]),
        ("p6", "fail", ["path_outside_data_root"]),
        ("p1", "fail", ["duplicate_case"]),
        ("p7", "fail", ["non_finite"]),
    ]
    assert "p4.png" in result.manifest["cases"][3]["reasons"][0]["message"]
    config = read_site_data_config(result.data_config)
    with open(config.datalist, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case_id"], r["split"], r["image"], r["age"]) for r in rows] == [
        ("p1", "train", "images/p1.png", "71"),
        ("p2", "test", "images/p2.png", "45"),
    ]
    cases = load_outcome_table(config.datalist, config.data_root, ["age"], ["o2_24h"], "image")
    assert [c.case_id for c in cases["train"]] == ["p1"] and [c.case_id for c in cases["test"]] == ["p2"]


def test_percentile_scaling_and_resizing_by_hand(tmp_path):
    root = tmp_path / "in"
    pixels = np.tile(np.arange(200, dtype=np.uint8), (20, 1))[:, :200]  # a ramp 0..199 along x
    pixels[0, 0] = 255  # one bright marker: minmax is set by it, the percentiles are not
    write_png(root / "images" / "a.png", pixels)
    write_png(root / "images" / "b.png", radiograph(3))
    (root / "t.csv").write_text("case_id,split,image\na,train,images/a.png\nb,test,images/b.png\n")
    keep = prepare_xray(str(root / "t.csv"), str(root), str(tmp_path / "p"), XrayPreparation(size=None, bit_depth=16))
    out = np.asarray(Image.open(tmp_path / "p" / "images" / "a.png")).astype(np.float64)
    assert out.shape == (20, 200) and keep.manifest["cases"][0]["output_shape"] == [20, 200]
    x = (pixels.astype(np.float32) / np.float32(255)).astype(np.float64)  # read_xray: float32 by its own range
    low, high = np.percentile(x, [0.5, 99.5])
    expected = np.rint(np.clip((x - low) / (high - low), 0, 1) * 65535)
    assert np.array_equal(out, expected)
    minmax = prepare_xray(str(root / "t.csv"), str(root), str(tmp_path / "m"), XrayPreparation(size=8, scaling="minmax", bit_depth=8))
    small = np.asarray(Image.open(tmp_path / "m" / "images" / "a.png"))
    assert small.shape == (8, 8) and small.dtype == np.uint8
    assert minmax.manifest["cases"][0]["warnings"] == []
    up = prepare_xray(str(root / "t.csv"), str(root), str(tmp_path / "u"), XrayPreparation(size=256))
    assert up.manifest["cases"][1]["warnings"][0]["code"] == "upsampled"


def test_monochrome1_dicom_is_inverted_before_preparation(tmp_path):
    from tests.unit.preparation.preparation_fixtures import write_dicom

    root = tmp_path / "in"
    (root / "images").mkdir(parents=True)
    ramp = np.tile(np.arange(0, 4000, 200, dtype=np.uint16), (20, 1))
    write_dicom(root / "images" / "m2.dcm", ramp)
    write_dicom(root / "images" / "m1.dcm", ramp, monochrome1=True)
    (root / "t.csv").write_text("case_id,split,image\nm2,train,images/m2.dcm\nm1,test,images/m1.dcm\n")
    prepare_xray(str(root / "t.csv"), str(root), str(tmp_path / "o"), XrayPreparation(size=None, scaling="minmax", bit_depth=8))
    m2 = np.asarray(Image.open(tmp_path / "o" / "images" / "m2.png")).astype(int)
    m1 = np.asarray(Image.open(tmp_path / "o" / "images" / "m1.png")).astype(int)
    assert m2[0, 0] == 0 and m2[0, -1] == 255 and np.array_equal(m1, 255 - m2)


def test_the_same_table_and_parameters_give_byte_identical_pngs(tmp_path):
    table, root = xray_site(tmp_path / "in")
    a = prepare_xray(table, root, str(tmp_path / "a"), RECIPE).manifest
    b = prepare_xray(table, root, str(tmp_path / "b"), RECIPE).manifest
    outputs = [[o for c in m["cases"] for o in c["outputs"]] for m in (a, b)]
    assert outputs[0] and outputs[0] == outputs[1]
    with open(tmp_path / "a" / "images" / "p1.png", "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == outputs[0][0]["sha256"]
    assert a["prepared"]["datalist"]["sha256"] == b["prepared"]["datalist"]["sha256"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"size": 4}, "size must be an int in [8, 4096], got 4"),
        ({"size": True}, "size must be an int in [8, 4096], got True"),
        ({"scaling": "clahe"}, "scaling must be one of ['percentile', 'minmax'], got 'clahe'"),
        ({"percentiles": (99.5, 0.5)}, "percentiles must have low < high"),
        ({"percentiles": (float("nan"), 99)}, "percentiles[0] must be a finite real number"),
        ({"bit_depth": 12}, "bit_depth must be one of [8, 16], got 12"),
        ({"bit_depth": True}, "bit_depth must be one of [8, 16], got True"),
        ({"image_column": "split"}, "image_column must be a column name other than case_id and split"),
    ],
)
def test_bad_recipe_arguments_are_refused_naming_them(arguments, message):
    with pytest.raises((TypeError, ValueError)) as raised:
        XrayPreparation(**arguments)
    assert message in str(raised.value)


def test_a_table_without_its_columns_or_cases_is_refused(tmp_path):
    (tmp_path / "t.csv").write_text("case_id,split\np1,train\n")
    with pytest.raises(DataListError, match=r"lacks column\(s\) \['image'\]"):
        prepare_xray(str(tmp_path / "t.csv"), str(tmp_path), str(tmp_path / "o"), RECIPE)
    (tmp_path / "e.csv").write_text("case_id,split,image\n")
    with pytest.raises(DataListError, match="has no cases"):
        prepare_xray(str(tmp_path / "e.csv"), str(tmp_path), str(tmp_path / "o"), RECIPE)
    with pytest.raises(DataListError, match="does not exist"):
        prepare_xray(str(tmp_path / "none.csv"), str(tmp_path), str(tmp_path / "o"), RECIPE)
    (tmp_path / "s.csv").write_text("case_id,split,image\np1,validation,images/x.png\n../x,train,a.png\n")
    manifest = prepare_xray(str(tmp_path / "s.csv"), str(tmp_path), str(tmp_path / "o"), RECIPE).manifest
    assert [r["code"] for c in manifest["cases"] for r in c["reasons"]] == ["unknown_split", "malformed_entry"]
