import json
import subprocess
import sys

import pytest

from medflare.privacy.accounting import epsilon_spent
from medflare.privacy.budget_ledger import LedgerError, PrivacyBudgetExceeded, PrivacyBudgetLedger

_RESERVE = """
import sys
from medflare.privacy.budget_ledger import PrivacyBudgetLedger
ledger = PrivacyBudgetLedger(sys.argv[1], max_epsilon=float(sys.argv[2]), delta=1e-5)
print(ledger.reserve(2.0, job_id=sys.argv[3], round_number=int(sys.argv[4]))[1])
"""


def _reserve_in_new_process(path, max_epsilon, job, round_number):
    return subprocess.run(
        [sys.executable, "-c", _RESERVE, str(path), str(max_epsilon), job, str(round_number)],
        capture_output=True,
        text=True,
    )


def test_budget_spans_jobs_and_process_restarts_and_blocks_at_the_limit(tmp_path):
    path = tmp_path / "local" / "medflare_privacy_ledger.json"
    budget = epsilon_spent([(2.0, 3)], 1e-5) + 1e-9  # room for exactly three releases at z = 2
    for job, rnd in (("job-a", 0), ("job-a", 1), ("job-b", 0)):
        done = _reserve_in_new_process(path, budget, job, rnd)
        assert done.returncode == 0, done.stderr
    assert float(done.stdout) == pytest.approx(epsilon_spent([(2.0, 3)], 1e-5))

    refused = _reserve_in_new_process(path, budget, "job-c", 0)
    assert refused.returncode != 0
    assert "PrivacyBudgetExceeded: privacy budget exhausted" in refused.stderr
    releases = PrivacyBudgetLedger.read_releases(str(path))
    assert [(r["job_id"], r["round"]) for r in releases] == [("job-a", 0), ("job-a", 1), ("job-b", 0)]


def test_refused_release_records_nothing(tmp_path):
    ledger = PrivacyBudgetLedger(str(tmp_path / "l.json"), max_epsilon=1.0, delta=1e-5)
    with pytest.raises(PrivacyBudgetExceeded, match="above max_epsilon 1"):
        ledger.reserve(0.5)
    assert ledger.read_releases(ledger.path) == []
    assert ledger.epsilon_spent() == 0.0


def test_mixed_noise_multipliers_compose(tmp_path):
    ledger = PrivacyBudgetLedger(str(tmp_path / "l.json"), max_epsilon=100.0, delta=1e-5)
    ledger.reserve(1.0)
    ledger.reserve(3.0)
    _, after = ledger.reserve(1.0)
    assert after == pytest.approx(epsilon_spent([(1.0, 2), (3.0, 1)], 1e-5))


@pytest.mark.parametrize(
    "content, message",
    [
        ("{broken", "unreadable"),
        (json.dumps({"releases": []}), "is not a medflare-privacy-ledger/1 file"),
        (json.dumps({"format": "medflare-privacy-ledger/1", "releases": [{"noise_multiplier": "x"}]}), "release 0"),
    ],
)
def test_a_damaged_ledger_blocks_instead_of_resetting(tmp_path, content, message):
    path = tmp_path / "l.json"
    path.write_text(content)
    ledger = PrivacyBudgetLedger(str(path), max_epsilon=100.0, delta=1e-5)
    with pytest.raises(LedgerError, match=message):
        ledger.reserve(1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_epsilon": 0.0}, "max_epsilon must be in"),
        ({"max_epsilon": float("inf")}, "max_epsilon must be a finite"),
        ({"delta": 1.0}, "delta must be in"),
        ({"accountant": "moments"}, "accountant must be one of"),
    ],
)
def test_bad_ledger_settings_are_refused(tmp_path, kwargs, message):
    args = {"path": str(tmp_path / "l.json"), "max_epsilon": 1.0, "delta": 1e-5, **kwargs}
    with pytest.raises(ValueError, match=message):
        PrivacyBudgetLedger(**args)
