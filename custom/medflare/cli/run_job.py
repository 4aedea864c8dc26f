"""``medflare run``: run a job folder through its recipe on NVFlare's ``SimEnv``, on local
(generated) sites.

The job folder becomes a :class:`medflare.recipes.recipe.MedflareRecipe` run on ``SimEnv``
(NVFlare 2.9's Job API; the ``nvflare simulator`` command is deprecated) in a child process
(:mod:`medflare.recipes.simulate`), whose output goes to the log while this process prints the
rounds as the server records them.

Workspace layout (default ``./workspace``)::

    workspace/data/brats/site-N/...          generated BraTS-layout sites, reused when unchanged
    workspace/simulation/<job>/              the SimEnv workspace (server/, site-N/, local/); the
                                             simulator empties it at start, all but local/
    workspace/runs/<job>/simulator.log       everything the simulator printed
    workspace/runs/<job>/<metric>_per_round.png  plot of the global model per round (Dice, or AUC)
    workspace/runs/<job>/summary.txt         the closing table
    workspace/runs/<job>/exam_report.md      EXAM's measures, for jobs whose cross-site evaluation
                                             scored each site's own model (also .json, .csv, .png)
    workspace/simulation/<job>/server/simulate_job/app_server/
                                             the global models and their TorchScript/ONNX exports
                                             (model_exports.json: printed after the run)

The job folder is used unchanged; only ``--rounds`` makes a patched copy (``runs/<job>/job``).
Before anything runs, the job goes through ``medflare job check`` (:mod:`medflare.jobs.job_check`,
without a site policy: the simulator applies none), so a typo in an argument is refused with
"did you mean" here instead of ending the run ``FINISHED:ABNORMAL`` at the sites.
Sites find their data through ``MEDFLARE_DATA_CONFIG`` set for the simulator process, exactly
as a real site would through its environment or ``local/medflare_data.json``, and their privacy
budget through ``MEDFLARE_PRIVACY_BUDGET``: every simulated site gets the research profile's
budget (:func:`medflare.recipes.recipe.prepare_simulation`). Simulated sites start fresh each
run (their folders in the simulator workspace are removed first): a simulated site's ledger is
not a hospital's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

__all__ = ["RunOptions", "run_job", "JobRunError", "set_num_rounds", "job_data_kind", "DATA_KINDS"]


class JobRunError(RuntimeError):
    """The job could not be prepared, or the simulator did not complete it."""


@dataclass
class RunOptions:
    job_dir: str
    sites: Optional[int] = None  # None: the job's data default (DATA_KINDS)
    rounds: Optional[int] = None
    workspace: str = "workspace"
    data_dir: Optional[str] = None
    cases: Optional[int] = None
    size: Optional[int] = None
    seed: int = 0
    threads: Optional[int] = None
    gpu: Optional[str] = None
    tracking: Optional[str] = None  # "tensorboard" | "mlflow": NVFlare's receiver on the server


def _server_config_path(job_dir: str) -> str:
    meta = _read_json(os.path.join(job_dir, "meta.json"))
    for app, targets in meta.get("deploy_map", {}).items():
        if "server" in targets or "@ALL" in targets:
            return os.path.join(job_dir, app, "config", "config_fed_server.json")
    raise JobRunError(f"{job_dir}/meta.json deploys no app to the server")


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise JobRunError(f"not found: {path}") from None
    except ValueError as e:
        raise JobRunError(f"not valid JSON: {path}: {e}") from None


def set_num_rounds(server_config: dict, rounds: int) -> bool:
    """Set ``num_rounds`` in a server config: the top-level variable and any workflow argument
    that does not refer to it; returns whether there was one to set."""
    patched = False
    if "num_rounds" in server_config:
        server_config["num_rounds"] = rounds
        patched = True
    for wf in server_config.get("workflows", []):
        if "num_rounds" in wf.get("args", {}) and wf["args"]["num_rounds"] != "{num_rounds}":
            wf["args"]["num_rounds"] = rounds
            patched = True
    return patched


def _with_rounds(job_dir: str, rounds: int, run_dir: str) -> str:
    """Copy the job into the run folder with ``num_rounds`` set to ``rounds``."""
    copy_dir = os.path.join(run_dir, "job")
    if os.path.exists(copy_dir):
        shutil.rmtree(copy_dir)
    shutil.copytree(job_dir, copy_dir)
    path = _server_config_path(copy_dir)
    config = _read_json(path)
    if not set_num_rounds(config, rounds):
        raise JobRunError(f"--rounds given but {path} has no num_rounds to set")
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    return copy_dir


#: the generated data each kind of job trains on, and its defaults
DATA_KINDS = {
    "brats": {"sites": 3, "cases": 12, "size": 48},
    "heart": {"sites": 4, "cases": None, "size": None},  # four real hospitals
    "cxr": {"sites": 4, "cases": 80, "size": 64},
}


def job_data_kind(job_dir: str) -> str:
    """Which built-in data a job trains on, read from its client executor: ``"brats"`` for the
    segmentation executor, ``"cxr"`` for the outcome executor with an image column, ``"heart"``
    for it without one."""
    meta = _read_json(os.path.join(job_dir, "meta.json"))
    for app, targets in meta.get("deploy_map", {}).items():
        if targets == ["server"]:
            continue
        config = _read_json(os.path.join(job_dir, app, "config", "config_fed_client.json"))
        for entry in config.get("executors", []):
            executor = entry.get("executor", {})
            if str(executor.get("path", "")).endswith("OutcomeExecutor"):
                return "cxr" if executor.get("args", {}).get("image_column") else "heart"
    return "brats"


def _site_data(opts: RunOptions, kind: str, log) -> str:
    """The ``MEDFLARE_DATA_CONFIG`` template for the simulated sites, generating data if needed."""
    if opts.data_dir:
        template = os.path.join(os.path.abspath(opts.data_dir), "{site_name}", "data_config.json")
        for i in range(1, opts.sites + 1):
            path = template.replace("{site_name}", f"site-{i}")
            if not os.path.isfile(path):
                raise JobRunError(f"--data {opts.data_dir}: no data configuration for site-{i} at {path}")
        return template
    data_root = os.path.abspath(os.path.join(opts.workspace, "data", kind))
    defaults = DATA_KINDS[kind]
    cases = opts.cases if opts.cases is not None else defaults["cases"]
    size = opts.size if opts.size is not None else defaults["size"]
    start = time.time()
    if kind == "heart":
        from medflare.data.heart_disease import write_heart_sites

        if opts.sites != 4:
            raise JobRunError(f"the heart-disease data has 4 hospitals; --sites must be 4, got {opts.sites}")
        write_heart_sites(data_root)
    elif kind == "cxr":
        from medflare.data.cxr_synthetic import generate_cxr_sites

        generate_cxr_sites(data_root, opts.sites, cases, size, opts.seed, log=log)
    else:
        from medflare.data.brats_synthetic import generate_sites

        generate_sites(data_root, opts.sites, cases, size, opts.seed, log=log)
    log(f"site data ready in {time.time() - start:.0f} s: {data_root}")
    return os.path.join(data_root, "{site_name}", "data_config.json")


def _check_before_running(job_dir: str, log) -> None:
    """``medflare job check`` without a site policy (the simulator applies none): a job that
    the server or a site would refuse is refused here, before data is generated or a process
    started."""
    from medflare.jobs.job_check import check_job

    check = check_job(job_dir)
    if not check.ok:
        problems = "\n".join(f"  - {p}" for p in check.problems)
        raise JobRunError(
            f"job {job_dir} would fail at the server or a site (medflare job check); nothing was run:\n{problems}"
        )
    if is_encrypted_job(job_dir):
        raise JobRunError(
            f"job {job_dir} aggregates CKKS ciphertexts (secure aggregation), which needs a federation provisioned "
            "with NVFlare's HEBuilder: its simulator provisions no keys and applies no site scope, so the sites "
            "would encrypt nothing and the server would refuse every contribution. Run it in POC mode: "
            "nvflare poc prepare -he, medflare site install --profile research, then submit it (docs/submitting-jobs.md)"
        )
    log(f"job check: OK ({len(check.checked)} configs built against the sites' allow-list)")


def is_encrypted_job(job_dir: str) -> bool:
    """Whether the job's server aggregates ciphertexts (medflare's ``EncryptedSumAggregator``)."""
    from medflare.recipes.recipe import aggregates_ciphertexts

    try:
        return aggregates_ciphertexts(_read_json(os.path.join(job_dir, "app", "config", "config_fed_server.json")))
    except JobRunError:
        return False


def _with_tracking(job_dir: str, tracking: str, run_dir: str) -> str:
    """A copy of the job with ``tracking`` experiment tracking (:mod:`medflare.recipes.tracking`)."""
    from medflare.recipes.job_definition import JobDefinition, JobDefinitionError
    from medflare.recipes.tracking import with_tracking

    try:
        definition = with_tracking(JobDefinition.from_folder(job_dir), tracking)
    except JobDefinitionError as e:
        raise JobRunError(f"--tracking {tracking}: {e}") from None
    return definition.write(os.path.join(run_dir, "tracked"))


def _job_folder(job: str, workspace: str) -> str:
    """The job folder to run: ``job`` itself, or a shipped job's name exported from its study
    definition into ``workspace/jobs/`` (so a wheel install runs them without a checkout)."""
    job_dir = os.path.abspath(job.rstrip("/"))
    if os.path.isfile(os.path.join(job_dir, "meta.json")):
        return job_dir
    from medflare.recipes.shipped_jobs import SHIPPED_JOBS

    if job in SHIPPED_JOBS:
        return SHIPPED_JOBS[job]().write(os.path.abspath(os.path.join(workspace, "jobs")))
    raise JobRunError(
        f"{job} is neither a job folder (no meta.json there) nor a shipped job's name ({', '.join(SHIPPED_JOBS)})"
    )


def _print(message: str) -> None:
    print(message, flush=True)


def run_job(opts: RunOptions, log=_print) -> dict:
    """Prepare sites, run the job in the simulator while printing per-round progress, then
    print the summary and save the plot.

    Returns:
        ``{"records", "global_eval", "run_dir", "simulation_dir", "server_run_dir", "plot", "report",
        "wall_seconds"}``.

    Raises:
        JobRunError: bad job folder or options, or the simulator failed.
    """
    from medflare.reporting import run_summary
    from medflare.reporting.cross_site_report import SERVER_MODEL_PREFIX, exam_measures, format_report, write_report
    from medflare.reporting.round_metrics_writer import METRICS_FILE_NAME

    started = time.time()
    job_dir = _job_folder(opts.job_dir, opts.workspace)
    kind = job_data_kind(job_dir)
    if opts.sites is None:
        opts = dataclasses.replace(opts, sites=DATA_KINDS[kind]["sites"])
    if isinstance(opts.sites, bool) or not isinstance(opts.sites, int) or not 1 <= opts.sites <= 64:
        raise JobRunError(f"--sites must be in [1, 64], got {opts.sites!r}")
    meta = _read_json(os.path.join(job_dir, "meta.json"))
    min_clients = meta.get("min_clients", 1)
    if opts.sites < min_clients:
        raise JobRunError(f"job {meta.get('name')} needs at least {min_clients} sites (min_clients), --sites is {opts.sites}")
    name = meta.get("name") or os.path.basename(job_dir)
    run_dir = os.path.abspath(os.path.join(opts.workspace, "runs", name))
    os.makedirs(run_dir, exist_ok=True)
    if opts.rounds is not None:
        if isinstance(opts.rounds, bool) or not isinstance(opts.rounds, int) or opts.rounds < 1:
            raise JobRunError(f"--rounds must be a positive int, got {opts.rounds!r}")
        job_dir = _with_rounds(job_dir, opts.rounds, run_dir)
    if opts.tracking is not None:
        job_dir = _with_tracking(job_dir, opts.tracking, run_dir)

    _check_before_running(job_dir, log)

    env = dict(os.environ)
    site_data = _site_data(opts, kind, log)
    threads = opts.threads or opts.sites
    if "OMP_NUM_THREADS" not in os.environ:
        # one process per simulated site: share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // threads))
    # SimEnv's workspace is <workspace_root>/<job name>
    simulation_root = os.path.abspath(os.path.join(opts.workspace, "simulation"))
    simulation_dir = os.path.join(simulation_root, name)
    cmd = [sys.executable, "-m", "medflare.recipes.simulate", job_dir, "--workspace-root", simulation_root]
    cmd += ["-n", str(opts.sites), "-t", str(threads), "--site-data", site_data]
    if opts.gpu:
        cmd += ["--gpu", opts.gpu]
    server_run_dir = os.path.join(simulation_dir, "server", "simulate_job")
    metrics_path = os.path.join(server_run_dir, METRICS_FILE_NAME)
    log_path = os.path.join(run_dir, "simulator.log")
    log(f"running {name} on {opts.sites} sites on NVFlare's SimEnv; log: {log_path}")
    if os.path.exists(metrics_path):
        os.remove(metrics_path)

    shown = 0
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        while True:
            done = proc.poll() is not None
            records = run_summary.read_round_records(metrics_path)
            for record in records[shown:]:
                log(run_summary.format_round_line(record, "dice" if kind == "brats" else "outcome"))
            shown = len(records)
            if done:
                break
            time.sleep(1.0)
    records = run_summary.read_round_records(metrics_path)
    global_eval = run_summary.read_global_eval(server_run_dir)
    wall = time.time() - started
    if proc.returncode != 0 or not records:
        tail = _tail(log_path, 30)
        raise JobRunError(
            f"simulator exited with {proc.returncode} after {wall:.0f} s with {len(records)} rounds recorded; "
            f"last lines of {log_path}:\n{tail}"
        )
    summary = run_summary.format_summary(records, global_eval, wall)
    log(summary)
    with open(os.path.join(run_dir, "summary.txt"), "w") as f:
        f.write(summary + "\n")
    metric = "dice" if run_summary.record_kind(records, global_eval) == "dice" else "auc"
    from medflare.optional_dependencies import MissingDependency

    try:
        plot = run_summary.plot_metrics_per_round(
            records, global_eval, os.path.join(run_dir, f"{metric}_per_round.png"), title=f"{name}: global model per round"
        )
        log(f"plot: {plot}")
    except MissingDependency as e:
        plot = None
        log(f"no plot: {e}")
    report_paths = {}
    if metric == "auc" and any(not m.startswith(SERVER_MODEL_PREFIX) for models in global_eval.values() for m in models):
        # cross-site evaluation scored the sites' own models too: EXAM's measures

        measures = exam_measures(global_eval, metric="auc")
        log(format_report(measures))
        report_paths = write_report(measures, run_dir)
        log(f"report: {report_paths['md']}, heatmap: {report_paths.get('png', 'none (needs matplotlib)')}")
    log(f"global models: {os.path.join(server_run_dir, 'app_server')}")
    from medflare.export.global_model_exporter import export_summary_lines

    for line in export_summary_lines(os.path.join(server_run_dir, "app_server")):
        log(line)
    tracking_dir = os.path.join(server_run_dir, "tb_events")
    if os.path.isdir(tracking_dir):
        log(f"TensorBoard: tensorboard --logdir {tracking_dir}")
    return {
        "records": records,
        "global_eval": global_eval,
        "run_dir": run_dir,
        "simulation_dir": simulation_dir,
        "server_run_dir": server_run_dir,
        "plot": plot,
        "report": report_paths,
        "wall_seconds": wall,
    }


def _tail(path: str, n: int) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""
