"""The server exports its final and best global models when a run ends.

:class:`GlobalModelExporter` sits in the server app next to NVFlare's ``PTFileModelPersistor``.
On ``END_RUN`` it exports the two checkpoints the persistor saved (``FL_global_model.pt``,
``best_FL_global_model.pt``) into the same folder, through :func:`export_global_models`:
``<stem>.torchscript.pt``, ``<stem>.onnx`` and ``<stem>.export.json`` each, each export checked
against the network (:mod:`medflare.training.model_export`), and one summary,
``model_exports.json`` (:data:`EXPORTS_FILE`), that ``medflare run`` prints.

An encrypted global model (secure aggregation) is skipped with a logged note: the server holds
no key. A missing ``onnx``/``onnxruntime`` drops the ONNX format with the install hint. Nothing
here may fail the job: the models are trained and saved by then. Every failure is logged as an
error and written to the summary.
"""

from __future__ import annotations

import copy
import json
import os
import traceback
from typing import Mapping, Optional, Sequence

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext

from medflare.export.job_model import check_input_shapes
from medflare.optional_dependencies import EXPORT_EXTRA_HINT, available
from medflare.training.model_export import DEFAULT_ATOL, DEFAULT_RTOL, check_export_arguments

__all__ = ["EXPORTS_FILE", "GlobalModelExporter", "export_global_models", "export_summary_lines"]

#: the summary of a run's exports, in the persistor's folder (``app_server``)
EXPORTS_FILE = "model_exports.json"


def export_global_models(
    network,
    model_dir: str,
    file_names: Sequence[str],
    inputs: Mapping[str, Sequence[int]],
    formats: Sequence[str] = ("torchscript", "onnx"),
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    log=None,
) -> dict:
    """Export each checkpoint ``model_dir/<file_names>`` of ``network`` next to it; write and
    return the summary ``{"models": {file name: entry}, "notes": [...]}``.

    Each entry is ``{"status": "exported" | "failed" | "skipped" | "missing", "report": path,
    "passed": bool, "formats": {fmt: {"file", "max_abs_error", "max_rel_error", "passed"}},
    "reason": ...}``. Never raises for a model's failure: it is the entry's ``reason``, and
    ``log(level, message)`` hears it (``"error"`` for a failure, ``"info"`` otherwise).
    """
    from medflare.export.global_checkpoint import EncryptedCheckpointError, export_checkpoint

    log = log or (lambda level, message: None)
    notes = []
    formats = list(formats)
    if "onnx" in formats and not (available("onnx") and available("onnxruntime")):
        formats.remove("onnx")
        notes.append(f"ONNX export skipped: it needs onnx and onnxruntime: {EXPORT_EXTRA_HINT}")
        log("error", notes[-1])
    models = {}
    for name in file_names:
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            models[name] = {"status": "missing", "reason": f"{path} was not saved in this run"}
            log("info", f"no export of {name}: {models[name]['reason']}")
            continue
        if not formats:
            models[name] = {"status": "skipped", "reason": notes[-1]}
            continue
        try:
            report = export_checkpoint(path, copy.deepcopy(network), inputs, model_dir, formats, rtol=rtol, atol=atol)
        except EncryptedCheckpointError as e:
            models[name] = {"status": "skipped", "reason": str(e)}
            log("info", f"global model not exported: {e}")
            continue
        except Exception as e:  # the export must not fail the run: recorded and logged loudly
            models[name] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
            log("error", f"EXPORT FAILED for {path}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}")
            continue
        models[name] = {
            "status": "exported" if report.passed else "failed",
            "report": report.report_file,
            "passed": report.passed,
            "formats": {
                e.format: {"file": e.file, "max_abs_error": e.max_abs_error, "max_rel_error": e.max_rel_error,
                           "passed": e.passed, "seconds": e.seconds, "bytes": e.bytes}
                for e in report.exports
            },
        }
        failed = [e.error for e in report.exports if not e.passed]
        if failed:
            models[name]["reason"] = "; ".join(failed)
            log("error", f"EXPORT FAILED its agreement check for {path} (files renamed .failed): {models[name]['reason']}")
        else:
            log("info", f"exported {path}: " + ", ".join(
                f"{e.format} {os.path.basename(e.file)} (max abs error {e.max_abs_error:.2g})" for e in report.exports))
    summary = {"models": models, "notes": notes}
    tmp = os.path.join(model_dir, EXPORTS_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, os.path.join(model_dir, EXPORTS_FILE))
    return summary


