"""One train task through a site's filters and the job's executor, and what comes out.

As a FLARE client runs a task (``nvflare.apis.utils.task_utils.apply_filters``: the site's scope
first, then the job's own filters): the task-data filters on the global model, the executor's
``train``, the task-result filters on its reply. A filter that raises stops the result (the
client then replies ``TASK_RESULT_FILTER_ERROR`` and sends nothing); a reply whose return code is
not OK carries no data. What is released is read as the server reads it: a sparse payload is
decoded with the entries it sent, a dense one taken as sent.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReturnCode
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.apis.utils.task_utils import apply_filters
from nvflare.app_common.app_constant import AppConstants

from medflare.audit.job_under_audit import TRAIN_TASK
from medflare.wire_contract import CURRENT_ROUND, DP_SGD, GAUSSIAN_DP

__all__ = ["RoundTrip", "train_round_trip", "weights_task"]


def weights_task(weights: dict, round_number: int, num_rounds: Optional[int]) -> Shareable:
    """The train task the server sends: a WEIGHTS DXO with the round headers ScatterAndGather sets."""
    from nvflare.apis.dxo import DXO

    task = DXO(data_kind=DataKind.WEIGHTS, data={k: np.array(v, copy=True) for k, v in weights.items()}).to_shareable()
    task.set_header(CURRENT_ROUND, round_number)
    if num_rounds is not None:
        task.set_header(AppConstants.NUM_ROUNDS, num_rounds)
    return task


@dataclass
class RoundTrip:
    """What one train task produced.

    Attributes:
        raw: the executor's update before any result filter (name -> array), or ``None``.
        raw_kind: its data kind.
        released: what left the site (name -> dense array), or ``None`` when nothing did.
        masks: name -> which entries were sent (a sparse payload's own; else every entry).
        blocked: why nothing left (``None`` when something did).
        meta: the released DXO's meta.
        epsilon: ``{"mechanism", "epsilon_release", "epsilon_site", "max_epsilon"}`` read from the
            released privacy record (DP-SGD's when there are both), or ``None`` for a scope without one.
        privacy_records: every privacy record on the result (a DP-SGD job under a Gaussian scope
            carries both, and both are charged).
        encrypted: the result left as CKKS ciphertexts (secure aggregation): ``released`` is
            then what a holder of the federation's key reads (any site; the server has none).
    """

    raw: Optional[dict] = None
    raw_kind: Optional[str] = None
    released: Optional[dict] = None
    masks: Optional[dict] = None
    blocked: Optional[str] = None
    meta: dict = field(default_factory=dict)
    epsilon: Optional[dict] = None
    privacy_records: list = field(default_factory=list)
    encrypted: bool = False


class _Errors(logging.Handler):
    """The executor's and filters' error lines during one round trip (the refusal's reason)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if "no engine in fl_ctx" in message:  # NVFlare's note that no engine takes the log event here
            return
        self.lines.append(message.splitlines()[0][:600])


class _Quiet(logging.Filter):
    """Keeps the executor's and filters' log lines off the console during a round trip."""

    def filter(self, record):
        return False


def _privacy_records(meta: dict) -> list:
    """Every privacy record on the result: the DP-SGD one (per patient) first, then the Gaussian (per site)."""
    records = []
    for key in (DP_SGD, GAUSSIAN_DP):
        record = meta.get(key)
        if isinstance(record, dict):
            records.append({
                "mechanism": record.get("mechanism"),
                "noise_multiplier": record.get("noise_multiplier"),
                "epsilon_release": record.get("epsilon_round"),
                "epsilon_run": record.get("epsilon_run"),
                "epsilon_site": record.get("epsilon_site"),
                "max_epsilon": record.get("max_epsilon"),
                "delta": record.get("delta"),
            })
    return records


def _decrypted(data: dict, fl_ctx, expected_shapes) -> dict:
    """Ciphertexts decrypted with this site's own key, as any key holder reads them."""
    import os

    import tenseal

    from medflare.transport.ckks_update import decrypt_update

    kit = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT).get_startup_kit_dir()
    with open(os.path.join(kit, "client_context.tenseal"), "rb") as f:
        context = tenseal.context_from(f.read())
    return decrypt_update(data, context, expected_shapes)


def _dense(dxo, expected_shapes) -> tuple[dict, dict]:
    from medflare.transport.sparse_update import SparseTensor, decode_sparse_with_masks

    data = dxo.data
    if isinstance(data, dict) and data and all(isinstance(v, SparseTensor) for v in data.values()):
        return decode_sparse_with_masks(data, expected_shapes=expected_shapes)
    dense = {k: np.asarray(v) for k, v in data.items()}
    return dense, {k: np.ones(v.shape, dtype=bool) for k, v in dense.items()}


def train_round_trip(executor, fl_ctx, weights: dict, job_filters: dict, round_number: int = 0, num_rounds: Optional[int] = None) -> RoundTrip:
    """Run one train task as the FLARE client does, with the scope already on ``fl_ctx``."""
    errors = _Errors()
    root = logging.getLogger()
    quiet = _Quiet()
    others = list(root.handlers)
    for handler in others:  # the refusals are the report's to tell, once, not the console's per case
        handler.addFilter(quiet)
    root.addHandler(errors)
    try:
        return _round_trip(executor, fl_ctx, weights, job_filters, round_number, num_rounds, errors)
    finally:
        root.removeHandler(errors)
        for handler in others:
            handler.removeFilter(quiet)


def _reason(prefix: str, errors: _Errors) -> str:
    detail = next((line for line in reversed(errors.lines) if line), "")
    return f"{prefix}: {detail}" if detail else prefix


def _round_trip(executor, fl_ctx, weights, job_filters, round_number, num_rounds, errors) -> RoundTrip:
    trip = RoundTrip()
    task = weights_task(weights, round_number, num_rounds)
    try:
        task = apply_filters("task_data_filters", task, fl_ctx, job_filters, TRAIN_TASK, FilterKey.IN)
    except Exception as e:  # noqa: BLE001 - the client replies TASK_DATA_FILTER_ERROR
        trip.blocked = f"a task-data filter refused the task ({type(e).__name__}: {e})"
        return trip
    reply = executor.execute(TRAIN_TASK, task, fl_ctx, Signal())
    if reply.get_return_code(ReturnCode.OK) == ReturnCode.OK:
        try:
            dxo = from_shareable(reply)
            trip.raw = {k: np.array(v, copy=True) for k, v in dxo.data.items()}
            trip.raw_kind = dxo.data_kind
        except Exception:  # noqa: BLE001 - an unreadable reply: the filters will refuse it too
            trip.raw = None
    try:
        result = apply_filters("task_result_filters", copy.deepcopy(reply), fl_ctx, job_filters, TRAIN_TASK, FilterKey.OUT)
    except Exception as e:  # noqa: BLE001 - the client replies TASK_RESULT_FILTER_ERROR, nothing sent
        trip.blocked = f"a task-result filter blocked the result ({type(e).__name__}: {str(e)[:400]})"
        return trip
    code = result.get_return_code(ReturnCode.OK)
    if code != ReturnCode.OK:
        trip.blocked = _reason(f"the executor refused the task (return code {code}), nothing sent", errors)
        return trip
    try:
        dxo = from_shareable(result)
    except Exception as e:  # noqa: BLE001
        trip.blocked = f"the result is not a DXO ({e}); the server would reject it"
        return trip
    expected = {k: tuple(np.shape(v)) for k, v in weights.items()}
    if isinstance(dxo.data, dict) and dxo.data and all(isinstance(v, bytes) for v in dxo.data.values()):
        trip.encrypted = True
        plain = _decrypted(dxo.data, fl_ctx, expected)
        trip.released, trip.masks = plain, {k: np.ones(v.shape, dtype=bool) for k, v in plain.items()}
    else:
        trip.released, trip.masks = _dense(dxo, expected)
    trip.meta = dict(dxo.meta)
    trip.privacy_records = _privacy_records(trip.meta)
    trip.epsilon = trip.privacy_records[0] if trip.privacy_records else None
    return trip
