"""The audit's scratch copy of a site: its filters charge a copy of the ledger, never the real one."""

from __future__ import annotations

import json
import os

import pytest

from medflare.audit.scratch_site import AuditError, changed_files, open_site, scratch_copy, workspace_fingerprint
from medflare.data.site_data_config import ENV_VAR as DATA_ENV
from medflare.filters.site_ledger import site_ledger
from medflare.privacy.budget_ledger import LEDGER_FILE_NAME
from medflare.privacy.site_budget import ENV_VAR as BUDGET_ENV
from medflare.privacy.site_budget import SITE_BUDGET_FILE_NAME
from tests.unit.audit.audit_sites import client_workspace


@pytest.fixture(scope="module")
def cxr_config(tmp_path_factory):
    from medflare.data.cxr_synthetic import generate_cxr_sites

    return generate_cxr_sites(str(tmp_path_factory.mktemp("cxr")), sites=2, cases=12, size=32, seed=1)["site-1"]


def _spend(ledger, job="job-before-audit"):
    ledger.reserve(2.0, job_id=job, round_number=0, source="test", limit=None, delta=1e-5)


def test_the_scratch_ledger_is_a_copy_and_spending_there_leaves_the_real_one_as_it_was(tmp_path, cxr_config):
    workspace = client_workspace(tmp_path, "site-1", "clinical", cxr_config)
    site = open_site(workspace)
    with scratch_copy(site) as first:
        _spend(site_ledger(first.fl_ctx))  # the real site spent before the audit ...
    real_ledger = os.path.join(workspace, "local", LEDGER_FILE_NAME)
    assert not os.path.exists(real_ledger)  # ... no: that was a scratch copy, the real site has no ledger yet
    # give the real site some history, through the real workspace
    from medflare.privacy.budget_ledger import PrivacyBudgetLedger

    _spend(PrivacyBudgetLedger.open_site(os.path.join(workspace, "local"), "site-1"))
    before = workspace_fingerprint(workspace)
    with scratch_copy(site) as scratch:
        assert scratch.root != workspace and not scratch.root.startswith(workspace)
        ledger = site_ledger(scratch.fl_ctx)
        assert os.path.dirname(ledger.path) == scratch.local_dir and os.path.dirname(ledger.seal_path) == scratch.local_dir
        assert len(ledger.read_releases(ledger.path)) == 1  # the site's history came along
        _spend(ledger, "audit")
        assert len(ledger.read_releases(ledger.path)) == 2
    assert changed_files(before, workspace_fingerprint(workspace)) == []
    assert not os.path.exists(scratch.root)  # removed


def test_a_seal_kept_outside_the_workspace_is_copied_and_never_written(tmp_path, cxr_config):
    workspace = client_workspace(tmp_path, "site-1", "clinical", cxr_config)
    seal_dir = tmp_path / "var-lib-medflare"
    seal_dir.mkdir()
    budget_path = os.path.join(workspace, "local", SITE_BUDGET_FILE_NAME)
    with open(budget_path) as f:
        budget = json.load(f)
    budget["seal_path"] = str(seal_dir / "site-1.seal")
    with open(budget_path, "w") as f:
        json.dump(budget, f)
    from medflare.privacy.budget_ledger import PrivacyBudgetLedger

    _spend(PrivacyBudgetLedger.open_site(os.path.join(workspace, "local"), "site-1"))
    assert (seal_dir / "site-1.seal").exists()
    seal_before = workspace_fingerprint(str(seal_dir))
    site = open_site(workspace)
    with scratch_copy(site) as scratch:
        ledger = site_ledger(scratch.fl_ctx)
        assert ledger.seal_path.startswith(scratch.root)  # the copy's seal, next to the copy's ledger
        assert not ledger.check().blocked, ledger.check()  # the copied seal matches the copied ledger
        _spend(ledger, "audit")
    assert changed_files(seal_before, workspace_fingerprint(str(seal_dir))) == []


def test_the_site_environment_is_cleared_for_the_audit_and_restored_after(tmp_path, cxr_config, monkeypatch):
    workspace = client_workspace(tmp_path, "site-1", "clinical", cxr_config)
    monkeypatch.setenv(DATA_ENV, "/elsewhere/{site_name}.json")
    monkeypatch.setenv(BUDGET_ENV, "/elsewhere/budget.json")
    os.remove(os.path.join(workspace, "local", "medflare_data.json"))
    with pytest.raises(AuditError, match="cannot find the site's data"):
        open_site(workspace)  # the variable names a file that does not exist: said, not guessed
    monkeypatch.delenv(DATA_ENV)
    with open(os.path.join(workspace, "local", "medflare_data.json"), "w") as f:
        json.dump({"data_root": os.path.dirname(cxr_config), "datalist": os.path.join(os.path.dirname(cxr_config), "outcomes.csv")}, f)
    site = open_site(workspace)
    with scratch_copy(site):
        assert BUDGET_ENV not in os.environ and DATA_ENV not in os.environ
    assert os.environ[BUDGET_ENV] == "/elsewhere/budget.json"