def export_summary_lines(model_dir: str) -> list:
    """What ``medflare run`` prints about a run's exports: one line a model and format, read
    from ``model_dir/model_exports.json``; one line saying so when there is none."""
    path = os.path.join(model_dir, EXPORTS_FILE)
    try:
        with open(path) as f:
            summary = json.load(f)
        models = summary["models"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"model exports: none ({path}: {type(e).__name__})"]
    lines = [f"model exports ({path}):"] + [f"  {note}" for note in summary.get("notes", [])]
    for name, entry in models.items():
        formats = entry.get("formats") or {}
        if not formats:
            lines.append(f"  {name}: {entry.get('status')}: {entry.get('reason')}")
        for fmt, result in formats.items():
            verdict = "agrees" if result.get("passed") else "FAILED its agreement check"
            lines.append(
                f"  {name} {fmt}: {result.get('file')}: {verdict} (max abs error {result.get('max_abs_error')}, "
                f"max rel error {result.get('max_rel_error')})"
            )
    return lines


class GlobalModelExporter(FLComponent):
    """Exports the persisted final and best global models at ``END_RUN``.

    Args:
        inputs: ``{input name: shape}`` of the network's sample input, batch first (e.g.
            ``{"image": [1, 4, 32, 32, 32]}``; OutcomeNet's ``image`` and ``clinical``), as
            :func:`medflare.export.job_model.sample_input_shapes` derives it from the job.
        persistor_id: the ``PTFileModelPersistor`` whose network and folder are used.
        formats: a non-empty subset of ``["torchscript", "onnx"]``.
        rtol, atol: the agreement check's tolerances, reals in [0, 1] (not both 0).

    Raises:
        ValueError: a bad argument, at construction (so ``medflare job check`` refuses it).
    """

    def __init__(
        self,
        inputs: dict,
        persistor_id: str = "persistor",
        formats: Sequence[str] = ("torchscript", "onnx"),
        rtol: float = DEFAULT_RTOL,
        atol: float = DEFAULT_ATOL,
    ):
        super().__init__()
        check_input_shapes(inputs, "inputs")
        if not isinstance(persistor_id, str) or not persistor_id:
            raise ValueError(f"persistor_id must be a component id, got {persistor_id!r}")
        check_export_arguments(formats, rtol, atol)
        self.inputs = inputs
        self.persistor_id = persistor_id
        self.formats = list(formats)
        self.rtol = rtol
        self.atol = atol
        self.summary: Optional[dict] = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type != EventType.END_RUN:
            return
        try:
            self.summary = self._export(fl_ctx)
        except Exception as e:  # never fail the job's result over its export
            self.log_error(fl_ctx, f"EXPORT FAILED: global models not exported: {type(e).__name__}: {e}")

    def _export(self, fl_ctx: FLContext) -> Optional[dict]:
        import torch

        persistor = fl_ctx.get_engine().get_component(self.persistor_id)
        network = getattr(persistor, "model", None)
        model_dir = getattr(persistor, "log_dir", None)
        if not isinstance(network, torch.nn.Module) or not isinstance(model_dir, str):
            self.log_error(
                fl_ctx,
                f"EXPORT FAILED: component {self.persistor_id!r} is not a started PTFileModelPersistor with a network "
                f"(got {type(persistor).__name__})",
            )
            return None
        names = [persistor.global_model_file_name, persistor.best_global_model_file_name]

        def log(level: str, message: str) -> None:
            (self.log_error if level == "error" else self.log_info)(fl_ctx, message)

        return export_global_models(network, model_dir, names, self.inputs, self.formats, self.rtol, self.atol, log)
