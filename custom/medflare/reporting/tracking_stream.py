"""Experiment tracking (TensorBoard, MLflow) of what the sites released, through NVFlare's tracking.

Streaming metrics from a site is a release like any other, so medflare streams nothing from a
site. The server already holds, per round, what each site's privacy scope let leave with its
result (the round record :class:`~medflare.reporting.round_metrics_writer.RoundMetricsWriter`
writes); this module turns that record into NVFlare analytics events, one series per site and
one for the server, which NVFlare's receivers (``TBAnalyticsReceiver``: ``tb_events/<site>/``
in the server's run folder; ``MLflowReceiver``) write as usual. A key the site's scope withheld
(``train_loss`` under a DP scope, say) is not in the record, so it is in no tracker either: the
scope decides, key by key, exactly as it does for the result.

Series (``step`` = round):

- per site: ``train_loss``, ``validation/<metric>`` (the global model scored on the site's
  validation data at the start of the round), ``epsilon_run`` and ``epsilon_site`` from each
  privacy record the site released, ``update_bytes`` (the bytes of the update the server
  received, measured at the server);
- ``server``: ``global/<metric>`` (the case-weighted mean over the sites), ``accepted_sites``,
  ``rejected_sites``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["TrackingPoint", "SERVER_ORIGIN", "tracking_points", "stream_points"]

#: the origin of the federation-wide series
SERVER_ORIGIN = "server"


@dataclass(frozen=True)
class TrackingPoint:
    origin: str  # the site, or SERVER_ORIGIN
    tag: str
    value: float
    step: int


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def tracking_points(record: dict) -> list[TrackingPoint]:
    """The series points of one round record (what :class:`RoundMetricsWriter` writes); values
    that are absent, null or not finite give no point."""
    step = record.get("round")
    if isinstance(step, bool) or not isinstance(step, int):
        return []
    points = []

    def add(origin, tag, value):
        number = _number(value)
        if number is not None:
            points.append(TrackingPoint(origin, tag, number, step))

    for site, seen in sorted((record.get("sites") or {}).items()):
        if not isinstance(seen, dict):
            continue
        add(site, "train_loss", seen.get("train_loss"))
        for metric, value in sorted((seen.get("global_model_metrics") or {}).items()):
            if metric != "num_cases":
                add(site, f"validation/{metric}", value)
        for name, privacy in sorted((seen.get("privacy") or {}).items()):
            if isinstance(privacy, dict):
                for key in ("epsilon_run", "epsilon_site"):
                    add(site, f"{name}/{key}", privacy.get(key))
        add(site, "update_bytes", seen.get("update_bytes"))
    for metric, value in sorted((record.get("global_model_metrics") or {}).items()):
        add(SERVER_ORIGIN, f"global/{metric}", value)
    aggregation = record.get("aggregation")
    if isinstance(aggregation, dict):
        add(SERVER_ORIGIN, "accepted_sites", len(aggregation.get("accepted") or []))
        add(SERVER_ORIGIN, "rejected_sites", len(aggregation.get("rejected") or {}))
    return points


def stream_points(engine, points: list[TrackingPoint]) -> None:
    """Fire each point on the server as NVFlare's analytics event from its origin, the way
    NVFlare's ``FedEventRunner`` fires an event a site streamed: a fresh context, federation
    scope, the origin as the peer (which the receivers file it under), and direction ``in``, so
    no relay sends it on to any site."""
    from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, AnalyticsDataType
    from nvflare.apis.fl_constant import EventScope, FedEventHeader, FLContextKey, ReservedKey
    from nvflare.apis.utils.analytix_utils import create_analytic_dxo

    with engine.new_context() as ctx:
        for point in points:
            dxo = create_analytic_dxo(
                tag=point.tag, value=point.value, data_type=AnalyticsDataType.SCALAR, global_step=point.step
            )
            shareable = dxo.to_shareable()
            shareable.set_peer_props({ReservedKey.IDENTITY_NAME: point.origin})
            shareable.set_header(FedEventHeader.DIRECTION, "in")
            ctx.set_prop(FLContextKey.EVENT_DATA, shareable, private=True, sticky=False)
            ctx.set_prop(FLContextKey.EVENT_SCOPE, EventScope.FEDERATION, private=True, sticky=False)
            engine.fire_event(f"fed.{ANALYTIC_EVENT_TYPE}", ctx)
