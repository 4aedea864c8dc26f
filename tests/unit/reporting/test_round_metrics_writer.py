"""The round metrics writer records every privacy record the wire contract declares, DP-SGD's included."""

from __future__ import annotations

import numpy as np
import pytest

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext

from medflare.reporting.round_metrics_writer import PRIVACY_RECORDS, RoundMetricsWriter
from medflare.wire_contract import DP_SGD, GAUSSIAN_DP, PERCENTILE_SHARING


def _contribution(site: str, meta: dict) -> FLContext:
    peer = FLContext()
    peer.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    dxo = DXO(DataKind.WEIGHT_DIFF, {"w": np.zeros(2, np.float32)}, meta=meta)
    peer.set_prop(FLContextKey.SHAREABLE, dxo.to_shareable(), private=True, sticky=False)
    fl_ctx = FLContext()
    fl_ctx.set_peer_context(peer)
    return fl_ctx


@pytest.mark.parametrize("key", [PERCENTILE_SHARING, GAUSSIAN_DP, DP_SGD])
def test_every_privacy_record_reaches_the_metrics(key):
    assert key in PRIVACY_RECORDS
    record = {"noise_multiplier": 1.8, "epsilon_site": 0.9}
    writer = RoundMetricsWriter()
    writer._record_contribution(_contribution("site-1", {key: record, "train_loss": None}))
    assert writer._sites["site-1"]["privacy"] == {key: record}
    assert writer._sites["site-1"]["train_loss"] is None
