"""The job a site is asked to run, as its FLARE client would build it.

From the job folder's ``app/config/config_fed_client.json`` (variables resolved as NVFlare
resolves them): the executor of the ``train`` task and the job's own ``task_data_filters`` /
``task_result_filters``, each built by NVFlare's ``ComponentBuilder`` (nested ``{"path": ...}``
arguments included). From the server config: the planned rounds (``num_rounds`` of the
``ScatterAndGather`` workflow, the ``NUM_ROUNDS`` header a target-epsilon DP-SGD executor plans
with). The global model of round 0 is the executor's network built from its model spec, as the
server's persistor builds it from the same seeded spec.

Only installed code is imported: a job that brings code in its own ``custom/`` folder is
refused, since an audit must not run code the site has not installed.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from nvflare.apis.fl_constant import FilterKey

from medflare.audit.scratch_site import AuditError
from medflare.jobs.job_config import ConfigBuilder, resolve_variables

__all__ = ["JobUnderAudit", "load_job", "TRAIN_TASK"]

TRAIN_TASK = "train"


def _read_config(path: str) -> dict:
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise AuditError(f"{path}: missing; --job must be a job folder (meta.json, app/config/...)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AuditError(f"{path}: cannot read the job config: {e}") from None
    if not isinstance(config, dict):
        raise AuditError(f"{path}: a job config must be a JSON object")
    try:
        resolve_variables(config, path)
    except Exception as e:  # noqa: BLE001 - NVFlare's own variable errors
        raise AuditError(f"{path}: {e}") from None
    return config


def _app_config_dir(job_dir: str) -> tuple[str, dict]:
    meta_path = os.path.join(job_dir, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise AuditError(f"--job {job_dir}: no meta.json; give a job folder such as jobs/cxr_emr_fedavg") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AuditError(f"{meta_path}: cannot read: {e}") from None
    if not isinstance(meta, dict):
        raise AuditError(f"{meta_path}: must be a JSON object")
    apps = list((meta.get("deploy_map") or {"app": []}).keys()) if isinstance(meta, dict) else []
    for app in apps or ["app"]:
        folder = os.path.join(job_dir, app)
        if os.path.isfile(os.path.join(folder, "config", "config_fed_client.json")):
            if os.path.isdir(os.path.join(folder, "custom")) and os.listdir(os.path.join(folder, "custom")):
                raise AuditError(
                    f"{folder}/custom: the job brings its own code; an audit runs only code installed at the "
                    f"site (install the package, then remove custom/ from the copy you audit)"
                )
            return os.path.join(folder, "config"), meta
    raise AuditError(f"--job {job_dir}: no app with config/config_fed_client.json (deploy_map {apps})")


@dataclass
class JobUnderAudit:
    """A job folder, read.

    Attributes:
        folder, name: the job folder and its ``meta.json`` name.
        scope: the scope its ``meta.json`` asks for (``None``: the site's default).
        executor_spec: ``{"path", "args"}`` of the train task's executor, variables resolved.
        client_config: the whole resolved client config (for its filters).
        num_rounds: the rounds the server plans (``None`` when its workflow does not say).
    """

    folder: str
    name: str
    scope: Optional[str]
    executor_spec: dict
    client_config: dict
    num_rounds: Optional[int]
    notes: list = field(default_factory=list)

    @property
    def executor_args(self) -> dict:
        return self.executor_spec.get("args", {}) or {}

    @property
    def kind(self) -> str:
        """``"outcome"`` or ``"segmentation"``, by the executor class."""
        path = self.executor_spec["path"]
        if path.endswith("OutcomeExecutor"):
            return "outcome"
        if path.endswith("SegmentationExecutor"):
            return "segmentation"
        raise AuditError(f"job {self.name}: the audit knows the medflare executors, not {path}")

    def build_executor(self, **overrides):
        """A new executor as the client builds it, with ``overrides`` of its arguments (a dict
        value updates a dict argument, e.g. ``dp_sgd``)."""
        spec = copy.deepcopy(self.executor_spec)
        args = spec.setdefault("args", {})
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(args.get(key), dict):
                args[key].update(value)
            else:
                args[key] = value
        try:
            return ConfigBuilder().build_component(spec)
        except Exception as e:  # noqa: BLE001 - the job's own argument errors, named
            raise AuditError(f"job {self.name}: its executor cannot be built: {e}") from None

    def build_filters(self) -> dict:
        """The job's own filters as the client holds them: ``{"train/in": [...], "train/out": [...]}``
        (``FilterKey.DELIMITER``)."""
        table = {}
        for chain, direction in (("task_data_filters", FilterKey.IN), ("task_result_filters", FilterKey.OUT)):
            for entry in self.client_config.get(chain, []) or []:
                if TRAIN_TASK not in (entry.get("tasks") or []):
                    continue
                built = []
                for spec in entry.get("filters", []):
                    try:
                        built.append(ConfigBuilder().build_component(copy.deepcopy(spec)))
                    except Exception as e:  # noqa: BLE001
                        raise AuditError(f"job {self.name}: its filter {spec.get('path')} cannot be built: {e}") from None
                table.setdefault(f"{TRAIN_TASK}{FilterKey.DELIMITER}{direction}", []).extend(built)
        return table

    def global_weights(self) -> dict:
        """Round 0's global model as numpy arrays: the executor's seeded network spec built."""
        from medflare.training.model_spec import build_model

        model = build_model(copy.deepcopy(self.executor_args["model"]))
        return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}

    def network(self, weights: dict):
        """The architecture with ``weights`` loaded (the attacker's copy of what it sent)."""
        import torch

        from medflare.training.model_spec import build_model

        model = build_model(copy.deepcopy(self.executor_args["model"]))
        model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
        return model


def load_job(job_dir: str) -> JobUnderAudit:
    """Read a job folder (nothing is built yet).

    Raises:
        AuditError: naming the file that is missing or malformed, or the job's own code.
    """
    if not isinstance(job_dir, str) or not os.path.isdir(job_dir):
        raise AuditError(f"--job {job_dir!r}: not a folder (give a job folder such as jobs/cxr_emr_fedavg)")
    job_dir = os.path.abspath(job_dir)
    config_dir, meta = _app_config_dir(job_dir)
    client = _read_config(os.path.join(config_dir, "config_fed_client.json"))
    executor = None
    for entry in client.get("executors", []) or []:
        if TRAIN_TASK in (entry.get("tasks") or []):
            executor = entry.get("executor")
    if not isinstance(executor, dict) or not isinstance(executor.get("path"), str):
        raise AuditError(f"{config_dir}/config_fed_client.json: no executor answers the {TRAIN_TASK!r} task")
    num_rounds = None
    server_path = os.path.join(config_dir, "config_fed_server.json")
    if os.path.isfile(server_path):
        server = _read_config(server_path)
        for workflow in server.get("workflows", []) or []:
            rounds = (workflow.get("args") or {}).get("num_rounds")
            if isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 1:
                num_rounds = rounds
    scope = meta.get("scope") if isinstance(meta, dict) else None
    name = meta.get("name") if isinstance(meta, dict) and isinstance(meta.get("name"), str) else os.path.basename(job_dir)
    job = JobUnderAudit(job_dir, name, scope, executor, client, num_rounds)
    job.kind  # refuse an unknown executor now
    return job
