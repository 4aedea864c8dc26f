"""What the POC tests share besides the job copies (:mod:`tests.integration.job_copies`): the
shortened failure detection of the test federations, and watching a running job's rounds."""

from __future__ import annotations

import os

from tests.integration.job_copies import small_job

#: The server drops a silent client after 30 s instead of NVFlare's 600 s, and a task waiting only
#: for dropped clients ends 10 s after that instead of 60 + 30 s; otherwise each fault costs minutes.
FAST_FAILURE_DETECTION = {"NVFLARE_DEAD_CLIENT_GRACE_PERIOD": "10", "NVFLARE_DEAD_CLIENT_CHECK_LEAD_TIME": "10"}
HEARTBEAT_TIMEOUT = 30
#: seconds the final evaluation waits for a site's scores in the POC tests' job copies
FINAL_EVAL_TIMEOUT = 30


def poc_job(job: str, dest: str, rounds: int = 2, **kwargs) -> str:
    """:func:`~tests.integration.job_copies.small_job` with 2 rounds unless told otherwise and
    the POC tests' final-evaluation timeout."""
    return small_job(job, dest, rounds=rounds, final_eval_timeout=FINAL_EVAL_TIMEOUT, **kwargs)


def rounds_recorded(federation, job_id: str) -> int:
    """Rounds the server has finished so far in a running job (read from its run folder)."""
    path = os.path.join(federation.workspace("server"), job_id, "medflare_metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())