@pytest.mark.parametrize(
    "damage, message",
    [
        ("no_workspace", "not a folder"),
        ("no_policy", "no privacy policy; install a site profile"),
        ("bad_json", "cannot read the site's privacy policy"),
        ("no_scopes", "needs a list of scopes"),
        ("no_data", "cannot find the site's data"),
    ],
)
def test_a_site_that_cannot_be_audited_is_named(tmp_path, cxr_config, damage, message):
    workspace = client_workspace(tmp_path, "site-1", "research", cxr_config)
    policy = os.path.join(workspace, "local", "privacy.json")
    if damage == "no_workspace":
        workspace = str(tmp_path / "nowhere")
    elif damage == "no_policy":
        os.remove(policy)
    elif damage == "bad_json":
        open(policy, "w").write("{not json")
    elif damage == "no_scopes":
        open(policy, "w").write('{"scopes": "all"}')
    elif damage == "no_data":
        os.remove(os.path.join(workspace, "local", "medflare_data.json"))
    with pytest.raises(AuditError, match=message):
        open_site(workspace)


def test_nvflare_refusing_the_policy_is_reported_with_the_file(tmp_path, cxr_config):
    workspace = client_workspace(tmp_path, "site-1", "research", cxr_config)
    policy = os.path.join(workspace, "local", "privacy.json")
    with open(policy) as f:
        content = json.load(f)
    content["scopes"][0]["task_result_filters"] = [{"path": "no.such.Filter", "args": {}}]
    with open(policy, "w") as f:
        json.dump(content, f)
    site = open_site(workspace)
    with pytest.raises(AuditError, match="NVFlare refuses the site's privacy policy"):
        with scratch_copy(site):
            pass


def test_the_fingerprint_sees_added_changed_and_removed_files_but_not_the_report(tmp_path):
    (tmp_path / "a").write_text("1")
    (tmp_path / "b").write_text("2")
    (tmp_path / "report").mkdir()
    before = workspace_fingerprint(str(tmp_path), skip=str(tmp_path / "report"))
    (tmp_path / "a").write_text("x")
    (tmp_path / "b").unlink()
    (tmp_path / "c").write_text("3")
    (tmp_path / "report" / "r.json").write_text("{}")
    assert changed_files(before, workspace_fingerprint(str(tmp_path), skip=str(tmp_path / "report"))) == ["a", "b", "c"]


def test_a_site_with_several_data_sets_is_opened_for_the_one_the_job_asks_for(tmp_path, cxr_config, tiny_sites):
    """The copy's data configuration is the audited data set alone, as a flat file: it serves the
    job's executor whatever name it asks for, and the real keyed file is left as it was."""
    from medflare.data.site_data_config import read_site_data_config

    workspace = client_workspace(tmp_path, "site-1", "research", [tiny_sites["site-1"], cxr_config])
    with pytest.raises(AuditError, match=r"holds several data sets \['segmentation', 'outcome_image'\] and none was asked for"):
        open_site(workspace)
    with pytest.raises(AuditError, match=r"no data set 'outcome_table' \(asked for by the job\); this site has \['segmentation', 'outcome_image'\]"):
        open_site(workspace, dataset="outcome_table", dataset_from="the job")
    site = open_site(workspace, dataset="outcome_image")
    assert site.data.dataset == "outcome_image" and site.data.datalist.endswith("cases.csv")
    before = workspace_fingerprint(workspace)
    with scratch_copy(site) as scratch:
        copied = os.path.join(scratch.local_dir, "medflare_data.json")
        for name in ("outcome_image", "segmentation", None):  # flat: the executor finds it by any name
            config = read_site_data_config(copied, name)
            assert (config.data_root, config.datalist, config.dataset) == (site.data.data_root, site.data.datalist, None)
    assert changed_files(before, workspace_fingerprint(workspace)) == []
    assert open_site(workspace, dataset="segmentation").data.datalist == os.path.join(os.path.dirname(tiny_sites["site-1"]), "datalist.json")
