"""``medflare audit`` end to end at a site: the job's executor, the site's scopes as NVFlare builds
them, a scratch ledger, the attacks and the report.

Truthful by construction: on a small CNN, one step on one patient with no filter, the
reconstruction beats the prior by a clear margin and finds the patient among the site's cases;
each scope of the clinical profile brings it to or below the prior. The audit spends nothing from
the site's ledger and writes nothing but its report.
"""

from __future__ import annotations

import json
import os

import pytest

from medflare.audit.scratch_site import AuditError, changed_files, workspace_fingerprint
from medflare.audit.site_audit import SEGMENTATION_INVERSION, UNFILTERED, AuditOptions, run_audit
from medflare.cli.main import main
from medflare.privacy.budget_ledger import LEDGER_FILE_NAME, PrivacyBudgetLedger
from tests.integration.job_copies import SMALL_NETWORK
from tests.unit.audit.audit_sites import client_workspace, job_copy, small_cnn_job

MARGIN = 0.1  # SSIM above the prior's that counts as a clear reconstruction


@pytest.fixture(scope="module")
def cxr_site(tmp_path_factory):
    from medflare.data.cxr_synthetic import generate_cxr_sites

    return generate_cxr_sites(str(tmp_path_factory.mktemp("cxr")), sites=2, cases=16, size=32, seed=4)["site-1"]


def _rows(report, setting):
    return {r["scope"]: r for r in report["rows"] if r["setting"] == setting}


def test_the_attack_rebuilds_a_small_cnns_patient_unfiltered_and_the_clinical_scopes_stop_it(tmp_path, cxr_site):
    workspace = client_workspace(tmp_path, "site-1", "clinical", cxr_site)
    ledger = PrivacyBudgetLedger.open_site(os.path.join(workspace, "local"), "site-1")
    ledger.reserve(2.0, job_id="earlier-job", round_number=0, source="test", limit=None, delta=1e-5)  # the site's history
    before = workspace_fingerprint(workspace)
    out = str(tmp_path / "site-1" / "audit" / "report")

    report = run_audit(
        workspace, small_cnn_job(tmp_path), out,
        AuditOptions(cases=2, settings=("worst_case",), iterations=300, utility_rounds=0, device="cpu"), log=lambda _: None,
    )

    rows = _rows(report, "worst_case")
    assert set(rows) == {UNFILTERED, "dp_sgd", "clinical", "clinical_sparse"}
    plain = rows[UNFILTERED]["inversion"]
    assert len(plain["cases"]) == 2
    for case in plain["cases"]:
        assert case["ssim"] > case["prior_ssim"] + MARGIN, case
        assert case["reidentified"], case
    assert plain["beat_prior_fraction"] == 1.0 and plain["reidentification_rate"] == 1.0
    assert plain["chance"] == pytest.approx(1 / report["site_cases"])
    assert rows[UNFILTERED]["labels"]["accuracy"] == 1.0  # the output bias gives the labels away
    assert rows[UNFILTERED]["verdict"].startswith("attack beats the prior")
    for scope in ("dp_sgd", "clinical", "clinical_sparse"):
        row = rows[scope]
        assert row["released"], row["blocked"]
        assert row["inversion"]["beat_prior_fraction"] == 0.0, row["inversion"]
        assert row["inversion"]["mean_ssim"] < row["inversion"]["mean_prior_ssim"]
        assert row["epsilon"]["epsilon_site"] > 0 and row["epsilon"]["max_epsilon"] == 8.0, row["epsilon"]
        assert row["verdict"] == "at or below the prior"
        assert [r["mechanism"] for r in row["privacy_records"]] == (["dp_sgd"] if scope == "dp_sgd" else ["gaussian"])
    assert rows["clinical_sparse"]["released_fraction"] < 0.2  # 10 % of the entries leave
    assert [r["scope"] for r in report["rows"] if r["job_runs_under_it"]] == ["dp_sgd"]  # the site's default

    # spent nothing, wrote nothing but the report
    assert changed_files(before, workspace_fingerprint(workspace, skip=out)) == []
    assert len(PrivacyBudgetLedger.read_releases(os.path.join(workspace, "local", LEDGER_FILE_NAME))) == 1
    assert sorted(os.listdir(out)) == ["montage.png", "report.json", "report.txt"]
    with open(os.path.join(out, "report.json")) as f:
        written = json.load(f)
    assert written["threat_model"].startswith("An honest-but-curious server") and "trap" in written["not_covered"]
    table = open(os.path.join(out, "report.txt")).read()
    assert "*dp_sgd" in table and "threat model:" in table


