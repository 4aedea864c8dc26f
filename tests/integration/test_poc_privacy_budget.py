"""The clinical profile's default scope in a real federation: patient-level DP-SGD trains the CXR
job, the server receives nothing but DP-SGD-recorded updates, a non-DP job is refused at every
site, and a site whose budget is spent keeps its results home across jobs and a client restart.

Three POC clients, all installed with the clinical profile (default scope ``dp_sgd``) on small
generated chest X-ray sites: site-1 and site-2 with the profile's budget (epsilon 8), site-3 with
a budget that covers exactly one round of the job (its per-patient epsilon after one round's
DP-SGD steps, but not two). The job is ``cxr_emr_dpsgd`` as shipped (it carries
``PatientDPSGDFilter`` itself, behind the site's), shortened to 2 rounds of 2 steps:

1. it completes; the server's round records show only contributions with a valid DP-SGD record
   (z at least the site's 1.0 and the job's 1.7, C at most 1, secure noise, epsilon within the
   cap) and no data-dependent meta; each site's ledger holds one ``dp_sgd`` release per round
   (and the site-only model's at ``submit_model``), and ``medflare budget show`` names the job
   and its per-patient epsilon. site-3 releases round 0 and is blocked from round 1 on;
2. ``cxr_emr_fedavg`` (BatchNorm ResNet, no DP-SGD) is refused in every round at every site with
   a log line naming the network's layers and the DP-SGD job to use; no epsilon is charged;
3. site-3's client is killed and started again; in a second run of the DP job nothing of site-3
   reaches the server, while site-1 and site-2 carry it to completion.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import time

import pytest

from medflare.federation.poc_federation import PocFederation
from medflare.privacy.accounting import epsilon_of_history
from medflare.privacy.budget_ledger import LEDGER_FILE_NAME, PrivacyBudgetLedger
from medflare.privacy.site_budget import SITE_BUDGET_FILE_NAME
from medflare.sites.site_profiles import resolve_profile
from medflare.wire_contract import DATA_DEPENDENT_META, DP_SGD, FILTER_HISTORY, FILTERS_APPLIED
from tests.integration.job_copies import load_json, round_records, save_json
from tests.integration.poc_support import FAST_FAILURE_DETECTION, HEARTBEAT_TIMEOUT, poc_job

pytestmark = [pytest.mark.integration, pytest.mark.poc]

JOB = "cxr_emr_dpsgd"
LOCAL_STEPS = 2
ROUNDS = 2
SITES = ["site-1", "site-2", "site-3"]
DELTA = 1e-5
#: what a released DP-SGD result may carry to the server, and nothing else
RELEASED_META = {DP_SGD, FILTERS_APPLIED, FILTER_HISTORY}


def _training_patients(data_config: str) -> int:
    config = load_json(data_config)
    table = os.path.join(os.path.dirname(data_config), config["datalist"])
    with open(table, newline="") as f:
        return sum(1 for row in csv.DictReader(f) if row["split"] == "train")


def _job_dp_sgd() -> dict:
    client = load_json(os.path.join(os.path.dirname(__file__), "..", "..", "jobs", JOB, "app", "config", "config_fed_client.json"))
    return client["executors"][0]["executor"]["args"]["dp_sgd"]


@pytest.fixture(scope="module")
def cxr_sites(tmp_path_factory):
    """Three generated chest X-ray sites (43, 39 and 27 patients; 29, 26 and 18 for training)."""
    from medflare.data.cxr_synthetic import generate_cxr_sites

    return generate_cxr_sites(str(tmp_path_factory.mktemp("poc_cxr_sites")), sites=3, cases=32, size=32, seed=0)


@pytest.fixture(scope="module")
def one_round_budget(cxr_sites):
    """site-3's cap: its epsilon after one round of the job's DP-SGD steps, with room to spare
    below two rounds."""
    dp = _job_dp_sgd()
    q = dp["expected_patients_per_step"] / _training_patients(cxr_sites["site-3"])
    one = epsilon_of_history([(dp["noise_multiplier"], q, LOCAL_STEPS)], DELTA)
    two = epsilon_of_history([(dp["noise_multiplier"], q, 2 * LOCAL_STEPS)], DELTA)
    return one, (one + two) / 2


@pytest.fixture(scope="module")
def federation(tmp_path_factory, cxr_sites, one_round_budget):
    root = tmp_path_factory.mktemp("poc_budget")
    clinical = resolve_profile("clinical")
    assert clinical.default_scope == "dp_sgd"
    # the clinical profile as shipped, with a one-round budget: the cap is the site's own file
    profile = root / "clinical_one_round"
    profile.mkdir()
    (profile / "privacy.json").write_text(json.dumps(clinical.privacy))
    (profile / "resources.json").write_text(json.dumps(clinical.resources))
    (profile / SITE_BUDGET_FILE_NAME).write_text(json.dumps(dict(clinical.budget_content, max_epsilon=one_round_budget[1])))

    fed = PocFederation(str(root), clients=3, env=FAST_FAILURE_DETECTION, heartbeat_timeout=HEARTBEAT_TIMEOUT, log=print)
    with fed:
        fed.prepare()
        fed.install_server()
        fed.install_site("site-1", "clinical", cxr_sites["site-1"], gpus=0)
        fed.install_site("site-2", "clinical", cxr_sites["site-2"], gpus=0)
        fed.install_site("site-3", str(profile), cxr_sites["site-3"], gpus=0)
        fed.start()
        yield fed


def _dp_job(dest: str, name: str) -> str:
    job = poc_job(JOB, dest, rounds=ROUNDS, name=name)  # names no scope: each site's default applies
    path = os.path.join(job, "app", "config", "config_fed_client.json")
    client = load_json(path)
    client["executors"][0]["executor"]["args"]["local_steps"] = LOCAL_STEPS
    save_json(path, client)
    return job


def _ledger(federation, site):
    return os.path.join(federation.workspace(site), "local", LEDGER_FILE_NAME)


def _releases(federation, site, job_id=None):
    path = _ledger(federation, site)
    releases = PrivacyBudgetLedger.read_releases(path) if os.path.exists(path) else []
    return [r for r in releases if job_id is None or r["job_id"] == job_id]


@pytest.fixture(scope="module")
def first_job(federation, tmp_path_factory):
    """The DP job's first run (the test of the clinical default; the budget test builds on it)."""
    dest = tmp_path_factory.mktemp("jobs")
    job_id = federation.submit(_dp_job(str(dest), "cxr_dpsgd_clinical_1"))
    meta = federation.wait(job_id, timeout=600)
    result = federation.download(job_id, str(dest / "results"))
    return job_id, meta, result


