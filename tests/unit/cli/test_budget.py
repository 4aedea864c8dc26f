import pytest

from medflare.cli.main import main
from medflare.privacy.accounting import epsilon_spent
from medflare.privacy.budget_ledger import LEDGER_FILE_NAME, PrivacyBudgetLedger


def test_budget_show_prints_releases_per_job_and_the_epsilon_spent(tmp_path, capsys):
    path = tmp_path / "local" / LEDGER_FILE_NAME
    ledger = PrivacyBudgetLedger(str(path), max_epsilon=30.0, delta=1e-5)
    for job, rnd in (("job-a", 0), ("job-a", 1), ("job-b", 0)):
        ledger.reserve(2.0, job_id=job, round_number=rnd)
    assert main(["budget", "show", "--workspace", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    spent = epsilon_spent([(2.0, 3)], 1e-5)
    assert f"epsilon spent: {spent:.4g} at delta 1e-05 (rdp accountant)" in out
    assert f"remaining: {30.0 - spent:.4g}" in out
    rows = [line.split() for line in out.splitlines()]
    assert ["job-a", "2", "2", "x2"] == rows[3][:4] and ["job-b", "1", "2", "x1"] == rows[4][:4]


def test_budget_show_on_a_fresh_site_and_on_a_damaged_ledger(tmp_path, capsys):
    assert main(["budget", "show", "--workspace", str(tmp_path)]) == 0
    assert "no Gaussian releases recorded; epsilon spent 0" in capsys.readouterr().out
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / LEDGER_FILE_NAME).write_text("{oops")
    assert main(["budget", "show", "--workspace", str(tmp_path)]) == 2
    assert "is unreadable" in capsys.readouterr().err


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_budget_show_recomputes_at_another_delta_or_accountant(tmp_path, capsys, accountant):
    ledger = PrivacyBudgetLedger(str(tmp_path / "l.json"), max_epsilon=30.0, delta=1e-5)
    ledger.reserve(2.0)
    assert main(["budget", "show", "--workspace", str(tmp_path / "l.json"), "--delta", "1e-6", "--accountant", accountant]) == 0
    expected = epsilon_spent([(2.0, 1)], 1e-6, accountant)
    assert f"epsilon spent: {expected:.4g} at delta 1e-06 ({accountant} accountant)" in capsys.readouterr().out
