"""Server-side record of each round: per-site loss, steps, timings and the global model's metrics.

:class:`RoundMetricsWriter` is an NVFlare component that listens to the FedAvg workflow's events
and appends one JSON line per round to ``<run dir>/medflare_metrics.jsonl``. It reads only what
sites already send in their result's DXO meta (``initial_metrics``, ``train_loss``,
``NUM_STEPS_CURRENT_ROUND``, timings, the filters applied and what privacy filters report,
and the names of all meta keys received), so it sees exactly what the aggregator sees, in the
simulator and in a real federation alike; the file travels with the job's downloaded result.

The metrics (Dice, or AUC and accuracy) reported for round ``r`` are those of the global model
the sites received at the start of round ``r`` (after ``r`` aggregations), averaged over sites
weighted by their number of validation cases.

With ``stream_to_tracking`` each round's record also goes to NVFlare's experiment tracking
(TensorBoard, MLflow receivers in the server app) as per-site and server series
(:mod:`medflare.reporting.tracking_stream`): only what the sites released, nothing more.
"""

from __future__ import annotations

import json
import math
import os
import time

from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from medflare.wire_contract import (
    AGGREGATION,
    DP_SGD,
    ENCRYPTION,
    FILTER_HISTORY,
    FILTERS_APPLIED,
    GAUSSIAN_DP,
    INITIAL_METRICS,
    NUM_STEPS,
    PERCENTILE_SHARING,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    VALIDATE_SECONDS,
)

#: the filters' privacy records, as the wire contract names them
PRIVACY_RECORDS = (PERCENTILE_SHARING, GAUSSIAN_DP, DP_SGD, ENCRYPTION)

__all__ = ["RoundMetricsWriter", "METRICS_FILE_NAME", "weighted_mean_metrics"]

METRICS_FILE_NAME = "medflare_metrics.jsonl"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def weighted_mean_metrics(site_metrics: dict[str, dict]) -> dict[str, float]:
    """Mean of each metric (``dice_*``, ``auc``, ``accuracy``, ...) over sites, weighted by
    ``num_cases`` (1 when absent); a site's non-finite value is left out of that metric's mean."""
    keys = sorted({k for m in site_metrics.values() for k in m if k != "num_cases" and _finite(m[k])})
    out = {}
    for key in keys:
        pairs = [(m[key], m.get("num_cases", 1)) for m in site_metrics.values() if _finite(m.get(key))]
        total = sum(w for _, w in pairs)
        if total > 0:
            out[key] = sum(v * w for v, w in pairs) / total
    return out


class RoundMetricsWriter(FLComponent):
    """Writes one JSON line per FedAvg round with what every site reported.

    Args:
        file_name: name of the JSON-lines file in the run directory.
        stream_to_tracking: also fire each round's record as NVFlare analytics events, for the
            tracking receivers (``TBAnalyticsReceiver``, ``MLflowReceiver``) in the server app.
    """

    def __init__(self, file_name: str = METRICS_FILE_NAME, stream_to_tracking: bool = False):
        super().__init__()
        if not isinstance(file_name, str) or not file_name or os.sep in file_name:
            raise ValueError(f"file_name must be a plain file name, got {file_name!r}")
        if not isinstance(stream_to_tracking, bool):
            raise TypeError(f"stream_to_tracking must be true or false, got {stream_to_tracking!r}")
        self.file_name = file_name
        self.stream_to_tracking = stream_to_tracking
        self._path = None
        self._round = None
        self._round_start = None
        self._sites: dict[str, dict] = {}
        self._aggregation = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
            self._path = os.path.join(run_dir, self.file_name)
        elif event_type == AppEventType.ROUND_STARTED:
            self._round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            self._round_start = time.time()
            self._sites = {}
            self._aggregation = None
        elif event_type == AppEventType.BEFORE_CONTRIBUTION_ACCEPT:
            self._record_contribution(fl_ctx)
        elif event_type == AppEventType.AFTER_AGGREGATION:
            self._record_aggregation(fl_ctx)
        elif event_type == AppEventType.ROUND_DONE:
            self._write_round(fl_ctx)

    def _record_contribution(self, fl_ctx: FLContext) -> None:
        peer_ctx = fl_ctx.get_peer_context()
        if peer_ctx is None:
            return
        site = peer_ctx.get_identity_name(default="?")
        try:
            dxo = from_shareable(peer_ctx.get_prop(FLContextKey.SHAREABLE))
        except Exception:
            return
        metrics = dxo.get_meta_prop(INITIAL_METRICS) or {}
        privacy = {k: dxo.meta[k] for k in PRIVACY_RECORDS if isinstance(dxo.get_meta_prop(k), dict)}
        self._sites[site] = {
            # every meta key the server received, so a run's record shows what a scope let leave
            "meta_keys": sorted(str(k) for k in dxo.meta),
            "filter_history": dxo.get_meta_prop(FILTER_HISTORY) or [],
            "filters_applied": dxo.get_meta_prop(FILTERS_APPLIED) or [],
            "privacy": privacy,
            # what the site's scope withholds (data-dependent keys under DP) is recorded as null
            "train_loss": dxo.get_meta_prop(TRAIN_LOSS),
            "steps": dxo.get_meta_prop(NUM_STEPS),
            "train_seconds": dxo.get_meta_prop(TRAIN_SECONDS),
            "validate_seconds": dxo.get_meta_prop(VALIDATE_SECONDS),
            "global_model_metrics": metrics if isinstance(metrics, dict) else {},
            "update_bytes": payload_bytes(dxo.data),
        }

    def _record_aggregation(self, fl_ctx: FLContext) -> None:
        """What the aggregator reports about the round (medflare's ValidatedAggregator: accepted
        and rejected sites with reasons)."""
        try:
            dxo = from_shareable(fl_ctx.get_prop(AppConstants.AGGREGATION_RESULT))
        except Exception:
            return
        self._aggregation = dxo.get_meta_prop(AGGREGATION)

    def _write_round(self, fl_ctx: FLContext) -> None:
        if self._path is None:
            return
        record = {
            "round": self._round,
            "round_seconds": time.time() - self._round_start if self._round_start else None,
            "sites": self._sites,
            "aggregation": self._aggregation,
            "global_model_metrics": weighted_mean_metrics(
                {s: v["global_model_metrics"] for s, v in self._sites.items()}
            ),
        }
        try:
            with open(self._path, "a") as f:
                # NaN (e.g. Dice of a region no validation case has) is not JSON: written as null
                f.write(json.dumps(_nan_to_none(record), allow_nan=False, default=str) + "\n")
        except (OSError, ValueError) as e:
            self.log_error(fl_ctx, f"cannot write round metrics to {self._path}: {e}")
        if self.stream_to_tracking:
            from medflare.reporting.tracking_stream import stream_points, tracking_points

            try:
                stream_points(fl_ctx.get_engine(), tracking_points(record))
            except Exception as e:  # tracking is a view of the record: it never stops the job
                self.log_error(fl_ctx, f"cannot stream round {self._round} to experiment tracking: {e}")


def payload_bytes(data) -> int:
    """Bytes of an update as received: its arrays' and ciphertexts' sizes (a sparse entry: its
    values and positions)."""
    total = 0
    for value in (data.values() if isinstance(data, dict) else ()):
        if isinstance(value, (bytes, bytearray)):
            total += len(value)
        elif hasattr(value, "nbytes"):
            total += int(value.nbytes)
        else:  # a SparseTensor: its values and its indices or bitmask
            for part in ("values", "indices", "bitmask"):
                total += int(getattr(getattr(value, part, None), "nbytes", 0) or 0)
    return total


def _nan_to_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value