def _check_dp_sgd_contribution(site, seen, dp, cap):
    """What the server received from one site in one round: a valid DP-SGD record, nothing else."""
    record = seen["privacy"][DP_SGD]
    assert record["mechanism"] == "dp_sgd" and record["neighbouring_relation"].endswith("one patient"), (site, record)
    assert record["noise_multiplier"] == pytest.approx(max(dp["noise_multiplier"], 1.0)), (site, record)
    assert record["max_grad_norm"] <= 1.0 and record["secure_noise"] is True, (site, record)
    assert record["steps"] == LOCAL_STEPS and 0.0 < record["sample_rate"] <= 1.0, (site, record)
    assert record["delta"] == DELTA and record["accountant"] == "rdp", (site, record)
    assert 0.0 < record["epsilon_round"] <= record["epsilon_site"] <= record["max_epsilon"] == pytest.approx(cap), (site, record)
    # the site's filter first (charged), then the job's own copy (checked, not charged again)
    assert seen["filters_applied"] == [
        {"filter": "PatientDPSGDFilter", "source": "site"},
        {"filter": "PatientDPSGDFilter", "source": "job"},
    ], (site, seen["filters_applied"])
    # no loss, counts, timings or scores: only the record and the filters' names reached the server
    assert set(seen["meta_keys"]) <= RELEASED_META and not set(seen["meta_keys"]) & set(DATA_DEPENDENT_META), (site, seen)
    assert seen["steps"] is None and seen["train_loss"] is None and seen["train_seconds"] is None, (site, seen)
    assert seen["validate_seconds"] is None and seen["global_model_metrics"] == {}, (site, seen)


