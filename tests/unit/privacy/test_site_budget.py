"""The site budget file: the lifetime cap lives in the site's configuration and is checked loudly."""

import json
import os

import pytest

from medflare.privacy.budget_ledger import LedgerError
from medflare.privacy.site_budget import SITE_BUDGET_FILE_NAME, SiteBudget, load_site_budget, parse_site_budget

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
VALID = {"max_epsilon": 8.0, "delta": 1e-5, "accountant": "rdp"}


def _write(tmp_path, content):
    path = tmp_path / SITE_BUDGET_FILE_NAME
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(tmp_path)


def test_a_valid_budget_loads(tmp_path):
    assert load_site_budget(_write(tmp_path, VALID)) == SiteBudget(8.0, 1e-5, "rdp", None)
    budget = load_site_budget(_write(tmp_path, {**VALID, "max_epsilon": 3, "accountant": "prv", "seal_path": "/var/lib/m/../m/s.seal"}))
    assert budget == SiteBudget(3.0, 1e-5, "prv", "/var/lib/m/s.seal")
    assert isinstance(budget.max_epsilon, float)


def test_a_budget_is_frozen(tmp_path):
    budget = load_site_budget(_write(tmp_path, VALID))
    with pytest.raises(AttributeError):
        budget.max_epsilon = 1000.0


def test_a_missing_budget_says_how_to_get_one(tmp_path):
    expected = (
        f"site has no privacy budget: {tmp_path / SITE_BUDGET_FILE_NAME} not found; install a site profile "
        "(medflare site install) or write it, see docs/site-admin.md"
    )
    with pytest.raises(LedgerError) as missing:
        load_site_budget(str(tmp_path))
    assert str(missing.value) == expected


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not readable JSON"),
        ("", "is not readable JSON"),
        ("[8, 1e-5]", "must be a JSON object with max_epsilon, delta, accountant, got list"),
        ({**VALID, "max_epsilom": 1000}, r"unknown field\(s\) \['max_epsilom'\]; allowed: max_epsilon, delta, accountant, seal_path"),
        ({"delta": 1e-5, "accountant": "rdp"}, r"missing field 'max_epsilon' \(a real number in \(0, inf\)\)"),
        ({"max_epsilon": 8.0, "accountant": "rdp"}, "missing field 'delta'"),
        ({"max_epsilon": 8.0, "delta": 1e-5}, "missing field 'accountant'"),
        ({**VALID, "max_epsilon": 0}, r"max_epsilon must be in \(0.0, inf\), got 0.0"),
        ({**VALID, "max_epsilon": -8}, r"max_epsilon must be in \(0.0, inf\), got -8.0"),
        ({**VALID, "max_epsilon": "8"}, r"max_epsilon must be a real number in \(0.0, inf\), got '8' \(str\)"),
        ({**VALID, "max_epsilon": True}, r"max_epsilon must be a real number .* got True \(bool\)"),
        ({**VALID, "max_epsilon": None}, r"max_epsilon must be a real number .* got None"),
        ('{"max_epsilon": Infinity, "delta": 1e-5, "accountant": "rdp"}', "max_epsilon must be a finite real number"),
        ('{"max_epsilon": NaN, "delta": 1e-5, "accountant": "rdp"}', "max_epsilon must be a finite real number"),
        ({**VALID, "delta": 0}, r"delta must be in \(0.0, 1.0\), got 0.0"),
        ({**VALID, "delta": 1}, r"delta must be in \(0.0, 1.0\), got 1.0"),
        ({**VALID, "delta": 1.5}, r"delta must be in \(0.0, 1.0\), got 1.5"),
        ({**VALID, "accountant": "moments"}, r"accountant must be one of 'rdp', 'prv', got 'moments'"),
        ({**VALID, "accountant": None}, "accountant must be one of"),
        ({**VALID, "seal_path": "relative/site.seal"}, "seal_path must be an absolute path, got 'relative/site.seal'"),
        ({**VALID, "seal_path": ""}, "seal_path must be an absolute path, got ''"),
        ({**VALID, "seal_path": 7}, "seal_path must be an absolute path, got 7"),
    ],
)
def test_a_malformed_budget_is_refused_naming_field_value_and_range(tmp_path, content, message):
    local = _write(tmp_path, content)
    with pytest.raises(LedgerError, match=message) as refused:
        load_site_budget(local)
    assert str(refused.value).startswith(f"site privacy budget {tmp_path / SITE_BUDGET_FILE_NAME}: ")


def test_a_budget_that_is_a_directory_is_missing(tmp_path):
    (tmp_path / SITE_BUDGET_FILE_NAME).mkdir()
    with pytest.raises(LedgerError, match="site has no privacy budget"):
        load_site_budget(str(tmp_path))


def test_parse_names_its_source():
    with pytest.raises(LedgerError, match="site privacy budget profile/x.json: missing field 'delta'"):
        parse_site_budget({"max_epsilon": 1.0, "accountant": "rdp"}, "profile/x.json")


@pytest.mark.parametrize("profile, cap", [("research", 10.0), ("clinical", 8.0)])
def test_shipped_profile_budgets(profile, cap):
    folder = os.path.join(REPO, "site_configs", profile)
    assert load_site_budget(folder) == SiteBudget(cap, 1e-5, "rdp", None)
    with open(os.path.join(folder, "privacy.json")) as f:
        policy = json.load(f)
    for scope in policy["scopes"]:  # the scopes' Gaussian filters agree with the site's budget
        for component in scope["task_result_filters"]:
            if component["path"].endswith("GaussianPrivacyFilter"):
                args = component["args"]
                assert (args["max_epsilon"], args["target_delta"], args["accountant"]) == (cap, 1e-5, "rdp")


def test_a_client_without_a_local_budget_reads_the_file_its_environment_names(tmp_path):
    from medflare.privacy.site_budget import ENV_VAR

    local = tmp_path / "site-2" / "local"
    local.mkdir(parents=True)
    (tmp_path / "budget-site-2.json").write_text(json.dumps({"max_epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"}))
    env = {ENV_VAR: str(tmp_path / "budget-{site_name}.json")}
    assert load_site_budget(str(local), "site-2", env).max_epsilon == 3.0
    with pytest.raises(LedgerError, match=r"budget-site-9.json \(from MEDFLARE_PRIVACY_BUDGET\) not found"):
        load_site_budget(str(local), "site-9", env)
    # the site's own file wins over the environment
    (local / "medflare_privacy_budget.json").write_text(json.dumps({"max_epsilon": 1.0, "delta": 1e-5, "accountant": "rdp"}))
    assert load_site_budget(str(local), "site-2", env).max_epsilon == 1.0
