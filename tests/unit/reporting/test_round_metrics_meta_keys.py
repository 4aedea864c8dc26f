"""The round record names every meta key a site's result carried to the server, and only those."""

from __future__ import annotations

from medflare.reporting.round_metrics_writer import RoundMetricsWriter
from medflare.wire_contract import DP_SGD, FILTERS_APPLIED, NUM_STEPS, TRAIN_LOSS
from tests.unit.reporting.test_round_metrics_writer import _contribution


def test_the_record_lists_the_meta_keys_the_server_received():
    writer = RoundMetricsWriter()
    writer._record_contribution(_contribution("site-1", {DP_SGD: {"steps": 2}, FILTERS_APPLIED: []}))
    writer._record_contribution(_contribution("site-2", {NUM_STEPS: 3, TRAIN_LOSS: 0.5}))
    assert writer._sites["site-1"]["meta_keys"] == sorted([DP_SGD, FILTERS_APPLIED])
    assert writer._sites["site-2"]["meta_keys"] == sorted([NUM_STEPS, TRAIN_LOSS])
