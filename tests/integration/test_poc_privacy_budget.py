"""A site whose privacy budget is spent keeps its results home: across jobs and a client restart.

Three POC clients: site-1 and site-2 with the research profile, site-3 with the clinical
profile's policy but a budget of epsilon 2.0, which covers exactly one Gaussian release at noise
multiplier 2.4 (epsilon 1.77 at delta 1e-5). The first job spends it in round 0; from round 1
on, and in the next job after site-3's client was killed and started again, every training
result of site-3 is blocked at the site (``TASK_RESULT_FILTER_ERROR``) while the other two sites
carry the jobs to completion.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from medflare.cli.budget import format_budget
from medflare.federation.poc_federation import PocFederation
from medflare.privacy.accounting import epsilon_spent
from medflare.privacy.budget_ledger import LEDGER_FILE_NAME, PrivacyBudgetLedger
from medflare.privacy.site_budget import SITE_BUDGET_FILE_NAME
from medflare.wire_contract import DATA_DEPENDENT_META
from medflare.sites.site_profiles import resolve_profile
from tests.integration.job_copies import round_records
from tests.integration.poc_support import FAST_FAILURE_DETECTION, HEARTBEAT_TIMEOUT, poc_job

pytestmark = [pytest.mark.integration, pytest.mark.poc]

BUDGET = 2.0


@pytest.fixture(scope="module")
def federation(tmp_path_factory, poc_site_data):
    root = tmp_path_factory.mktemp("poc_budget")
    # a clinical profile with a one-release budget, installed from its folder
    clinical = resolve_profile("clinical")
    profile = root / "clinical_one_release"
    profile.mkdir()
    # the lifetime cap is the site's own file, not a filter argument
    (profile / "privacy.json").write_text(json.dumps(clinical.privacy))
    (profile / "resources.json").write_text(json.dumps(clinical.resources))
    (profile / SITE_BUDGET_FILE_NAME).write_text(json.dumps(dict(clinical.budget_content, max_epsilon=BUDGET)))

    fed = PocFederation(str(root), clients=3, env=FAST_FAILURE_DETECTION, heartbeat_timeout=HEARTBEAT_TIMEOUT, log=print)
    with fed:
        fed.prepare()
        fed.install_server()
        fed.install_site("site-1", "research", poc_site_data["site-1"], gpus=0)
        fed.install_site("site-2", "research", poc_site_data["site-2"], gpus=0)
        fed.install_site("site-3", str(profile), poc_site_data["site-3"], gpus=0)
        fed.start()
        yield fed


def _ledger(federation):
    return os.path.join(federation.workspace("site-3"), "local", LEDGER_FILE_NAME)


def test_an_exhausted_budget_blocks_results_across_jobs_and_a_client_restart(federation, tmp_path):
    one_release = epsilon_spent([(2.4, 1)], 1e-5, "rdp")
    assert one_release <= BUDGET < epsilon_spent([(2.4, 2)], 1e-5, "rdp")

    # job 1: site-3 releases once, then its budget is spent
    first = federation.submit(poc_job("brats_fedavg", str(tmp_path), rounds=2, name="brats_budget_1"))
    assert federation.wait(first, timeout=600)["status"] == "FINISHED:COMPLETED"
    records = round_records(federation.download(first, str(tmp_path / "results")))
    round0, round1 = records
    assert sorted(round0["aggregation"]["accepted"]) == ["site-1", "site-2", "site-3"]
    released = round0["sites"]["site-3"]
    assert released["filters_applied"] == [{"filter": "GaussianPrivacyFilter", "source": "site"}]
    assert released["privacy"]["medflare_gaussian_dp"]["epsilon_site"] == pytest.approx(one_release)
    assert released["privacy"]["medflare_gaussian_dp"]["max_epsilon"] == BUDGET
    assert "site-3" not in round1["sites"] and sorted(round1["aggregation"]["accepted"]) == ["site-1", "site-2"]
    # what the server receives: the research sites' data-dependent meta, nothing of the clinical site's
    print("server received in round 0:", json.dumps(round0["sites"], indent=1, default=str))
    print("aggregation of round 0:", json.dumps(round0["aggregation"], default=str))
    for site in ("site-1", "site-2"):
        assert round0["sites"][site]["steps"] > 0 and round0["sites"][site]["train_loss"] is not None
    assert released["steps"] is None and released["train_loss"] is None and released["train_seconds"] is None
    assert released["global_model_metrics"] == {}
    assert round0["aggregation"]["weighting"].startswith("equal (weight withheld by: site-3")
    assert len(PrivacyBudgetLedger.read_releases(_ledger(federation))) == 1
    assert len(_blocked_rounds(federation, first, 1)) == 1  # the site's log says why round 1 is missing

    # the client goes down hard and comes back: the budget is on disk, not in the process
    federation.restart_client("site-3")  # SIGKILL to all its processes, start.sh, registered again

    # job 2: nothing of site-3 reaches the server in any round
    second = federation.submit(poc_job("brats_fedavg", str(tmp_path), rounds=2, name="brats_budget_2"))
    meta = federation.wait(second, timeout=600)
    assert meta["status"] == "FINISHED:COMPLETED"
    assert "site-3: OK" in meta["job_deploy_detail"]  # the restarted site-3 took part
    for record in round_records(federation.download(second, str(tmp_path / "results"))):
        assert "site-3" not in record["sites"]
        assert sorted(record["aggregation"]["accepted"]) == ["site-1", "site-2"]
    assert len(PrivacyBudgetLedger.read_releases(_ledger(federation))) == 1
    assert len(_blocked_rounds(federation, second, 2)) == 2

    # the site admin's view of the budget agrees
    shown = format_budget(_ledger(federation))
    assert "releases: 1" in shown and f"remaining: {BUDGET - one_release:.4g}" in shown


def _blocked_rounds(federation, job_id: str, expected: int, timeout: float = 60.0) -> list[str]:
    """The lines of site-3's job log where NVFlare reports the filter blocking a training result.

    The client's job process may still be closing its log when the server reports the job
    finished, so the log is read until ``expected`` lines are there or ``timeout`` passes.
    """
    path = os.path.join(federation.workspace("site-3"), job_id, "log.txt")
    deadline = time.time() + timeout
    while True:
        lines = []
        if os.path.isfile(path):
            with open(path) as f:
                lines = [
                    line
                    for line in f
                    if "Processing error in Task Result Filter" in line
                    and "GaussianPrivacyFilter: privacy budget exhausted" in line
                ]
        if len(lines) >= expected or time.time() > deadline:
            return lines
        time.sleep(1.0)