def test_the_shipped_cxr_job_at_a_research_site_is_measured_under_every_scope(tmp_path, cxr_site):
    """Few iterations: the scores do not matter here, what each scope lets out does."""
    workspace = client_workspace(tmp_path, "site-1", "research", cxr_site)
    job = job_copy(tmp_path, "cxr_emr_fedavg", "cxr_emr_fedavg", image_size=[32, 32], local_model="last_round", local_epochs=1)

    report = run_audit(workspace, job, None, AuditOptions(cases=1, iterations=2, utility_rounds=1, device="cpu"), log=lambda _: None)

    assert report["report_dir"].startswith(os.path.join(workspace, "audit", "cxr_emr_fedavg-"))
    for setting in ("worst_case", "as_configured"):
        rows = _rows(report, setting)
        assert set(rows) == {UNFILTERED, "partial_sharing", "dp_sgd", "differential_privacy", "secure_aggregation",
                             "secure_distributed_dp", "public_data"}
        # a site not provisioned with HE has no key to encrypt with: nothing leaves under those scopes
        for scope in ("secure_aggregation", "secure_distributed_dp"):
            assert not rows[scope]["released"] and "CKKS context" in rows[scope]["blocked"], rows[scope]["blocked"]
        # a BatchNorm network under the DP-SGD scope: refused, the layers named, nothing leaves
        assert not rows["dp_sgd"]["released"] and "BatchNorm2d" in rows["dp_sgd"]["blocked"]
        assert rows["dp_sgd"]["labels"]["accuracy"] is None
        # partial sharing sends BatchNorm running statistics exact; the Gaussian filter does not
        sharing = rows["partial_sharing"]
        assert sharing["released_fraction"] < 0.15
        assert sharing["batchnorm_statistics"]["entries"] > 0 and sharing["batchnorm_statistics"]["exact_fraction"] > 0
        gaussian = rows["differential_privacy"]
        assert gaussian["batchnorm_statistics"]["exact_fraction"] == 0.0 and gaussian["epsilon"]["mechanism"] == "gaussian"
        assert rows[UNFILTERED]["batchnorm_statistics"]["exact_fraction"] == 1.0
        assert rows["public_data"]["released_fraction"] == pytest.approx(rows[UNFILTERED]["released_fraction"], abs=0.01)  # no filter
        for row in rows.values():
            assert row["utility"]["rounds"] == 1
    assert _rows(report, "worst_case")[UNFILTERED]["labels"]["accuracy"] == 1.0  # Adam keeps the sign: labels leak
    utility = _rows(report, "worst_case")
    assert utility[UNFILTERED]["utility"]["cost"] == 0.0
    assert utility["dp_sgd"]["utility"]["released_rounds"] == 0
    if not any(r["inversion"]["beat_prior_fraction"] for r in utility.values() if "beat_prior_fraction" in r["inversion"]):
        assert "not the filter" in utility["partial_sharing"]["verdict"]  # the network, not the filter, is credited


def test_a_segmentation_job_gets_label_inference_and_says_why_there_is_no_inversion(tmp_path, tiny_sites):
    workspace = client_workspace(tmp_path, "site-1", "research", tiny_sites["site-1"])
    job = job_copy(tmp_path, "brats_fedavg", "brats_small", model_args=SMALL_NETWORK, roi_size=[16, 16, 16], val_roi_size=[32, 32, 32], amp=False)

    report = run_audit(
        workspace, job, None,
        AuditOptions(scopes=["partial_sharing"], cases=1, settings=("worst_case",), utility_rounds=0, device="cpu"), log=lambda _: None,
    )

    rows = _rows(report, "worst_case")
    assert set(rows) == {UNFILTERED, "partial_sharing"}
    for row in rows.values():
        assert row["inversion"] == {"skipped": SEGMENTATION_INVERSION}
        labels = row["labels"]
        assert labels["accuracy"] is not None and 0.0 <= labels["accuracy"] <= 1.0
        assert len(labels["cases"][0]["truth"]) == 3  # tumour core, whole tumour, enhancing tumour
    assert "montage" not in report


