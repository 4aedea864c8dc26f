"""A real federation on loopback under the research profile: every shipped job submitted through
the FLARE API and completed with the site policy applied (EXAM's whole table for the outcome
jobs, from ``medflare report``), a bad scope refused, and clients killed mid-job.

NVFlare POC mode: a server and three clients provisioned with certificates, each started by its
own ``startup/start.sh`` with the research profile installed by ``medflare site install``, every
site holding BraTS volumes, a heart-disease table and chest X-rays at once (one data
configuration per executor kind), and the admin's FLARE API session (the path the admin
console's ``submit_job`` takes). Nothing is mocked. The server's dead-client detection is shortened (see ``poc_support``) so that the two
fault tests take a minute each rather than ten.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from medflare.federation.poc_federation import PocFederation
from medflare.recipes import MedflarePocEnv, MedflareRecipe
from medflare.wire_contract import DP_SGD
from tests.integration.job_copies import job_filters, round_records
from tests.integration.poc_support import (
    FAST_FAILURE_DETECTION,
    HEARTBEAT_TIMEOUT,
    MAX_JOBS,
    SITES,
    assert_complete_exam_table,
    exam_report,
    matrix_line,
    he_jobs,
    outcome_jobs,
    plain_jobs,
    poc_job,
    rounds_recorded,
)

pytestmark = [pytest.mark.integration, pytest.mark.poc]

SITE_FILTER = {"filter": "PercentileSharingFilter", "source": "site"}  # the research profile's default scope


@pytest.fixture(scope="module")
def federation(tmp_path_factory, poc_site_datasets):
    root = tmp_path_factory.mktemp("poc_federation")
    # provisioned with HE (NVFlare's HEBuilder): every kit holds CKKS keys for the HE jobs, the server's without the secret key
    fed = PocFederation(
        str(root), clients=3, env=FAST_FAILURE_DETECTION, heartbeat_timeout=HEARTBEAT_TIMEOUT, max_jobs=MAX_JOBS, he=True, log=print
    )
    with fed:
        fed.prepare()
        fed.install_server()
        for site in fed.sites:
            fed.install_site(site, "research", poc_site_datasets[site], gpus=0)
        fed.start()
        yield fed


def test_every_shipped_brats_job_completes_with_the_site_policy_applied(federation, tmp_path):
    jobs = plain_jobs("brats")
    assert {"brats_fedavg", "brats_percentile", "brats_gaussian_dp", "brats_fedyogi", "brats_dpsgd"} <= set(jobs)
    start = time.time()
    submitted = {job: federation.submit(poc_job(job, str(tmp_path))) for job in jobs}

    for job, job_id in submitted.items():
        meta = federation.wait(job_id, timeout=900)
        print(matrix_line("research", job, meta["status"], time.time() - start))
        assert meta["status"] == "FINISHED:COMPLETED", (job, meta)
        result = federation.download(job_id, str(tmp_path / "results"))

        records = round_records(result)
        assert [r["round"] for r in records] == [0, 1], job
        own = job_filters(job)
        for record in records:
            assert sorted(record["aggregation"]["accepted"]) == federation.sites, (job, record["aggregation"])
            for site, seen in record["sites"].items():
                # what the server received says which filters ran at the site, and that the
                # site's own policy ran first, also for jobs that name no filter themselves
                expected = [SITE_FILTER] + [{"filter": name, "source": "job"} for name in own]
                assert seen["filters_applied"] == expected, (job, site, seen["filters_applied"])
                shared = seen["privacy"]["medflare_percentile_sharing"]
                assert shared["num_shared"] <= 0.11 * shared["num_total"] or own, (job, site, shared)
                if "GaussianPrivacyFilter" in own:
                    assert seen["privacy"]["medflare_gaussian_dp"]["noise_multiplier"] > 0
                if "PatientDPSGDFilter" in own:  # the job's DP-SGD, charged at the site after the site's own filter
                    assert seen["privacy"]["medflare_dp_sgd"]["epsilon_site"] > 0
        app_server = os.path.join(result, "workspace", "app_server")
        # a DP filter withholds the sites' validation scores (initial_metrics): no best-model selection
        dp = any(name in own for name in ("GaussianPrivacyFilter", "PatientDPSGDFilter"))
        for model in ("FL_global_model.pt",) + (() if dp else ("best_FL_global_model.pt",)):
            assert os.path.isfile(os.path.join(app_server, model)), (job, model)
        if dp:
            for record in records:
                assert all(seen["steps"] is None and seen["global_model_metrics"] == {} for seen in record["sites"].values())
        assert os.path.isfile(os.path.join(result, "workspace", "cross_site_val", "cross_val_results.json"))


def test_every_shipped_outcome_job_completes_with_exams_whole_table(federation, tmp_path):
    # the same sites, without a reinstall: each job's executor finds its own data set
    jobs = outcome_jobs()
    assert {"heart_disease_fedavg", "heart_disease_fedyogi", "heart_disease_dpsgd", "cxr_emr_fedavg", "cxr_emr_dpsgd"} <= set(jobs)
    start = time.time()
    submitted = {job: federation.submit(poc_job(job, str(tmp_path))) for job in jobs}

    for job, job_id in submitted.items():
        meta = federation.wait(job_id, timeout=900)
        seconds = time.time() - start
        assert meta["status"] == "FINISHED:COMPLETED", (job, meta)
        result = federation.download(job_id, str(tmp_path / "results"))
        records = round_records(result)
        assert [r["round"] for r in records] == [0, 1], job
        own = job_filters(job)
        for record in records:
            assert sorted(record["aggregation"]["accepted"]) == SITES, (job, record["aggregation"])
            for site, seen in record["sites"].items():
                expected = [SITE_FILTER] + [{"filter": name, "source": "job"} for name in own]
                assert seen["filters_applied"] == expected, (job, site, seen["filters_applied"])
                if "PatientDPSGDFilter" in own:
                    assert seen["privacy"][DP_SGD]["epsilon_site"] > 0, (job, site)
        # the research default releases each site-only model for cross-site evaluation (the
        # DP-SGD jobs' also pass the job's DP-SGD filter, charged): EXAM's table is whole
        report = exam_report(result, str(tmp_path / "reports" / job))
        print(matrix_line("research", job, meta["status"], seconds, report))
        assert_complete_exam_table(report, SITES)
        assert report["global_model"].startswith("SRV_"), report["global_model"]


def test_the_he_jobs_complete_and_the_server_holds_only_ciphertexts(federation, tmp_path):
    """Secure aggregation in the real runtime: both HE jobs under the research profile's
    secure_aggregation scope (partial sharing, then CKKS), and the heart job again under its
    secure_distributed_dp scope (a third of the noise at each site, encrypted in the same step)."""
    import tenseal

    assert set(he_jobs()) == {"brats_he", "heart_disease_he"}
    copies = {job: poc_job(job, str(tmp_path)) for job in he_jobs()}
    # one round: the sites' lifetime budget (epsilon 10) has paid for the earlier batches' DP jobs
    copies["heart_disease_he_ddp"] = poc_job("heart_disease_he", str(tmp_path), rounds=1, name="heart_disease_he_ddp", scope="secure_distributed_dp")
    start = time.time()
    submitted = {job: federation.submit(path) for job, path in copies.items() if job != "heart_disease_he"}
    # the recipe path: the job folder as a MedflareRecipe, submitted through NVFlare's ProdEnv
    # (MedflarePocEnv over this federation): the same FLARE API session, the same folder
    env = MedflarePocEnv(federation=federation)
    run = MedflareRecipe.from_job_folder(copies["heart_disease_he"]).run(env)
    submitted["heart_disease_he"] = run.get_job_id()
    assert env.get_job_status(run.get_job_id()) in ("SUBMITTED", "DISPATCHED", "RUNNING", "FINISHED:COMPLETED")

    server_kit = os.path.join(federation.workspace("server"), "startup")
    with open(os.path.join(server_kit, "server_context.tenseal"), "rb") as f:
        server_context = tenseal.context_from(f.read())
    with open(os.path.join(federation.workspace("site-1"), "startup", "client_context.tenseal"), "rb") as f:
        site_context = tenseal.context_from(f.read())
    assert not server_context.is_private() and site_context.is_private()  # the server has no secret key

    for job, job_id in submitted.items():
        meta = federation.wait(job_id, timeout=900)
        print(matrix_line("research (HE)", job, meta["status"], time.time() - start))
        assert meta["status"] == "FINISHED:COMPLETED", (job, meta)
        result = federation.download(job_id, str(tmp_path / "results"))
        distributed = job.endswith("_ddp")
        expected_filters = (
            [{"filter": "DistributedGaussianPrivacyFilter", "source": "site"}] if distributed
            else [SITE_FILTER, {"filter": "HEUpdateEncryptor", "source": "site"}]
        )
        app_server = os.path.join(result, "workspace", "app_server")
        saved = torch.load(os.path.join(app_server, "FL_global_model.pt"), map_location="cpu", weights_only=False)["model"]
        model_values = sum(tenseal.ckks_vector_from(server_context, v).size() for v in saved.values())
        # what the server held: ciphertexts only, at every round, from every site
        for record in round_records(result):
            aggregation = record["aggregation"]
            assert sorted(aggregation["accepted"]) == SITES and aggregation["rejected"] == {}, (job, aggregation)
            for site, seen in record["sites"].items():
                assert seen["filters_applied"] == expected_filters, (job, site, seen["filters_applied"])
                encryption = seen["privacy"]["medflare_encryption"]
                assert encryption["scheme"] == "CKKS" and encryption["num_values"] == model_values, (job, site)
                assert aggregation["ciphertext_bytes"][site] > 4 * 4 * encryption["num_values"], (job, site)
                if distributed:
                    dp = seen["privacy"]["medflare_gaussian_dp"]
                    assert dp["distributed_sites"] == 3 and dp["noise_multiplier"] == 2.4 and encryption["weighted_by"] == "equal"
                    assert abs(dp["site_noise_multiplier"] - 2.4 / 3 ** 0.5) < 1e-9 and dp["epsilon_site"] <= 10.0
        # the saved global model: ciphertexts the server cannot decrypt, a site can
        assert saved and all(isinstance(v, bytes) for v in saved.values()), job
        vector = tenseal.ckks_vector_from(server_context, next(iter(saved.values())))
        with pytest.raises(ValueError):
            vector.decrypt()
        for value in saved.values():
            decrypted = tenseal.ckks_vector_from(site_context, value).decrypt()
            assert decrypted and all(abs(x) < 1e3 for x in decrypted), job
        if job == "heart_disease_he":
            # the site-only models travelled encrypted through the server too; EXAM's table is whole
            from nvflare.apis.dxo import from_file

            models = os.path.join(result, "workspace", "cross_site_val", "model_shareables")
            for name in os.listdir(models):
                assert all(isinstance(v, bytes) for v in from_file(os.path.join(models, name)).data.values()), name
            report = exam_report(result, str(tmp_path / "reports" / job))
            assert_complete_exam_table(report, SITES)


def test_a_job_naming_a_scope_no_site_defines_is_refused_with_nvflares_message(federation, tmp_path):
    job_id = federation.submit(poc_job("brats_fedavg", str(tmp_path), name="brats_bad_scope", scope="no_such_scope"))
    meta = federation.wait(job_id, timeout=120)
    assert meta["status"] == "FINISHED:FAILED_TO_RUN"
    details = meta["job_deploy_detail"]
    for site in federation.sites:
        assert f"{site}: NVFLARE_ERROR: privacy scope 'no_such_scope' is not allowed" in details


def test_a_client_killed_mid_job_leaves_the_rest_to_finish(federation, tmp_path):
    job_id = federation.submit(poc_job("brats_fedavg", str(tmp_path), rounds=3, name="brats_lose_one_site", local_steps=None))
    _wait_for_rounds(federation, job_id, 1)
    federation.kill("site-3")  # SIGKILL to its watchdog, client and job processes

    meta = federation.wait(job_id, timeout=600)
    assert meta["status"] == "FINISHED:COMPLETED"
    result = federation.download(job_id, str(tmp_path / "results"))
    records = round_records(result)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert sorted(records[0]["aggregation"]["accepted"]) == ["site-1", "site-2", "site-3"]
    # from the round after the kill on, the global model is the survivors' average
    assert all(sorted(r["aggregation"]["accepted"]) == ["site-1", "site-2"] for r in records[2:])
    assert os.path.isfile(os.path.join(result, "workspace", "app_server", "FL_global_model.pt"))


def test_a_client_killed_below_min_clients_ends_the_job_failed_and_keeps_the_best_model(federation, tmp_path):
    # site-3 is down since the previous test: two sites are left for a job needing two
    if federation.running("site-3"):
        federation.kill("site-3")
    job_id = federation.submit(poc_job("brats_fedavg", str(tmp_path), rounds=8, name="brats_below_minimum", local_steps=None))
    _wait_for_rounds(federation, job_id, 2)
    federation.kill("site-2")

    meta = federation.wait(job_id, timeout=600)
    assert meta["status"].startswith("FINISHED:") and meta["status"] != "FINISHED:COMPLETED", meta["status"]
    result = federation.download(job_id, str(tmp_path / "results"))
    assert len(round_records(result)) < 8
    with open(os.path.join(result, "workspace", "log.txt")) as f:
        log = f.read()
    assert "Alive clients 1 < required min 2" in log and "Aborting job due to deployment policy violation" in log
    best = os.path.join(result, "workspace", "app_server", "best_FL_global_model.pt")
    state = torch.load(best, map_location="cpu", weights_only=False)
    state = state.get("model", state)
    assert state and all(torch.isfinite(torch.as_tensor(v).float()).all() for v in state.values())


def _wait_for_rounds(federation, job_id: str, n: int, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while rounds_recorded(federation, job_id) < n:
        meta = federation.job_meta(job_id)
        assert not str(meta.get("status", "")).startswith("FINISHED"), meta
        assert time.time() < deadline, f"job {job_id} recorded fewer than {n} rounds in {timeout:.0f} s"
        time.sleep(0.5)
