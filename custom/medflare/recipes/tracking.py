"""Experiment tracking added to a job: NVFlare's TensorBoard or MLflow receiver in the server app,
fed by the server's round record (:mod:`medflare.reporting.tracking_stream`).

Only the server app changes: a receiver component, and ``stream_to_tracking`` on the job's
``RoundMetricsWriter``. Nothing is added at the sites and nothing new leaves them; what the
trackers show per site is what each site's privacy scope released with its results.
"""

from __future__ import annotations

import copy
from typing import Optional

from medflare.recipes.job_definition import JobDefinition, JobDefinitionError

__all__ = ["TRACKERS", "with_tracking", "tracking_problems"]

#: tracking type -> (receiver class path, the package it needs)
TRACKERS = {
    "tensorboard": ("nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver", "tensorboard"),
    "mlflow": ("nvflare.app_opt.tracking.mlflow.mlflow_receiver.MLflowReceiver", "mlflow"),
}
_WRITER = "medflare.reporting.round_metrics_writer.RoundMetricsWriter"
_RECEIVER_ID = "experiment_tracking"


def with_tracking(definition: JobDefinition, tracking_type: str, tracking_config: Optional[dict] = None) -> JobDefinition:
    """``definition`` with ``tracking_type`` ("tensorboard" or "mlflow") tracking.

    Args:
        tracking_config: the receiver's arguments (TensorBoard: ``tb_folder``; MLflow:
            ``tracking_uri``, ``kw_args``, ...). Never credentials: it is written into the job.

    Raises:
        JobDefinitionError: an unknown type, a config that is not a dict, a job whose server has
            no ``RoundMetricsWriter`` to stream from, or one that already tracks.
    """
    if tracking_type not in TRACKERS:
        raise JobDefinitionError(f"tracking_type must be one of {sorted(TRACKERS)}, got {tracking_type!r}")
    if tracking_config is not None and not isinstance(tracking_config, dict):
        raise JobDefinitionError(f"tracking_config must be a dict of the receiver's arguments, got {tracking_config!r}")
    server = copy.deepcopy(definition.server)
    components = server.get("components", [])
    writers = [c for c in components if isinstance(c, dict) and c.get("path") == _WRITER]
    if not writers:
        raise JobDefinitionError(f"job {definition.name}: its server has no RoundMetricsWriter, the record tracking streams")
    if any(isinstance(c, dict) and c.get("id") == _RECEIVER_ID for c in components):
        raise JobDefinitionError(f"job {definition.name} already has experiment tracking ({_RECEIVER_ID!r})")
    for writer in writers:
        writer.setdefault("args", {})["stream_to_tracking"] = True
    args = copy.deepcopy(tracking_config or {})
    if tracking_type == "mlflow":
        args.setdefault("kw_args", {}).setdefault("experiment_name", f"{definition.name}-experiment")
    components.append({"id": _RECEIVER_ID, "path": TRACKERS[tracking_type][0], "args": args})
    return JobDefinition(definition.name, definition.min_clients, server, copy.deepcopy(definition.client), definition.scope)


def tracking_problems(server_config: dict) -> list[str]:
    """Why the server could not track as its config asks, before the job runs (the receivers
    only log an error at run time when their package is missing)."""
    from medflare.optional_dependencies import available

    problems = []
    for component in server_config.get("components", []):
        path = component.get("path") if isinstance(component, dict) else None
        for tracking_type, (receiver, package) in TRACKERS.items():
            if path == receiver and not available(package):
                problems.append(
                    f"server component {component.get('id')!r} ({tracking_type} tracking) needs {package}, which is not "
                    f"installed on this machine: pip install 'medflare[tracking]'"
                )
    return problems
