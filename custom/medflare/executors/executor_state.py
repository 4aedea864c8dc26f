"""What a site's executor keeps between tasks of one job, on disk in the job's run folder.

NVFlare may rebuild a client's app in the middle of a job: the simulator with fewer threads than
clients builds each client afresh when its turn comes, and a restarted client in a real
federation starts a new process. Whatever the executor held in memory is then gone: the
site-only model (EXAM's single-site model, trained alongside and never sent during training),
the weights of its latest local training, and, under DP-SGD to a target epsilon, how many of
the planned rounds it has trained. Losing the last one would let a rebuilt site train more
rounds than its noise multiplier was solved for.

So the executor writes that state after every completed train task to
``<job run folder>/medflare_executor_state.pt`` (``torch.save`` of tensors and plain values; read
back with ``weights_only=True``, so loading it runs no pickled code) and reads it back when it
is built again. It never leaves the site: it is in the client's own workspace, next to the
job's logs. The file is written whole or not at all (a temporary file, then ``os.replace``).

A state file that cannot be read, or that belongs to another kind of executor state, stops
every task with an error naming the file (fail closed: a site that cannot tell how far it has
trained does not train on).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

__all__ = ["STATE_FILE", "STATE_VERSION", "ExecutorStateError", "state_path", "save_state", "load_state"]

STATE_FILE = "medflare_executor_state.pt"
STATE_VERSION = 1


class ExecutorStateError(RuntimeError):
    """The executor's saved state cannot be read back."""


def state_path(fl_ctx) -> Optional[str]:
    """``<job run folder>/medflare_executor_state.pt`` for the job in ``fl_ctx``; None when the
    context has no workspace or job (an executor driven outside a FLARE client)."""
    from nvflare.apis.fl_constant import FLContextKey

    workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
    job_id = fl_ctx.get_job_id()
    if workspace is None or not job_id:
        return None
    return os.path.join(workspace.get_run_dir(job_id), STATE_FILE)


def _tensors(weights: Optional[dict]) -> Optional[dict]:
    if weights is None:
        return None
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}


def _arrays(tensors: Optional[dict]) -> Optional[dict]:
    if tensors is None:
        return None
    return {k: v.numpy() for k, v in tensors.items()}


def save_state(path: str, state: dict) -> None:
    """Write ``state`` (``local_weights`` and ``site_only_weights``: dicts of arrays or None;
    the rest plain values) to ``path``, whole or not at all."""
    payload = dict(state)
    payload["version"] = STATE_VERSION
    for key in ("local_weights", "site_only_weights"):
        payload[key] = _tensors(state.get(key))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_state(path: Optional[str]) -> Optional[dict]:
    """The state saved at ``path``, or None when there is none.

    Raises:
        ExecutorStateError: naming the file, when it exists and cannot be read as this state.
    """
    if path is None or not os.path.exists(path):
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExecutorStateError(
            f"the executor's saved state {path} cannot be read ({type(e).__name__}: {e}); this site cannot tell how "
            "far it has trained in this job, so it trains no further. Remove the file only if this job may start "
            "this site's state afresh"
        ) from None
    if not isinstance(payload, dict) or payload.get("version") != STATE_VERSION:
        found = payload.get("version") if isinstance(payload, dict) else type(payload).__name__
        raise ExecutorStateError(f"{path}: not medflare executor state version {STATE_VERSION} (found {found!r})")
    problem = _shape_problem(payload)
    if problem:
        raise ExecutorStateError(f"{path}: {problem}; this site trains no further in this job")
    for key in ("local_weights", "site_only_weights"):
        payload[key] = _arrays(payload.get(key))
    return payload


def _shape_problem(payload: dict) -> Optional[str]:
    """What in a loaded state is not what :func:`save_state` writes, or None."""
    for key in ("local_weights", "site_only_weights"):
        weights = payload.get(key)
        if weights is not None and (
            not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items())
        ):
            return f"{key} is not a mapping of names to tensors"
    rounds = payload.get("target_rounds_trained", 0)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        return f"target_rounds_trained must be an int >= 0, got {rounds!r}"
    if not isinstance(payload.get("site_only_unprivate", False), bool):
        return f"site_only_unprivate must be true or false, got {payload.get('site_only_unprivate')!r}"
    records = payload.get("site_only_dp_records", [])
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        return "site_only_dp_records must be a list of DP-SGD records"
    return None
