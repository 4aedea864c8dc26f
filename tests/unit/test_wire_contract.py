"""The wire contract: its checks, and that the docs and every writer and reader agree with it."""

import math
import pathlib
import re

import numpy as np
import pytest

from medflare import wire_contract as wc

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_privacy_docs_list_every_declared_key_with_its_data_dependence():
    text = (ROOT / "docs" / "privacy.md").read_text()
    rows = dict(re.findall(r"^\| `([A-Za-z_]+)` \| (?:executor|filter|NVFlare|filter \(NVFlare's name\)) \| (yes|no) \|", text, re.M))
    assert set(rows) == set(wc.RESULT_META)
    for key, declared in wc.RESULT_META.items():
        assert rows[key] == ("yes" if declared.data_dependent else "no"), key


def test_no_package_module_spells_a_contract_key_as_a_literal():
    # one declaration: a writer or reader that spells the key itself can drift from it
    literals = {k for k in wc.RESULT_META if k.startswith("medflare_")} | {wc.NUM_TRAIN_CASES, wc.AGGREGATION}
    offenders = []
    for path in (ROOT / "custom" / "medflare").rglob("*.py"):
        if path.name == "wire_contract.py":
            continue
        source = path.read_text()
        offenders += [f"{path.name}: {k}" for k in literals if f'"{k}"' in source or f"'{k}'" in source]
    assert not offenders


def test_the_server_side_imports_no_client_filter_module():
    for module in ("aggregators", "reporting"):
        for path in (ROOT / "custom" / "medflare" / module).rglob("*.py"):
            assert "medflare.filters" not in path.read_text(), path


def test_a_full_executor_meta_fits_the_contract():
    meta = {
        wc.NUM_STEPS: 10,
        wc.NUM_TRAIN_CASES: np.int64(20),
        wc.TRAIN_LOSS: np.float32(0.5),
        wc.TRAIN_SECONDS: 1.0,
        wc.VALIDATE_SECONDS: 0.0,
        wc.INITIAL_METRICS: {"dice_mean": 0.3, "auc": math.nan, "num_cases": 4},
    }
    checked = wc.check_result_meta(meta)
    assert checked[wc.NUM_TRAIN_CASES] == 20 and type(checked[wc.NUM_TRAIN_CASES]) is int
    assert type(checked[wc.TRAIN_LOSS]) is float
    assert checked[wc.INITIAL_METRICS]["num_cases"] == 4 and type(checked[wc.INITIAL_METRICS]["num_cases"]) is int


@pytest.mark.parametrize(
    "meta, message",
    [
        ({"unknown": 1}, "undeclared key 'unknown'"),
        ({"num_train_case": 1}, "did you mean 'num_train_cases'"),
        ({3: 1}, "undeclared key 3"),
        ({wc.TRAIN_LOSS: "0.5"}, "must be a real number"),
        ({wc.TRAIN_LOSS: np.zeros(1)}, "must be a real number"),
        ({wc.TRAIN_SECONDS: -1.0}, ">= 0.0"),
        ({wc.NUM_STEPS: 2.0}, "must be an int"),
        ({wc.NUM_STEPS: True}, "must be an int"),
        ({wc.INITIAL_METRICS: [0.1]}, "mapping of names to numbers"),
        ({wc.INITIAL_METRICS: {"a b": 0.1}}, "must be a name"),
        ({wc.INITIAL_METRICS: {"a": None}}, "must be a number"),
        ({wc.INITIAL_METRICS: {"a": float("inf")}}, "finite"),
        ({wc.FILTERS_APPLIED: [{"filter": "F"}]}, "lacks the field 'source'"),
        ({wc.FILTERS_APPLIED: [{"filter": "F", "source": "server"}]}, "must be one of"),
        ({wc.FILTERS_APPLIED: [{"filter": "F", "source": "site"}] * 40}, "at most 32"),
        ({wc.PERCENTILE_SHARING: {"fraction_shared": 0.1}}, "lacks the field"),
        ({wc.AGGREGATION: {}}, "undeclared key 'medflare_aggregation'"),
    ],
)
def test_unfit_meta_is_refused_naming_the_key(meta, message):
    with pytest.raises(wc.WireContractError, match=message):
        wc.check_result_meta(meta)


def test_released_meta_withholds_what_the_site_does_not_name():
    meta = {wc.NUM_STEPS: 3, wc.TRAIN_LOSS: 0.1, wc.FILTER_HISTORY: ["A"]}
    kept, withheld = wc.released_meta(meta, (wc.NUM_STEPS,))
    assert kept == {wc.NUM_STEPS: 3, wc.FILTER_HISTORY: ["A"]}
    assert withheld == [wc.TRAIN_LOSS]


@pytest.mark.parametrize(
    "headers, message",
    [
        ({"x": 1}, "undeclared header 'x'"),
        ({"__rc__": "NOT_A_CODE"}, "return code must be one of"),
        ({"__content_type__": "RAW"}, "must be one of"),
        ({wc.CURRENT_ROUND: -1}, "int >= 0"),
        ({wc.CURRENT_ROUND: "1"}, "int >= 0"),
        ([("x", 1)], "must be a mapping"),
    ],
)
def test_unfit_headers_are_refused(headers, message):
    with pytest.raises(wc.WireContractError, match=message):
        wc.check_result_headers(headers)


def test_declared_headers_pass():
    assert wc.check_result_headers({"__rc__": "OK", "__content_type__": "DXO", wc.CURRENT_ROUND: None}) == {
        "__rc__": "OK",
        "__content_type__": "DXO",
        wc.CURRENT_ROUND: None,
    }
