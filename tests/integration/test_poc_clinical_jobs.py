"""The clinical profile as shipped, in a real federation: every shipped job it admits completes
with EXAM's whole table within each site's one lifetime budget, and every job it does not admit
is refused by ``medflare job check --profile clinical`` before submission.

NVFlare POC mode: a server and three clients, each installed by ``medflare site install`` with
the clinical profile (default scope ``dp_sgd``, epsilon 8 for the site's lifetime) and all three
of its data sets at once (BraTS-layout volumes, a heart-disease table, chest X-rays), so the
jobs run one after another and side by side without a reinstall. The clinical default admits a
job whose network DP-SGD can train: the DP-SGD jobs, and the heart-disease jobs (logistic
regression, which the site trains with DP-SGD at its own least noise when the job names none).
The job copies take 2 rounds of 2 local steps (``tests.integration.poc_support``), so the five
admitted jobs spend about epsilon 6.1 of 8 at the smallest site; the budget is the profile's.
"""

from __future__ import annotations

import os
import time

import pytest

from medflare.federation.poc_federation import PocFederation
from medflare.jobs.job_check import check_job
from medflare.privacy.budget_ledger import LEDGER_FILE_NAME, PrivacyBudgetLedger
from medflare.wire_contract import DP_SGD
from tests.integration.job_copies import JOBS_DIR, job_filters, round_records, shipped_jobs
from tests.integration.poc_support import (
    FAST_FAILURE_DETECTION,
    HEARTBEAT_TIMEOUT,
    MAX_JOBS,
    POC_LOCAL_STEPS,
    SITES,
    assert_complete_exam_table,
    exam_report,
    he_jobs,
    matrix_line,
    poc_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.poc]

#: the shipped jobs the clinical default admits (DP-SGD can train their networks)
ADMITTED = ["brats_dpsgd", "cxr_emr_dpsgd", "heart_disease_dpsgd", "heart_disease_fedavg", "heart_disease_fedyogi"]
SITE_DP_SGD = {"filter": "PatientDPSGDFilter", "source": "site"}


@pytest.fixture(scope="module")
def federation(tmp_path_factory, poc_site_datasets):
    root = tmp_path_factory.mktemp("poc_clinical")
    fed = PocFederation(str(root), clients=3, env=FAST_FAILURE_DETECTION, heartbeat_timeout=HEARTBEAT_TIMEOUT, max_jobs=MAX_JOBS, log=print)
    with fed:
        fed.prepare()
        fed.install_server()
        for site in fed.sites:
            fed.install_site(site, "clinical", poc_site_datasets[site], gpus=0)
        fed.start()
        yield fed


def test_job_check_admits_exactly_the_jobs_the_clinical_default_can_train():
    for job in shipped_jobs():
        check = check_job(os.path.join(JOBS_DIR, job), profile="clinical")
        if job in ADMITTED:
            assert check.ok, (job, check.problems)
        elif job in he_jobs():  # secure aggregation: a research scope; the clinical profile defines none
            assert not check.ok and "is not defined by the profile clinical" in check.problems[0], (job, check.problems)
        else:  # BatchNorm or in-place layers: every train task would be refused at every site
            assert not check.ok and "requires patient-level DP-SGD" in check.problems[0], (job, check.problems)
            assert "DP-SGD cannot train this network" in check.problems[0], (job, check.problems)


def test_every_admitted_job_completes_with_exams_whole_table_within_the_sites_budget(federation, tmp_path):
    start = time.time()
    submitted = {job: federation.submit(poc_job(job, str(tmp_path))) for job in ADMITTED}

    for job, job_id in submitted.items():
        meta = federation.wait(job_id, timeout=900)
        seconds = time.time() - start
        assert meta["status"] == "FINISHED:COMPLETED", (job, meta)
        result = federation.download(job_id, str(tmp_path / "results"))
        records = round_records(result)
        assert [r["round"] for r in records] == [0, 1], job
        own = [{"filter": name, "source": "job"} for name in job_filters(job)]
        for record in records:
            assert sorted(record["aggregation"]["accepted"]) == SITES, (job, record["aggregation"])
            for site, seen in record["sites"].items():
                # the site's DP-SGD filter first (it charged), then the job's own, if any
                assert seen["filters_applied"] == [SITE_DP_SGD] + own, (job, site, seen["filters_applied"])
                dp = seen["privacy"][DP_SGD]
                assert dp["noise_multiplier"] >= 1.0 and dp["max_grad_norm"] <= 1.0 and dp["secure_noise"] is True, (job, dp)
                assert seen["steps"] is None and seen["global_model_metrics"] == {}, (job, site)  # nothing data-dependent
        if job != "brats_dpsgd":  # the outcome jobs: the site-only models left with DP-SGD, charged
            report = exam_report(result, str(tmp_path / "reports" / job))
            print(matrix_line("clinical", job, meta["status"], seconds, report))
            assert_complete_exam_table(report, SITES)
            assert report["global_model"] == "SRV_FL_global_model.pt"  # no best model: the scores stay home
        else:
            print(matrix_line("clinical", job, meta["status"], seconds))
            assert os.path.isfile(os.path.join(result, "workspace", "cross_site_val", "cross_val_results.json"))

    # each site's ledger holds every job's releases, composed, within the profile's epsilon 8
    for site in SITES:
        ledger_path = os.path.join(federation.workspace(site), "local", LEDGER_FILE_NAME)
        releases = PrivacyBudgetLedger.read_releases(ledger_path)
        assert {r["job_id"] for r in releases} == set(submitted.values()), site
        assert all(r["mechanism"] == "dp_sgd" for r in releases), site
        for job, job_id in submitted.items():
            # one release per round, charged once though a job may carry the filter too, and
            # for the outcome jobs the site-only model's record of both rounds' steps
            mine = [r for r in releases if r["job_id"] == job_id]
            rounds = [r for r in mine if r["round"] in (0, 1) and r["steps"] == POC_LOCAL_STEPS]
            assert len(rounds) == 2, (site, job, mine)
            site_only = [r for r in mine if r not in rounds]
            expected = [] if job == "brats_dpsgd" else [2 * POC_LOCAL_STEPS]
            assert [r["steps"] for r in site_only] == expected, (site, job, mine)
        ledger = PrivacyBudgetLedger.open_site(os.path.dirname(ledger_path))
        print(f"{site}: {len(releases)} releases, epsilon {ledger.epsilon_spent():.3f} of 8")
        assert 0.0 < ledger.epsilon_spent() < 8.0, site