def test_the_clinical_default_trains_the_cxr_job_and_the_server_receives_only_dp_sgd_records(
    federation, first_job, one_round_budget
):
    job_id, meta, result = first_job
    assert meta["status"] == "FINISHED:COMPLETED", meta
    dp = _job_dp_sgd()
    caps = {"site-1": 8.0, "site-2": 8.0, "site-3": one_round_budget[1]}

    records = round_records(result)
    assert [r["round"] for r in records] == list(range(ROUNDS))
    print("server received in round 0:", json.dumps(records[0]["sites"], indent=1, default=str))
    print("aggregation of round 0:", json.dumps(records[0]["aggregation"], default=str))
    assert sorted(records[0]["aggregation"]["accepted"]) == SITES
    assert sorted(records[1]["aggregation"]["accepted"]) == ["site-1", "site-2"]  # site-3's budget is spent
    for record in records:
        accepted = record["aggregation"]["accepted"]
        assert sorted(record["sites"]) == sorted(accepted), record  # nothing else was taken in
        assert record["aggregation"]["weighting"].startswith("equal"), record["aggregation"]  # weights withheld
        for site in accepted:
            _check_dp_sgd_contribution(site, record["sites"][site], dp, caps[site])
    assert os.path.isfile(os.path.join(result, "workspace", "app_server", "FL_global_model.pt"))
    assert os.path.isfile(os.path.join(result, "workspace", "cross_site_val", "cross_val_results.json"))

    # each site's ledger: one dp_sgd release per round it released (charged once, though the
    # job carries the filter too), and the site-only model's cumulative record at submit_model
    for site in SITES:
        releases = _releases(federation, site, job_id)
        released_rounds = [r for r in records if site in r["aggregation"]["accepted"]]
        train = [r for r in releases if r["steps"] == LOCAL_STEPS]
        assert [r["round"] for r in train] == [r["round"] for r in released_rounds], (site, releases)
        assert all(r["mechanism"] == "dp_sgd" and r["source"] == "PatientDPSGDFilter" for r in releases), site
        assert all(r["noise_multiplier"] == pytest.approx(dp["noise_multiplier"]) for r in releases), site
        for r, rec in zip(train, released_rounds):  # what the server saw is what the site charged
            assert rec["sites"][site]["privacy"][DP_SGD]["epsilon_site"] == pytest.approx(r["epsilon_after"]), site
        site_only = [r for r in releases if r["steps"] == ROUNDS * LOCAL_STEPS]  # submit_model's cumulative record
        if site == "site-3":
            assert site_only == [], releases  # two rounds' steps would exceed its cap: blocked
        else:
            assert [r["steps"] for r in site_only] == [ROUNDS * LOCAL_STEPS], (site, releases)

        # the site admin's view: the job and its per-patient epsilon
        shown = _budget_show(federation, site)
        print(f"medflare budget show {site}:\n{shown}")
        job_line = next(line for line in shown.splitlines() if line.startswith(job_id))
        epsilon = PrivacyBudgetLedger.epsilon_of(releases, DELTA, "rdp")
        assert f" {epsilon:.4g} " in job_line and f"{dp['noise_multiplier']:g} q" in job_line, (job_line, epsilon)
    assert _blocked_lines(federation, "site-3", job_id, 1, "privacy budget exhausted")  # round 1, in the site's log


