"""``medflare budget show`` and ``medflare budget acknowledge``: the site admin's view of the budget."""

import json
import os

import pytest

from medflare.cli.main import main
from medflare.privacy.accounting import epsilon_spent
from medflare.privacy.budget_ledger import LEDGER_FILE_NAME, PrivacyBudgetLedger
from medflare.privacy.site_budget import SITE_BUDGET_FILE_NAME


def _site(tmp_path, max_epsilon=30.0, **fields):
    local = tmp_path / "local"
    local.mkdir(parents=True, exist_ok=True)
    (local / SITE_BUDGET_FILE_NAME).write_text(json.dumps({"max_epsilon": max_epsilon, "delta": 1e-5, "accountant": "rdp", **fields}))
    return PrivacyBudgetLedger.open_site(str(local))


def test_budget_show_prints_releases_per_job_and_the_epsilon_spent(tmp_path, capsys):
    ledger = _site(tmp_path, max_epsilon=30.0)
    for job, rnd in (("job-a", 0), ("job-a", 1), ("job-b", 0)):
        ledger.reserve(2.0, job_id=job, round_number=rnd)
    assert main(["budget", "show", "--workspace", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    spent = epsilon_spent([(2.0, 3)], 1e-5)
    assert f"epsilon spent: {spent:.4g} at delta 1e-05 (rdp accountant)" in out
    assert f"remaining: {30.0 - spent:.4g}" in out
    rows = [line.split() for line in out.splitlines()]
    assert ["job-a", "2", "2", "x2", f"{epsilon_spent([(2.0, 2)], 1e-5):.4g}"] == rows[3][:5]
    assert ["job-b", "1", "2", "x1", f"{epsilon_spent([(2.0, 1)], 1e-5):.4g}"] == rows[4][:5]
    assert "seal: " in out and "matches the ledger" in out
    assert "tamper events" not in out


def test_the_cap_shown_is_the_sites_not_the_latest_filters(tmp_path, capsys):
    _site(tmp_path, max_epsilon=8.0)
    job_ledger = PrivacyBudgetLedger(str(tmp_path / "local" / LEDGER_FILE_NAME), 1000.0, 1e-5)  # a filter's own cap
    job_ledger.reserve(2.4)
    assert main(["budget", "show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "site budget: max_epsilon 8 at delta 1e-05 (rdp)" in out and SITE_BUDGET_FILE_NAME in out
    assert f"remaining: {8.0 - epsilon_spent([(2.4, 1)], 1e-5):.4g}" in out


def test_dp_sgd_releases_are_shown_with_their_sampling(tmp_path, capsys):
    ledger = _site(tmp_path)
    ledger.reserve(1.1, job_id="patient-dp", sample_rate=0.01, steps=500, mechanism="dp_sgd")
    assert main(["budget", "show", str(tmp_path)]) == 0
    assert "1.1 q0.01 T500 x1" in capsys.readouterr().out


def test_budget_show_on_a_fresh_site_and_on_a_damaged_ledger(tmp_path, capsys):
    assert main(["budget", "show", "--workspace", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no releases recorded; epsilon spent 0" in out and "site budget: NONE" in out
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / LEDGER_FILE_NAME).write_text("{oops")
    assert main(["budget", "show", "--workspace", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is unreadable" in err and "medflare budget acknowledge" in err


def test_without_a_site_budget_the_latest_releases_cap_is_shown_as_such(tmp_path, capsys):
    ledger = PrivacyBudgetLedger(str(tmp_path / "local" / LEDGER_FILE_NAME), 2.0, 1e-5)
    ledger.reserve(2.4)
    assert main(["budget", "show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "site budget: NONE" in out and "the latest release was checked against max_epsilon 2" in out
    assert "releases: 1" in out and f"remaining: {2.0 - epsilon_spent([(2.4, 1)], 1e-5):.4g}" in out


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_budget_show_recomputes_at_another_delta_or_accountant(tmp_path, capsys, accountant):
    ledger = PrivacyBudgetLedger(str(tmp_path / "l.json"), max_epsilon=30.0, delta=1e-5)
    ledger.reserve(2.0)
    assert main(["budget", "show", "--workspace", str(tmp_path / "l.json"), "--delta", "1e-6", "--accountant", accountant]) == 0
    out = capsys.readouterr().out
    expected = epsilon_spent([(2.0, 1)], 1e-6, accountant)
    assert f"epsilon spent: {expected:.4g} at delta 1e-06 ({accountant} accountant)" in out
    assert f"epsilon spent at the site's delta 1e-05 (rdp): {epsilon_spent([(2.0, 1)], 1e-5):.4g}" in out


def test_a_tampered_ledger_is_shown_as_an_error_with_the_fix_then_acknowledged(tmp_path, capsys):
    ledger = _site(tmp_path, max_epsilon=8.0)
    for rnd in range(3):
        ledger.reserve(2.4, job_id="job-a", round_number=rnd)
    sealed = ledger.epsilon_spent()
    os.remove(ledger.path)

    assert main(["budget", "show", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is missing but its seal" in err and "records 3 records" in err and "deleted or moved" in err
    assert "(blocked since 20" in err and "Every release is blocked" in err
    assert f'medflare budget acknowledge {tmp_path} --reason "..."' in err

    assert main(["budget", "acknowledge", str(tmp_path), "--reason", "a job's clean-up removed local/; no backup"]) == 0
    out = capsys.readouterr().out
    assert "acknowledged: privacy ledger" in out and "carried over from the seal: z 2.4 q 1 x3" in out
    assert f"epsilon spent: {sealed:.4g}" in out

    assert main(["budget", "show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"epsilon spent: {sealed:.4g}" in out and "releases: 0 (and 3 carried over from the seal" in out
    assert "tamper events:" in out and "acknowledged by" in out and "a job's clean-up removed local/; no backup" in out
    assert "blocked since 20" in out

    assert main(["budget", "acknowledge", str(tmp_path), "--reason", "again"]) == 0
    assert "nothing to acknowledge" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["budget", "show"], "give the site's workspace once"),
        (["budget", "show", "a", "--workspace", "b"], "give the site's workspace once"),
    ],
)
def test_the_workspace_is_given_exactly_once(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_acknowledge_needs_a_reason_and_a_site_budget(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["budget", "acknowledge", str(tmp_path)])  # argparse: --reason is required
    capsys.readouterr()
    assert main(["budget", "acknowledge", str(tmp_path), "--reason", "x"]) == 2
    assert "site has no privacy budget" in capsys.readouterr().err
    _site(tmp_path)
    assert main(["budget", "acknowledge", str(tmp_path), "--reason", "  "]) == 2
    assert "reason must be a non-empty string" in capsys.readouterr().err