def test_bad_requests_are_refused_before_anything_runs(tmp_path, cxr_site, capsys):
    workspace = client_workspace(tmp_path, "site-1", "research", cxr_site)
    job = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))), "jobs", "cxr_emr_fedavg")
    with pytest.raises(AuditError, match=r"--scope 'clinical'.*defines \['partial_sharing', 'dp_sgd', 'differential_privacy', 'secure_aggregation', 'secure_distributed_dp', 'public_data'\]"):
        run_audit(workspace, job, None, AuditOptions(scopes=["clinical"]))
    for field, value, message in (
        ("cases", 0, "cases must be"),
        ("iterations", 1.5, "iterations must be"),
        ("settings", ("everything",), "settings must be a non-empty subset"),
        ("attack", "dlg", "attack must be one of"),
        ("scopes", [], "scopes must be null"),
        ("utility_rounds", -1, "utility_rounds must be"),
    ):
        with pytest.raises((ValueError, TypeError), match=message):
            AuditOptions(**{field: value})
    heart = os.path.join(os.path.dirname(job), "heart_disease_fedavg")  # a clinical-table job; this site has X-rays
    with pytest.raises(AuditError, match=r"cannot find the site's data: .*has no data set 'outcome_table' \(asked for by the executor kind, OutcomeExecutor without image_column\); this site has \['outcome_image'\]"):
        run_audit(workspace, heart, None, AuditOptions(utility_rounds=0))
    heart_on_xrays = job_copy(tmp_path, "heart_disease_fedavg", "heart_on_xrays", dataset="outcome_image")
    with pytest.raises(AuditError, match="cannot load the site's data"):  # columns this site's table does not have
        run_audit(workspace, heart_on_xrays, None, AuditOptions(utility_rounds=0))
    assert not os.path.exists(os.path.join(workspace, "audit"))  # nothing written for a refused audit

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(AuditError, match="exists and is not a folder"):
        run_audit(workspace, job, str(tmp_path / "a-file"), AuditOptions(utility_rounds=0))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(AuditError, match="holds files other than an earlier audit report"):
        run_audit(workspace, job, str(tmp_path / "busy"), AuditOptions(utility_rounds=0))
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"

    assert main(["audit", "--workspace", str(tmp_path / "nowhere"), "--job", job]) == 2
    assert "medflare audit: error: --workspace" in capsys.readouterr().err
    assert main(["audit", "--workspace", workspace, "--job", job, "--cases", "0"]) == 2
    assert "cases must be" in capsys.readouterr().err


def test_the_command_offers_the_settings_and_attacks_the_audit_runs():
    from medflare.audit import site_audit
    from medflare.cli import audit as command

    assert command.SETTINGS == site_audit.SETTINGS and command.ATTACKS == site_audit.ATTACKS



def test_a_tampered_ledger_blocks_the_dp_scopes_in_the_audit_too_and_is_left_as_found(tmp_path, cxr_site):
    """The scratch copy carries the site's ledger state: a ledger edited behind the seal's back
    blocks every DP release in the audit as it would in a job; the evidence is not touched."""
    workspace = client_workspace(tmp_path, "site-1", "clinical", cxr_site)
    ledger_path = os.path.join(workspace, "local", LEDGER_FILE_NAME)
    ledger = PrivacyBudgetLedger.open_site(os.path.join(workspace, "local"), "site-1")
    ledger.reserve(2.0, job_id="earlier-job", round_number=0, source="test", limit=None, delta=1e-5)
    with open(ledger_path) as f:
        text = f.read()
    with open(ledger_path, "w") as f:
        f.write(text.replace('"noise_multiplier": 2.0', '"noise_multiplier": 200.0'))  # someone lowered the spend
    assert '"noise_multiplier": 200.0' in open(ledger_path).read()
    before = workspace_fingerprint(workspace)

    report = run_audit(
        workspace, small_cnn_job(tmp_path), str(tmp_path / "out"),
        AuditOptions(scopes=["clinical"], cases=1, settings=("worst_case",), iterations=2, utility_rounds=0, device="cpu"),
        log=lambda _: None,
    )

    row = _rows(report, "worst_case")["clinical"]
    assert not row["released"] and "blocked" in row["blocked"], row
    assert row["labels"]["accuracy"] is None and row["inversion"]["beat_prior_fraction"] == 0.0
    assert _rows(report, "worst_case")[UNFILTERED]["released"]  # the reference needs no ledger
    assert changed_files(before, workspace_fingerprint(workspace)) == []


def test_a_site_holding_several_data_sets_audits_the_one_the_job_trains_on(tmp_path, cxr_site, tiny_sites):
    """The chest X-ray job at a site that also holds BraTS volumes: the audit attacks X-ray cases."""
    import csv

    workspace = client_workspace(tmp_path, "site-1", "research", [tiny_sites["site-1"], cxr_site])
    report = run_audit(
        workspace, small_cnn_job(tmp_path), str(tmp_path / "out"),
        AuditOptions(scopes=["public_data"], cases=1, settings=("worst_case",), iterations=2, utility_rounds=0, device="cpu"),
        log=lambda _: None,
    )
    with open(os.path.join(os.path.dirname(cxr_site), "cases.csv")) as f:
        ids = [row["case_id"] for row in csv.DictReader(f)]
    assert report["attacked_cases"][0] in ids
    assert report["site_cases"] <= len(ids) and set(_rows(report, "worst_case")) == {UNFILTERED, "public_data"}
