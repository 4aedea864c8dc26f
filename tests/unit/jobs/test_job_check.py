"""``medflare job check`` on the shipped jobs and on a table of broken ones, with the messages expected."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from medflare.cli.main import main
from medflare.jobs.job_check import check_job

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
JOBS = os.path.join(REPO, "jobs")
SHIPPED = sorted(d for d in os.listdir(JOBS) if os.path.isfile(os.path.join(JOBS, d, "meta.json")))


def _copy(tmp_path, job):
    folder = tmp_path / job
    shutil.copytree(os.path.join(JOBS, job), folder)
    return folder


def _edit(path, change):
    with open(path) as f:
        content = json.load(f)
    change(content)
    with open(path, "w") as f:
        json.dump(content, f)


@pytest.mark.parametrize("job", SHIPPED)
def test_every_shipped_job_passes_under_the_research_profile(job):
    result = check_job(os.path.join(JOBS, job), profile="research")
    assert result.ok, result.problems


@pytest.mark.parametrize("job", ["brats_dpsgd", "cxr_emr_dpsgd", "heart_disease_dpsgd", "heart_disease_fedavg"])
def test_the_jobs_a_clinical_site_runs_pass_under_the_clinical_profile(job):
    result = check_job(os.path.join(JOBS, job), profile="clinical")
    assert result.ok, result.problems


@pytest.mark.parametrize("job", ["brats_fedavg", "cxr_emr_fedavg"])
def test_a_non_dp_network_at_a_dp_sgd_site_is_refused_before_submission(job):
    result = check_job(os.path.join(JOBS, job), profile="clinical")
    (problem,) = result.problems
    assert "scope 'dp_sgd' of the profile clinical requires patient-level DP-SGD" in problem
    assert "jobs/*_dpsgd" in problem


def _filter_typo(c):
    c["task_result_filters"] = [{"tasks": ["train"], "filters": [{"path": "medflare.filters.percentile_sharing.PercentileSharingFilter", "args": {"fraction_share": 0.1}}]}]


def _filter_range(c):
    c["task_result_filters"] = [{"tasks": ["train"], "filters": [{"path": "medflare.filters.percentile_sharing.PercentileSharingFilter", "args": {"fraction_shared": 1.5, "gamma": 0.1}}]}]


def _class_typo(c):
    c["executors"][0]["executor"]["path"] = "medflare.executors.outcome_executor.OutcomeExecuter"


def _not_allowed(c):
    c["components"] = [{"id": "shell", "path": "subprocess.Popen", "args": {"args": ["true"]}}]


def _executor_arg(c):
    c["executors"][0]["executor"]["args"]["learning_rat"] = 0.1


def _nested_model_arg(c):
    c["executors"][0]["executor"]["args"]["model"]["args"]["num_output"] = 1


BROKEN = {
    # name: (file to edit, change, profile, expected message parts)
    "filter argument typo": ("config_fed_client.json", _filter_typo, None, ["PercentileSharingFilter has no argument 'fraction_share'", "did you mean 'fraction_shared'?"]),
    "filter argument out of range": ("config_fed_client.json", _filter_range, None, ["PercentileSharingFilter refuses its arguments", "fraction_shared"]),
    "class name typo": ("config_fed_client.json", _class_typo, None, ["has no OutcomeExecuter", "did you mean medflare.executors.outcome_executor.OutcomeExecutor?"]),
    "class not on the allow-list": ("config_fed_client.json", _not_allowed, None, ["subprocess.Popen is not on the sites' class allow-list"]),
    "executor argument typo": ("config_fed_client.json", _executor_arg, None, ["OutcomeExecutor has no argument 'learning_rat'", "did you mean 'learning_rate'?"]),
    "nested model argument typo": ("config_fed_client.json", _nested_model_arg, None, ["OutcomeNet has no argument 'num_output'", "did you mean 'num_outputs'?"]),
    "scope the site lacks": ("meta.json", lambda m: m.update(scope="public_data"), "clinical", ["scope 'public_data' is not defined by the profile clinical", "'clinical_sparse'"]),
    "more clients than named": ("meta.json", lambda m: m.update(min_clients=3, deploy_map={"app": ["server", "site-1", "site-2"]}), None, ["meta.json min_clients 3: the deploy_map names only 2 client(s)", "SUBMITTED"]),
    "rounds beyond the clinical budget": ("meta.json", lambda m: m.update(scope="clinical"), "clinical", ["num_rounds 15: under scope 'clinical' of the profile clinical", "spend epsilon", "cap 8", "use at most"]),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_job_is_refused_with_a_message_naming_the_problem(tmp_path, name, capsys):
    file, change, profile, expected = BROKEN[name]
    folder = _copy(tmp_path, "heart_disease_fedavg")
    path = folder / "meta.json" if file == "meta.json" else folder / "app" / "config" / file
    _edit(path, change)
    result = check_job(str(folder), profile=profile)
    assert not result.ok
    text = "\n".join(result.problems)
    for part in expected:
        assert part in text, (part, text)
    argv = ["job", "check", str(folder)] + (["--profile", profile] if profile else [])
    assert main(argv) == 2
    assert expected[0] in capsys.readouterr().out


def test_a_site_workspace_is_checked_with_what_its_ledger_has_spent(tmp_path):
    from medflare.privacy.budget_ledger import PrivacyBudgetLedger
    from medflare.sites.site_profiles import resolve_profile

    local = tmp_path / "site-1" / "local"
    local.mkdir(parents=True)
    profile = resolve_profile("clinical")
    for name in ("privacy.json", "medflare_privacy_budget.json"):
        shutil.copyfile(os.path.join(profile.folder, name), local / name)
    folder = _copy(tmp_path, "heart_disease_fedavg")
    _edit(folder / "meta.json", lambda m: m.update(scope="clinical"))
    server = folder / "app" / "config" / "config_fed_server.json"
    _edit(server, lambda c: c.update(num_rounds=10))
    assert check_job(str(folder), site_workspace=str(tmp_path / "site-1")).ok  # 10 rounds fit a fresh site
    ledger = PrivacyBudgetLedger.open_site(str(local), "site-1")
    for r in range(6):
        ledger.reserve(2.4, job_id="earlier", round_number=r, source="test", limit=None, delta=1e-5)
    (problem,) = check_job(str(folder), site_workspace=str(tmp_path / "site-1")).problems
    assert "num_rounds 10" in problem and "spent" in problem and "use at most" in problem


def test_bad_paths_are_named(tmp_path):
    assert check_job(str(tmp_path / "nowhere")).problems == [f"{tmp_path / 'nowhere'}: not a job folder"]
    (tmp_path / "empty").mkdir()
    assert "meta.json: missing" in check_job(str(tmp_path / "empty")).problems[0]
    assert "not defined" not in " ".join(check_job(str(tmp_path / "empty"), profile="research").problems)
    with pytest.raises(ValueError, match="not both"):
        check_job(os.path.join(JOBS, "heart_disease_fedavg"), profile="research", site_workspace=str(tmp_path))


def test_dp_sgd_at_a_site_is_estimated_from_its_own_patients(tmp_path):
    """A clinical site trains a job with DP-SGD at its own least noise when the job names none:
    heart_disease_fedavg as shipped (15 rounds of 100 steps, and the site-only model's as many)
    would spend far more than epsilon 8 at VA Long Beach's 85 training patients."""
    from medflare.data.heart_disease import write_heart_sites
    from tests.unit.audit.audit_sites import client_workspace

    heart = write_heart_sites(str(tmp_path / "heart"))
    site = client_workspace(tmp_path, "site-4", "clinical", heart["site-4"])
    (problem,) = check_job(os.path.join(JOBS, "heart_disease_fedavg"), site_workspace=site).problems
    for part in ("num_rounds 15", "z 1, q 0.04706 (4 of its 85 training cases per step)", "100 steps per round",
                 "site-only model is charged too", "the site has 8.00 left", "use at most"):
        assert part in problem, (part, problem)
    fits = int(problem.rsplit("use at most ", 1)[1].split()[0])
    assert 0 <= fits < 15
    # the DP-SGD job asks for more noise and 10 steps: it fits, and says what it will spend
    check = check_job(os.path.join(JOBS, "heart_disease_dpsgd"), site_workspace=site)
    assert check.ok, check.problems
    (line,) = [c for c in check.checked if c.startswith("DP-SGD at the site")]
    assert "z 1.8, q 0.04706 (4 of 85 training cases), 10 steps x 15 rounds x 2 (site-only model)" in line
    # a profile has no patients to count: said, not guessed
    notes = check_job(os.path.join(JOBS, "heart_disease_fedavg"), profile="clinical").checked
    assert any("not estimated" in n and "--site-workspace" in n for n in notes)


def test_a_site_whose_data_cannot_be_read_gets_no_dp_sgd_estimate_and_is_told_why(tmp_path):
    from medflare.sites.site_profiles import resolve_profile

    local = tmp_path / "site-1" / "local"
    local.mkdir(parents=True)
    profile = resolve_profile("clinical")
    for name in ("privacy.json", "medflare_privacy_budget.json"):
        shutil.copyfile(os.path.join(profile.folder, name), local / name)
    check = check_job(os.path.join(JOBS, "heart_disease_fedavg"), site_workspace=str(tmp_path / "site-1"))
    assert check.ok, check.problems  # the job is fine; the site's data is the site's problem
    (note,) = [c for c in check.checked if "not estimated" in c]
    assert "no data configuration for site 'site-1'" in note, note


# --- secure aggregation: a job and the site's scope must agree on encryption -------------------


def _scope(folder, name):
    _edit(folder / "meta.json", lambda m: m.update(scope=name))


@pytest.mark.parametrize(
    "job, scope, message",
    [
        ("heart_disease_he", "partial_sharing", "aggregates only ciphertexts (EncryptedSumAggregator) but scope 'partial_sharing'"),
        ("heart_disease_he", "differential_privacy", "does not encrypt"),
        ("heart_disease_fedavg", "secure_aggregation", "encrypts every result, and the job's aggregator"),
        ("brats_fedavg", "secure_distributed_dp", "cannot read ciphertexts: use an HE job"),
        # brats_he needs two sites a round; distributed DP's noise counts on three
        ("brats_he", "secure_distributed_dp", "the server refuses sums of fewer than 3 sites, but the job runs rounds with min_clients 2"),
    ],
)
def test_a_job_and_a_scope_that_disagree_on_encryption_are_refused(tmp_path, job, scope, message):
    folder = _copy(tmp_path, job)
    _scope(folder, scope)
    (problem,) = check_job(str(folder), profile="research").problems
    assert message in problem, problem


def test_an_he_job_whose_bound_or_weighting_the_scope_does_not_meet_is_refused(tmp_path):
    folder = _copy(tmp_path, "heart_disease_he")
    server = folder / "app" / "config" / "config_fed_server.json"

    def tighten(config):
        aggregator = next(c for c in config["components"] if c["id"] == "aggregator")
        aggregator["args"].update(max_update_norm=10.0, weight_meta_key="NUM_STEPS_CURRENT_ROUND")

    _edit(server, tighten)
    problems = check_job(str(folder), profile="research").problems
    assert any("max_update_norm 40.0, above the job aggregator's 10.0" in p for p in problems), problems
    assert any("weights by 'num_train_cases', the job's aggregator by 'NUM_STEPS_CURRENT_ROUND'" in p for p in problems), problems


def test_an_he_job_with_its_own_result_filters_is_refused(tmp_path):
    folder = _copy(tmp_path, "heart_disease_he")
    client = folder / "app" / "config" / "config_fed_client.json"
    _edit(client, lambda c: c.update(task_result_filters=[{"tasks": ["train"], "filters": [
        {"path": "medflare.filters.percentile_sharing.PercentileSharingFilter", "args": {"fraction_shared": 0.5}}]}]))
    problems = check_job(str(folder), profile="research").problems
    assert any("would refuse ciphertexts; an HE job carries no result filters" in p for p in problems), problems


def test_a_site_without_ckks_keys_is_told_to_provision_with_he(tmp_path):
    from medflare.sites.site_profiles import resolve_profile

    local = tmp_path / "site-1" / "local"
    local.mkdir(parents=True)
    profile = resolve_profile("research")
    for name in ("privacy.json", "medflare_privacy_budget.json"):
        shutil.copyfile(os.path.join(profile.folder, name), local / name)
    job = os.path.join(JOBS, "heart_disease_he")
    (problem,) = check_job(job, site_workspace=str(tmp_path / "site-1")).problems
    assert "client_context.tenseal: missing" in problem and "nvflare poc prepare -he" in problem
    (tmp_path / "site-1" / "startup").mkdir()
    (tmp_path / "site-1" / "startup" / "client_context.tenseal").write_bytes(b"provisioned")
    assert check_job(job, site_workspace=str(tmp_path / "site-1")).ok


def test_medflare_run_refuses_an_he_job_and_says_where_it_runs(capsys):
    assert main(["run", os.path.join(JOBS, "heart_disease_he")]) != 0
    err = capsys.readouterr().err
    assert "aggregates CKKS ciphertexts" in err and "nvflare poc prepare -he" in err
