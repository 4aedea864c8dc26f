"""What the POC tests share besides the job copies (:mod:`tests.integration.job_copies`): the
shortened failure detection of the test federations, watching a running job's rounds, the job
copies each federation runs, and ``medflare report`` on a downloaded result."""

from __future__ import annotations

import math
import os
from typing import Optional

from tests.integration.job_copies import JOBS_DIR, load_json, shipped_jobs, small_job
from medflare.cli.run_job import is_encrypted_job, job_data_kind

#: The server drops a silent client after 30 s instead of NVFlare's 600 s, and a task waiting only
#: for dropped clients ends 10 s after that instead of 60 + 30 s; otherwise each fault costs minutes.
FAST_FAILURE_DETECTION = {"NVFLARE_DEAD_CLIENT_GRACE_PERIOD": "10", "NVFLARE_DEAD_CLIENT_CHECK_LEAD_TIME": "10"}
HEARTBEAT_TIMEOUT = 30
#: jobs a test federation's server runs at once: every job of a test's batch (NVFlare's POC
#: default of 4 leaves the fifth waiting for a slot, a minute on two cores)
MAX_JOBS = 5
#: seconds the final evaluation waits for a site's scores in the POC tests' job copies
FINAL_EVAL_TIMEOUT = 30


#: the POC federations' sites
SITES = ["site-1", "site-2", "site-3"]


#: local steps per round of every POC job copy: the federations' sites are small (4 BraTS
#: subjects, 18 to 29 chest X-ray patients for training), so a DP-SGD step samples a large share
#: of them and is dear; at 2 steps a site runs every shipped job within one lifetime budget
#: (research: epsilon about 7.4 of 10 at site-3; clinical: about 6.1 of 8)
POC_LOCAL_STEPS = 2


def poc_job(job: str, dest: str, rounds: int = 2, **kwargs) -> str:
    """:func:`~tests.integration.job_copies.small_job` with 2 rounds of
    :data:`POC_LOCAL_STEPS` steps unless told otherwise and the POC tests' final-evaluation
    timeout; a heart-disease job asks for the three sites the federations have instead of
    FLamby's four hospitals. The server's end-of-run model export is left out (the simulator
    tests check it; under POC it costs each job an ONNX export on shared cores), except in the
    HE jobs, whose server skips it (it holds only ciphertexts)."""
    kwargs.setdefault("local_steps", POC_LOCAL_STEPS)
    kwargs.setdefault("export_models", job.endswith("_he"))
    if job_data_kind(os.path.join(JOBS_DIR, job)) == "heart":
        kwargs.setdefault("min_clients", len(SITES))
    return small_job(job, dest, rounds=rounds, final_eval_timeout=FINAL_EVAL_TIMEOUT, **kwargs)


def he_jobs() -> list[str]:
    """Every shipped job whose server adds CKKS ciphertexts (secure aggregation)."""
    return [job for job in shipped_jobs() if is_encrypted_job(os.path.join(JOBS_DIR, job))]


def plain_jobs(data_kind: Optional[str] = None) -> list[str]:
    """Every shipped job (training on ``data_kind``) whose server reads plaintext updates."""
    return [job for job in shipped_jobs(data_kind) if job not in he_jobs()]


def outcome_jobs() -> list[str]:
    """Every shipped heart-disease and chest X-ray job aggregated in plaintext."""
    return plain_jobs("heart") + plain_jobs("cxr")


def dp_sgd_jobs() -> list[str]:
    """Every shipped job whose executor trains with DP-SGD (the clinical default's jobs)."""
    return [
        job for job in shipped_jobs()
        if load_json(os.path.join(JOBS_DIR, job, "app", "config", "config_fed_client.json"))["executors"][0]["executor"]["args"].get("dp_sgd")
    ]


def exam_report(result_dir: str, out_dir: str) -> dict:
    """``medflare report`` on a downloaded result, as a researcher runs it; the JSON it wrote."""
    from medflare.cli.main import main

    assert main(["report", result_dir, "--out", out_dir]) == 0, result_dir
    return load_json(os.path.join(out_dir, "exam_report.json"))


def matrix_line(profile: str, job: str, status: str, seconds: float, report: Optional[dict] = None) -> str:
    """One row of the closing note's POC matrix: job, profile, status, wall time and EXAM's means."""
    line = f"POC matrix: {job} under {profile}: {status} after {seconds:.0f} s"
    if report is not None:
        m = report["means"]
        line += (
            f"; {report['metric']} mean local/global own {m['local_own']:.3f}/{m['global_own']:.3f}, "
            f"generalizability {m['local_generalizability']:.3f}/{m['global_generalizability']:.3f} "
            f"({report['global_model']})"
        )
    return line


def assert_complete_exam_table(report: dict, sites: list[str]) -> None:
    """Every site's local model scored on every site's test data, and EXAM's four measures
    finite for every site and for the means: nothing missing, nothing left out."""
    assert report["sites"] == sites, report["sites"]
    assert report["notes"] == [], report["notes"]
    assert report["models"][: len(sites)] == sites, report["models"]
    for row in report["matrix"]:
        assert all(v is not None and math.isfinite(v) for v in row), report["matrix"]
    for row in report["per_site"] + [report["means"]]:
        assert all(v is not None and math.isfinite(v) for k, v in row.items() if k != "site"), row


def rounds_recorded(federation, job_id: str) -> int:
    """Rounds the server has finished so far in a running job (read from its run folder)."""
    path = os.path.join(federation.workspace("server"), job_id, "medflare_metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())
