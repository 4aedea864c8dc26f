"""Small copies of the shipped jobs for the integration tests, and reading a job's results.

A job is copied only to make it fit CI on two cores: a smaller SegResNet, one local epoch, small
crops, optionally fewer rounds, fewer required clients (the heart-disease jobs need FLamby's four
hospitals; the POC federations have three sites) and a final-evaluation timeout in seconds
instead of half an hour (so a site killed during a test is given up quickly). Workflows, aggregator, persistor, filters,
executor and meta (scope included) are the job as shipped.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from medflare.cli.run_job import job_data_kind, set_num_rounds

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOBS_DIR = os.path.join(REPO, "jobs")
SMALL_NETWORK = {"init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}


def shipped_jobs(data_kind: Optional[str] = None) -> list[str]:
    """Names of every job folder in ``jobs/``, or of those training on ``data_kind`` data
    (``"brats"``, ``"heart"`` or ``"cxr"``, see :func:`medflare.cli.run_job.job_data_kind`)."""
    names = sorted(n for n in os.listdir(JOBS_DIR) if os.path.isfile(os.path.join(JOBS_DIR, n, "meta.json")))
    return [n for n in names if data_kind is None or job_data_kind(os.path.join(JOBS_DIR, n)) == data_kind]


def load_json(path):
    with open(path) as f:
        return json.load(f)


def save_json(path, content):
    with open(path, "w") as f:
        json.dump(content, f, indent=2)


def small_job(
    job: str,
    dest: str,
    rounds: Optional[int] = None,
    name: Optional[str] = None,
    scope: Optional[str] = None,
    final_eval_timeout: Optional[int] = None,
    min_clients: Optional[int] = None,
    local_steps: Optional[int] = None,
    export_models: bool = True,
) -> str:
    """Copy ``jobs/<job>`` into ``dest/<name>``, shrunk for CI (see the module docstring; only
    segmentation jobs have a network to shrink); ``rounds``, ``scope`` and
    ``final_eval_timeout`` (seconds), ``min_clients`` (``meta.json`` and the workflows) and
    ``local_steps`` (an outcome executor's ``local_steps``, a segmentation executor's
    ``max_steps_per_round``: fewer DP-SGD steps spend less of a site's budget, so one site
    can run every job) are set when given. ``export_models=False`` leaves out the server's
    end-of-run model export (a CI cut where a test does not look at the exports)."""
    name = name or job
    shrink = job_data_kind(os.path.join(JOBS_DIR, job)) == "brats"
    target = os.path.join(dest, name)
    if os.path.exists(target):
        shutil.rmtree(target)
    shutil.copytree(os.path.join(JOBS_DIR, job), target)
    meta_path = os.path.join(target, "meta.json")
    meta = load_json(meta_path)
    meta["name"] = name
    if scope is not None:
        meta["scope"] = scope
    if min_clients is not None:
        meta["min_clients"] = min_clients
    save_json(meta_path, meta)
    for app in meta["deploy_map"]:
        config_dir = os.path.join(target, app, "config")
        server_path = os.path.join(config_dir, "config_fed_server.json")
        client_path = os.path.join(config_dir, "config_fed_client.json")
        if os.path.isfile(server_path):
            server = load_json(server_path)
            if shrink and "model" in server:
                server["model"]["args"].update(SMALL_NETWORK)
            if shrink and "model_args" in server:
                server["model_args"].update(SMALL_NETWORK)
            if rounds is not None:
                set_num_rounds(server, rounds)
            if min_clients is not None:
                for wf in server["workflows"]:
                    if "min_clients" in wf["args"]:
                        wf["args"]["min_clients"] = min_clients
            if not export_models:
                server["components"] = [c for c in server["components"] if c.get("id") != "model_exporter"]
            if final_eval_timeout is not None:
                for wf in server["workflows"]:
                    if wf["path"].endswith(("GlobalModelEval", "CrossSiteModelEval")):
                        wf["args"]["validation_timeout"] = final_eval_timeout
            save_json(server_path, server)
        if (shrink or local_steps is not None) and os.path.isfile(client_path):
            client = load_json(client_path)
            for executor in client["executors"]:
                args = executor["executor"]["args"]
                if shrink:
                    # a bundle model names its bundle and carries the server's plain network beside it
                    model = args["model"]["network"] if "bundle" in args["model"] else args["model"]
                    model["args"].update(SMALL_NETWORK)
                    args.update({"local_epochs": 1, "roi_size": [16, 16, 16], "val_roi_size": [32, 32, 32]})
                if local_steps is not None:
                    args["max_steps_per_round" if shrink else "local_steps"] = local_steps
            save_json(client_path, client)
    return target


def job_filters(job: str) -> list[str]:
    """Class names of the result filters a shipped job brings itself, in order."""
    client = load_json(os.path.join(JOBS_DIR, job, "app", "config", "config_fed_client.json"))
    return [f["path"].rsplit(".", 1)[-1] for chain in client.get("task_result_filters", []) for f in chain["filters"]]


def round_records(result_dir: str) -> list[dict]:
    """The per-round records the server wrote (``medflare_metrics.jsonl``) in a downloaded result."""
    path = os.path.join(result_dir, "workspace", "medflare_metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def tensorboard_series(tb_dir: str) -> dict:
    """``{origin: {tag: [(step, value), ...]}}`` of the TensorBoard event files under ``tb_dir``
    (one folder per origin, as NVFlare's ``TBAnalyticsReceiver`` writes them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series = {}
    for origin in sorted(os.listdir(tb_dir)):
        events = EventAccumulator(os.path.join(tb_dir, origin))
        events.Reload()
        series[origin] = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return series
