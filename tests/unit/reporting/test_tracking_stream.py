"""What the trackers get: the round record's released values, one series per site and the server."""

import math

import pytest

from medflare.reporting.tracking_stream import SERVER_ORIGIN, TrackingPoint, tracking_points


def _record(**site_1):
    seen = {
        "train_loss": 0.5,
        "global_model_metrics": {"auc": 0.7, "accuracy": 0.6, "num_cases": 40},
        "privacy": {"medflare_gaussian_dp": {"epsilon_run": 1.5, "epsilon_site": 3.0, "noise_multiplier": 2.4}},
        "update_bytes": 1024,
    }
    seen.update(site_1)
    return {
        "round": 3,
        "sites": {"site-1": seen, "site-2": {"train_loss": None, "global_model_metrics": {}, "privacy": {}, "update_bytes": 2048}},
        "aggregation": {"accepted": ["site-1", "site-2"], "rejected": {"site-9": "stale round"}},
        "global_model_metrics": {"auc": 0.7},
    }


def _by_origin(points):
    out = {}
    for p in points:
        assert p.step == 3
        out.setdefault(p.origin, {})[p.tag] = p.value
    return out


def test_every_released_value_becomes_a_point_of_its_site():
    series = _by_origin(tracking_points(_record()))
    assert series["site-1"] == {
        "train_loss": 0.5,
        "validation/auc": 0.7,
        "validation/accuracy": 0.6,
        "medflare_gaussian_dp/epsilon_run": 1.5,
        "medflare_gaussian_dp/epsilon_site": 3.0,
        "update_bytes": 1024.0,
    }
    assert series[SERVER_ORIGIN] == {"global/auc": 0.7, "accepted_sites": 2.0, "rejected_sites": 1.0}


def test_what_a_scope_withheld_is_in_no_series():
    # site-2's scope withheld its loss and its scores: the record holds null / nothing for them
    assert _by_origin(tracking_points(_record()))["site-2"] == {"update_bytes": 2048.0}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), None, True, "0.5", [0.5]])
def test_values_that_are_not_finite_numbers_give_no_point(value):
    series = _by_origin(tracking_points(_record(train_loss=value, update_bytes=value)))
    assert "train_loss" not in series["site-1"] and "update_bytes" not in series["site-1"]


@pytest.mark.parametrize("round_number", [None, "3", True, 2.0])
def test_a_record_without_a_round_gives_nothing(round_number):
    record = _record()
    record["round"] = round_number
    assert tracking_points(record) == []


def test_malformed_parts_are_skipped_not_raised():
    record = {"round": 0, "sites": {"site-1": "junk", "site-2": {"privacy": {"x": "junk"}}}, "aggregation": "junk"}
    assert tracking_points(record) == []
    assert tracking_points({"round": 0}) == []
    assert all(isinstance(p, TrackingPoint) and math.isfinite(p.value) for p in tracking_points(_record()))