def test_a_non_dp_job_is_refused_at_every_clinical_site_and_charges_nothing(federation, tmp_path):
    before = {site: len(_releases(federation, site)) for site in SITES}
    job_id = federation.submit(poc_job("cxr_emr_fedavg", str(tmp_path), rounds=1, name="cxr_fedavg_at_clinical_sites"))
    meta = federation.wait(job_id, timeout=300)
    # every site refuses round 0: fewer than min_clients can answer, so the server ends the job
    assert meta["status"].startswith("FINISHED") and meta["status"] != "FINISHED:COMPLETED", meta
    result = federation.download(job_id, str(tmp_path / "results"))
    metrics = os.path.join(result, "workspace", "medflare_metrics.jsonl")
    for record in round_records(result) if os.path.isfile(metrics) else []:  # the server took in nothing
        assert record["sites"] == {} and not (record["aggregation"] or {}).get("accepted"), record
    with open(os.path.join(result, "workspace", "log.txt"), errors="replace") as f:
        server_log = f.read()
    assert "ACCEPTED by the aggregator" not in server_log
    refused = []
    for site in SITES:
        assert len(_releases(federation, site)) == before[site], site  # no epsilon charged
        # a site whose job process starts late may find the run already ended by the server
        # (two refusals leave fewer than min_clients 2): then it never received a train task
        lines = _blocked_lines(federation, site, job_id, 1, "requires patient-level DP-SGD", timeout=20.0)
        if not lines:
            assert not _blocked_lines(federation, site, job_id, 1, "Task name:train", timeout=0.0), site
            print(f"{site}: the run ended before it received a train task")
            continue
        refused.append(site)
        print(f"{site} refused {job_id}: {lines[0].strip()}")
        for part in ("(BatchNorm2d) mixes patients in a batch", "use GroupNorm", "jobs/cxr_emr_dpsgd", "nothing sent"):
            assert part in lines[0], (site, part, lines[0])
    assert len(refused) >= 2, refused  # what ended the job: at least two of the three refused


def test_an_exhausted_budget_blocks_results_across_jobs_and_a_client_restart(federation, first_job, tmp_path, one_round_budget):
    first_id, meta, _ = first_job
    assert meta["status"] == "FINISHED:COMPLETED", meta
    spent, cap = one_round_budget
    assert len(_releases(federation, "site-3")) == 1

    # the client goes down hard and comes back: the budget is on disk, not in the process
    federation.restart_client("site-3")  # SIGKILL to all its processes, start.sh, registered again

    second = federation.submit(_dp_job(str(tmp_path), "cxr_dpsgd_clinical_2"))
    meta = federation.wait(second, timeout=600)
    assert meta["status"] == "FINISHED:COMPLETED", meta
    assert "site-3: OK" in meta["job_deploy_detail"]  # the restarted site-3 took part
    for record in round_records(federation.download(second, str(tmp_path / "results"))):
        assert "site-3" not in record["sites"]
        assert sorted(record["aggregation"]["accepted"]) == ["site-1", "site-2"]
    assert len(_releases(federation, "site-3")) == 1 and _releases(federation, "site-3", second) == []
    assert len(_blocked_lines(federation, "site-3", second, ROUNDS, "privacy budget exhausted")) >= ROUNDS
    # site-1 and site-2 composed both jobs in their ledgers, within their cap
    for site in ("site-1", "site-2"):
        ledger = PrivacyBudgetLedger.open_site(os.path.dirname(_ledger(federation, site)))
        releases = _releases(federation, site)
        assert {r["job_id"] for r in releases} >= {first_id, second}
        history = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in releases]
        assert ledger.epsilon_spent() == pytest.approx(epsilon_of_history(history, DELTA))
        assert ledger.epsilon_spent() < 8.0

    # the site admin's view of site-3's budget agrees
    shown = _budget_show(federation, "site-3")
    assert "releases: 1" in shown and f"remaining: {cap - spent:.4g}" in shown, shown


def _budget_show(federation, site: str) -> str:
    """What ``medflare budget show SITE_DIR`` prints (the command's own entry point, in process)."""
    from medflare.cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["budget", "show", federation.workspace(site)]) == 0
    return out.getvalue()


def _blocked_lines(federation, site: str, job_id: str, expected: int, text: str, timeout: float = 60.0) -> list[str]:
    """The lines of ``site``'s job log holding ``text`` (a refusal or a blocked result).

    The client's job process may still be closing its log when the server reports the job
    finished, so the log is read until ``expected`` lines are there or ``timeout`` passes.
    """
    path = os.path.join(federation.workspace(site), job_id, "log.txt")
    deadline = time.time() + timeout
    while True:
        lines = []
        if os.path.isfile(path):
            with open(path, errors="replace") as f:
                lines = [line for line in f if text in line]
        if len(lines) >= expected or time.time() > deadline:
            return lines
        time.sleep(1.0)
