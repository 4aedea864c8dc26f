"""What the POC tests share: small copies of the shipped jobs, and reading a job's results.

A job is copied only to make it fit CI on two cores: a smaller SegResNet, one local epoch, small
crops, fewer rounds, and a final-evaluation timeout in seconds instead of half an hour (so a site
killed during a test is given up quickly). Workflows, aggregator, persistor, filters, executor
and meta (scope included) are the job as shipped.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOBS_DIR = os.path.join(REPO, "jobs")
SMALL_NETWORK = {"init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}

#: The server drops a silent client after 30 s instead of NVFlare's 600 s, and a task waiting only
#: for dropped clients ends 10 s after that instead of 60 + 30 s; otherwise each fault costs minutes.
FAST_FAILURE_DETECTION = {"NVFLARE_DEAD_CLIENT_GRACE_PERIOD": "10", "NVFLARE_DEAD_CLIENT_CHECK_LEAD_TIME": "10"}
HEARTBEAT_TIMEOUT = 30


def shipped_jobs() -> list[str]:
    """Names of every job folder in ``jobs/``."""
    return sorted(n for n in os.listdir(JOBS_DIR) if os.path.isfile(os.path.join(JOBS_DIR, n, "meta.json")))


def _load(path):
    with open(path) as f:
        return json.load(f)


def _save(path, content):
    with open(path, "w") as f:
        json.dump(content, f, indent=2)


def small_job(job: str, dest: str, rounds: int = 2, name: Optional[str] = None, scope: Optional[str] = None) -> str:
    """Copy ``jobs/<job>`` into ``dest/<name>``, shrunk for CI (see the module docstring)."""
    name = name or job
    target = os.path.join(dest, name)
    if os.path.exists(target):
        shutil.rmtree(target)
    shutil.copytree(os.path.join(JOBS_DIR, job), target)
    meta_path = os.path.join(target, "meta.json")
    meta = _load(meta_path)
    meta["name"] = name
    if scope is not None:
        meta["scope"] = scope
    _save(meta_path, meta)
    for app in meta["deploy_map"]:
        config_dir = os.path.join(target, app, "config")
        server_path = os.path.join(config_dir, "config_fed_server.json")
        client_path = os.path.join(config_dir, "config_fed_client.json")
        if os.path.isfile(server_path):
            server = _load(server_path)
            if "model" in server:
                server["model"]["args"].update(SMALL_NETWORK)
            if "model_args" in server:
                server["model_args"].update(SMALL_NETWORK)
            if "num_rounds" in server:
                server["num_rounds"] = rounds
            for wf in server["workflows"]:
                if "num_rounds" in wf.get("args", {}) and wf["args"]["num_rounds"] != "{num_rounds}":
                    wf["args"]["num_rounds"] = rounds
                if wf["path"].endswith("GlobalModelEval"):
                    wf["args"]["validation_timeout"] = 30
            _save(server_path, server)
        if os.path.isfile(client_path):
            client = _load(client_path)
            for executor in client["executors"]:
                args = executor["executor"]["args"]
                args["model"]["args"].update(SMALL_NETWORK)
                args.update({"local_epochs": 1, "roi_size": [16, 16, 16], "val_roi_size": [32, 32, 32]})
            _save(client_path, client)
    return target


def job_filters(job: str) -> list[str]:
    """Class names of the result filters a shipped job brings itself, in order."""
    client = _load(os.path.join(JOBS_DIR, job, "app", "config", "config_fed_client.json"))
    return [f["path"].rsplit(".", 1)[-1] for chain in client.get("task_result_filters", []) for f in chain["filters"]]


def round_records(result_dir: str) -> list[dict]:
    """The per-round records the server wrote (``medflare_metrics.jsonl``) in a downloaded result."""
    path = os.path.join(result_dir, "workspace", "medflare_metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def rounds_recorded(federation, job_id: str) -> int:
    """Rounds the server has finished so far in a running job (read from its run folder)."""
    path = os.path.join(federation.workspace("server"), job_id, "medflare_metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())
