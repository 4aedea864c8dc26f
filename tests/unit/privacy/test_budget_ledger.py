"""The site's privacy ledger: the site's cap, composition of every release, tamper evidence.

Hostile by design: each way a ledger can lose records (deletion, truncation, an older copy, an
edit, garbage, a directory in its place, a missing seal) must block releases instead of giving
the site its budget back, and only the site admin's acknowledgement lifts the block without
lowering the epsilon spent.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

import medflare.privacy.budget_ledger as budget_ledger
from medflare.privacy.accounting import epsilon_of_history, epsilon_spent
from medflare.privacy.budget_ledger import (
    GENESIS,
    LEDGER_FILE_NAME,
    SEAL_FILE_NAME,
    LedgerError,
    PrivacyBudgetExceeded,
    PrivacyBudgetLedger,
    record_digest,
)
from medflare.privacy.site_budget import SITE_BUDGET_FILE_NAME

FIX = "medflare budget acknowledge"

_RESERVE = """
import sys
from medflare.privacy.budget_ledger import PrivacyBudgetLedger
ledger = PrivacyBudgetLedger(sys.argv[1], max_epsilon=float(sys.argv[2]), delta=1e-5)
print(ledger.reserve(2.0, job_id=sys.argv[3], round_number=int(sys.argv[4]))[1])
"""

_RESERVE_MANY = """
import os, sys, time
from medflare.privacy.accounting import epsilon_spent
from medflare.privacy.budget_ledger import PrivacyBudgetLedger
epsilon_spent([(1.0, 1)], 1e-5)  # Opacus imported: the processes start reserving together
open(sys.argv[4] + "." + sys.argv[2], "w").close()
while not os.path.exists(sys.argv[4]):
    time.sleep(0.005)
ledger = PrivacyBudgetLedger.open_site(sys.argv[1])
for n in range(int(sys.argv[3])):
    ledger.reserve(20.0, job_id=sys.argv[2], round_number=n)
"""

# as _RESERVE_MANY, but process p alternates a site-level Gaussian release (z = 20) with a
# DP-SGD round of 3 steps at z = 1 + 0.2 (p % 2), q = 0.01 + 0.02 (p % 2): two kinds of DP-SGD
# round (each distinct (z, q) costs Opacus about 0.3 s per epsilon on a busy core)
_RESERVE_MIXED = _RESERVE_MANY.replace(
    "    ledger.reserve(20.0, job_id=sys.argv[2], round_number=n)\n",
    """    p = int(sys.argv[2].rsplit("-", 1)[1])
    if n % 2 == 0:
        ledger.reserve(20.0, job_id=sys.argv[2], round_number=n, source="GaussianPrivacyFilter")
    else:
        ledger.reserve(1.0 + 0.2 * (p % 2), job_id=sys.argv[2], round_number=n, source="PatientDPSGDFilter",
                       sample_rate=0.01 + 0.02 * (p % 2), steps=3, mechanism="dp_sgd")
""",
)
assert _RESERVE_MIXED != _RESERVE_MANY


def _reserve_in_new_process(path, max_epsilon, job, round_number):
    return subprocess.run(
        [sys.executable, "-c", _RESERVE, str(path), str(max_epsilon), job, str(round_number)],
        capture_output=True,
        text=True,
    )


def _write_budget(local, **fields):
    local.mkdir(parents=True, exist_ok=True)
    content = {"max_epsilon": 8.0, "delta": 1e-5, "accountant": "rdp", **fields}
    (local / SITE_BUDGET_FILE_NAME).write_text(json.dumps(content))
    return local


@pytest.fixture
def local(tmp_path):
    """A client's ``local/`` folder with the clinical budget: epsilon 8 at delta 1e-5, RDP."""
    return _write_budget(tmp_path / "site-1" / "local")


def _spent_site(local, releases=3, z=2.4):
    ledger = PrivacyBudgetLedger.open_site(str(local))
    for n in range(releases):
        ledger.reserve(z, job_id="job-a", round_number=n, source="test")
    return ledger


def _content(ledger):
    with open(ledger.path) as f:
        return json.load(f)


def _store(ledger, content):
    with open(ledger.path, "w") as f:
        json.dump(content, f)


# the constructor kept from format 1 --------------------------------------------------------


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
    assert not os.path.exists(ledger.path) and not os.path.exists(ledger.seal_path)


def test_mixed_noise_multipliers_compose(tmp_path):
    ledger = PrivacyBudgetLedger(str(tmp_path / "l.json"), max_epsilon=100.0, delta=1e-5)
    ledger.reserve(1.0)
    ledger.reserve(3.0)
    _, after = ledger.reserve(1.0)
    assert after == pytest.approx(epsilon_spent([(1.0, 2), (3.0, 1)], 1e-5))


def test_the_default_seal_sits_next_to_the_ledger(tmp_path):
    ledger = PrivacyBudgetLedger(str(tmp_path / "local" / LEDGER_FILE_NAME), 8.0, 1e-5)
    assert ledger.seal_path == str(tmp_path / "local" / SEAL_FILE_NAME)
    assert PrivacyBudgetLedger(str(tmp_path / "l.json"), 8.0, 1e-5).seal_path == str(tmp_path / ".l.seal")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_epsilon": 0.0}, "max_epsilon must be in"),
        ({"max_epsilon": float("inf")}, "max_epsilon must be a finite"),
        ({"max_epsilon": True}, "max_epsilon must be a real number"),
        ({"delta": 1.0}, "delta must be in"),
        ({"accountant": "moments"}, "accountant must be one of"),
        ({"seal_path": ""}, "seal_path must be a file path or None"),
        ({"seal_path": "SELF"}, "seal_path must differ from the ledger's path"),
    ],
)
def test_bad_ledger_settings_are_refused(tmp_path, kwargs, message):
    args = {"path": str(tmp_path / "l.json"), "max_epsilon": 1.0, "delta": 1e-5, **kwargs}
    if args.get("seal_path") == "SELF":
        args["seal_path"] = args["path"]
    with pytest.raises((ValueError, TypeError), match=message):
        PrivacyBudgetLedger(**args)


# the site's budget, the job's limit --------------------------------------------------------


def test_open_site_takes_cap_delta_accountant_and_seal_from_the_site(tmp_path):
    seal = tmp_path / "elsewhere" / "site-1.seal"
    local = _write_budget(tmp_path / "ws" / "local", max_epsilon=3.5, delta=1e-6, accountant="prv", seal_path=str(seal))
    ledger = PrivacyBudgetLedger.open_site(str(local))
    assert (ledger.path, ledger.max_epsilon, ledger.delta, ledger.accountant) == (str(local / LEDGER_FILE_NAME), 3.5, 1e-6, "prv")
    assert ledger.seal_path == str(seal)
    ledger.reserve(3.0)
    assert seal.is_file() and not (local / SEAL_FILE_NAME).exists()


def test_open_site_without_a_budget_refuses(tmp_path):
    with pytest.raises(LedgerError, match=r"site has no privacy budget: .*medflare_privacy_budget.json not found; install a site profile"):
        PrivacyBudgetLedger.open_site(str(tmp_path))


def test_the_site_cap_wins_over_a_larger_job_limit(local):
    fits = 0
    while epsilon_spent([(2.4, fits + 1)], 1e-5) <= 8.0:
        fits += 1
    assert fits == 14  # FACTS.md: about 14 releases at z = 2.4 within epsilon 8
    ledger = _spent_site(local, releases=fits)
    with pytest.raises(PrivacyBudgetExceeded, match=r"above max_epsilon 8 \(the site's cap\)"):
        ledger.reserve(2.4, limit=1000.0)
    assert len(ledger.read_releases(ledger.path)) == fits


def test_a_smaller_job_limit_wins_and_binds_only_that_job(local):
    ledger = PrivacyBudgetLedger.open_site(str(local))
    one = epsilon_spent([(2.4, 1)], 1e-5)
    assert ledger.reserve(2.4, limit=2.0) == (0.0, pytest.approx(one))
    with pytest.raises(PrivacyBudgetExceeded, match=r"above the job's limit 2 \(the site's max_epsilon is 8\)"):
        ledger.reserve(2.4, limit=2.0)
    ledger.reserve(2.4)  # another job, without a limit, still has the site's budget
    records = ledger.read_releases(ledger.path)
    assert [(r["max_epsilon"], r["limit"]) for r in records] == [(8.0, 2.0), (8.0, None)]


def test_a_job_delta_above_the_sites_is_refused_and_a_smaller_one_checks_the_limit_there(local):
    ledger = PrivacyBudgetLedger.open_site(str(local))
    with pytest.raises(LedgerError, match=r"the job's delta 0.0001 is above the site's delta 1e-05"):
        ledger.reserve(2.4, delta=1e-4)
    at_site, at_job = epsilon_spent([(2.4, 1)], 1e-5), epsilon_spent([(2.4, 1)], 1e-6)
    assert at_site < at_job
    with pytest.raises(PrivacyBudgetExceeded, match=r"the job's delta 1e-06.*above the job's limit"):
        ledger.reserve(2.4, delta=1e-6, limit=(at_site + at_job) / 2)
    assert ledger.reserve(2.4, delta=1e-5)[1] == pytest.approx(at_site)
    assert ledger.read_releases(ledger.path)[0]["job_delta"] == 1e-5


def test_a_release_record_says_what_was_released_and_against_what(local):
    ledger = PrivacyBudgetLedger.open_site(str(local))
    ledger.reserve(2.4, job_id="j", round_number=3, source="GaussianPrivacyFilter", limit=5.0)
    ledger.reserve(1.1, job_id="k", sample_rate=0.01, steps=500, mechanism="dp_sgd")
    first, second = _content(ledger)["records"]
    assert first["prev"] == GENESIS and second["prev"] == record_digest(first)
    assert {k: first[k] for k in ("event", "job_id", "round", "source", "mechanism", "noise_multiplier", "sample_rate", "steps")} == {
        "event": "release", "job_id": "j", "round": 3, "source": "GaussianPrivacyFilter",
        "mechanism": "gaussian", "noise_multiplier": 2.4, "sample_rate": 1.0, "steps": 1,
    }
    assert (first["max_epsilon"], first["limit"], first["delta"], first["accountant"]) == (8.0, 5.0, 1e-5, "rdp")
    assert (second["mechanism"], second["sample_rate"], second["steps"]) == ("dp_sgd", 0.01, 500)
    assert second["epsilon_before"] == first["epsilon_after"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier must be in"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier must be a finite"),
        ({"noise_multiplier": "2.4"}, "noise_multiplier must be a real number"),
        ({"sample_rate": 0.5}, "a 'gaussian' release is one site-level release"),
        ({"steps": 3}, "a 'gaussian' release is one site-level release"),
        ({"mechanism": "laplace"}, r"mechanism must be one of \('gaussian', 'dp_sgd'\)"),
        ({"mechanism": "dp_sgd", "sample_rate": 0.0}, "sample_rate must be in"),
        ({"mechanism": "dp_sgd", "sample_rate": 1.5}, "sample_rate must be in"),
        ({"mechanism": "dp_sgd", "steps": 0}, r"steps must be an int in \[1, inf\]"),
        ({"mechanism": "dp_sgd", "steps": 2.0}, "steps must be an int"),
        ({"limit": 0.0}, "limit must be in"),
        ({"limit": True}, "limit must be a real number"),
        ({"delta": 0.0}, "delta must be in"),
    ],
)
def test_bad_release_arguments_are_refused_and_nothing_is_recorded(local, kwargs, message):
    ledger = PrivacyBudgetLedger.open_site(str(local))
    args = {"noise_multiplier": 2.4, **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        ledger.reserve(**args)
    assert not os.path.exists(ledger.path)


# composition --------------------------------------------------------------------------------

MIXED = [
    dict(noise_multiplier=2.4),
    dict(noise_multiplier=1.1, sample_rate=0.01, steps=500, mechanism="dp_sgd"),
    dict(noise_multiplier=2.4),
    dict(noise_multiplier=0.9, sample_rate=0.02, steps=100, mechanism="dp_sgd"),
    dict(noise_multiplier=3.0),
    dict(noise_multiplier=2.4),
]


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_mixed_records_compose_exactly_as_opacus(tmp_path, accountant):
    local = _write_budget(tmp_path / "local", max_epsilon=1000.0, accountant=accountant)
    ledger = PrivacyBudgetLedger.open_site(str(local))
    for release in MIXED:
        _, after = ledger.reserve(**release)
    opacus = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for r in MIXED:  # Opacus's own bookkeeping, one step at a time
        for _ in range(r.get("steps", 1)):
            opacus.step(noise_multiplier=r["noise_multiplier"], sample_rate=r.get("sample_rate", 1.0))
    expected = opacus.get_epsilon(delta=1e-5)
    rel = 1e-9 if accountant == "rdp" else 1e-3  # PRV's numerical error bound is eps_error 0.01
    assert after == pytest.approx(expected, rel=rel)
    assert ledger.epsilon_spent() == after


@settings(max_examples=12, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.floats(0.5, 10), st.just(1.0), st.just(1)),
            st.tuples(st.floats(0.5, 5), st.floats(0.001, 0.5), st.integers(1, 2000)),
        ),
        min_size=1,
        max_size=5,
    ),
    st.sampled_from([1e-5, 1e-6]),
)
def test_epsilon_of_records_equals_opacus_rdp_for_any_history(history, delta):
    records = [
        {"noise_multiplier": z, "sample_rate": q, "steps": s, "mechanism": "gaussian" if q == 1.0 else "dp_sgd"}
        for z, q, s in history
    ]
    opacus = RDPAccountant()
    opacus.history = list(history)
    assert PrivacyBudgetLedger.epsilon_of(records, delta, "rdp") == pytest.approx(opacus.get_epsilon(delta=delta), rel=1e-9)


def test_format_1_ledgers_are_read_as_gaussian_releases_and_adopted(tmp_path):
    local = _write_budget(tmp_path / "local")
    legacy = {"format": "medflare-privacy-ledger/1", "releases": [{"noise_multiplier": 2.0, "job_id": "old"}, {"noise_multiplier": 2.0}]}
    (local / LEDGER_FILE_NAME).write_text(json.dumps(legacy))
    ledger = PrivacyBudgetLedger.open_site(str(local))
    assert ledger.inspect().state == "legacy"
    assert ledger.epsilon_spent() == pytest.approx(epsilon_spent([(2.0, 2)], 1e-5))
    releases = ledger.read_releases(ledger.path)
    assert [(r["mechanism"], r["sample_rate"], r["steps"]) for r in releases] == [("gaussian", 1.0, 1)] * 2
    _, after = ledger.reserve(2.0)
    assert after == pytest.approx(epsilon_spent([(2.0, 3)], 1e-5))
    content = _content(ledger)
    assert content["format"] == "medflare-privacy-ledger/2"
    assert [r["event"] for r in content["records"]] == ["release", "release", "adopted", "release"]
    assert content["records"][0]["job_id"] == "old"
    assert ledger.inspect().state == "sealed"


# tamper evidence ----------------------------------------------------------------------------


def _delete(ledger, tmp_path):
    os.remove(ledger.path)


def _truncate_json(ledger, tmp_path):
    content = _content(ledger)
    content["records"] = content["records"][:-1]
    _store(ledger, content)


def _older_copy(ledger, tmp_path):
    shutil.copy(tmp_path / "after_two.json", ledger.path)


def _raise_first_noise_multiplier(ledger, tmp_path):
    content = _content(ledger)
    content["records"][0]["noise_multiplier"] = 50.0
    _store(ledger, content)


def _raise_last_noise_multiplier(ledger, tmp_path):
    content = _content(ledger)
    content["records"][-1]["noise_multiplier"] = 50.0
    _store(ledger, content)


def _edit_and_rechain(ledger, tmp_path):
    content = _content(ledger)
    content["records"][0]["noise_multiplier"] = 50.0
    content["records"] = budget_ledger._chain([{k: v for k, v in r.items() if k != "prev"} for r in content["records"]])
    _store(ledger, content)


def _garbage(ledger, tmp_path):
    with open(ledger.path, "wb") as f:
        f.write(os.urandom(64))


def _empty(ledger, tmp_path):
    open(ledger.path, "w").close()


def _cut_in_half(ledger, tmp_path):
    text = open(ledger.path).read()
    open(ledger.path, "w").write(text[: len(text) // 2])


def _directory(ledger, tmp_path):
    os.remove(ledger.path)
    os.mkdir(ledger.path)


def _delete_seal(ledger, tmp_path):
    os.remove(ledger.seal_path)


def _garbage_seal(ledger, tmp_path):
    open(ledger.seal_path, "w").write("{}")


def _seal_counts_more(ledger, tmp_path):
    seal = json.load(open(ledger.seal_path))
    seal["records"] += 1
    json.dump(seal, open(ledger.seal_path, "w"))


def _seal_counts_fewer(ledger, tmp_path):
    seal = json.load(open(ledger.seal_path))
    seal["records"] -= 2
    json.dump(seal, open(ledger.seal_path, "w"))


def _append_unsealed(ledger, tmp_path):
    content = _content(ledger)
    for _ in range(2):
        extra = dict(content["records"][-1], prev=record_digest(content["records"][-1]))
        content["records"].append(extra)
    _store(ledger, content)


def _format_1_copy(ledger, tmp_path):
    _store(ledger, {"format": "medflare-privacy-ledger/1", "releases": [{"noise_multiplier": 2.4}]})


def _unknown_event(ledger, tmp_path):
    content = _content(ledger)
    content["records"][0]["event"] = "refund"
    _store(ledger, content)


TAMPERING = [
    (_delete, "is missing but its seal .* records 3 records .*deleted or moved"),
    (_truncate_json, "has 2 records, its seal .* 3 .*truncated or replaced by an older copy"),
    (_older_copy, "has 2 records, its seal .* 3 .*truncated or replaced by an older copy"),
    (_raise_first_noise_multiplier, r"record 1 does not extend record 0 \(hash chain broken\): the ledger was edited"),
    (_raise_last_noise_multiplier, "its records differ from the sealed ones: the ledger was edited or replaced"),
    (_edit_and_rechain, "its records differ from the sealed ones: the ledger was edited or replaced"),
    (_garbage, "is unreadable"),
    (_empty, r"is empty \(truncated\?\)"),
    (_cut_in_half, "is unreadable"),
    (_directory, "is not a file"),
    (_delete_seal, "has 3 sealed records but its seal .* is missing: the seal was deleted or moved"),
    (_garbage_seal, "is not a medflare-privacy-seal/1 file; the seal was damaged"),
    (_seal_counts_more, "has 3 records, its seal .* 4 .*truncated"),
    (_seal_counts_fewer, "has 3 records, its seal .* 1 .*records differ from the sealed ones"),
    (_append_unsealed, "has 5 records, its seal .* 3 .*2 records were added without being sealed"),
    (_format_1_copy, "unsealed format-1 file: it was replaced by an older copy"),
    (_unknown_event, "record 0 has unknown event 'refund'"),
]


@pytest.mark.parametrize("tamper, finding", TAMPERING, ids=[t.__name__.strip("_") for t, _ in TAMPERING])
def test_tampering_blocks_every_release_until_the_admin_acts(local, tmp_path, tamper, finding):
    ledger = _spent_site(local, releases=2)
    shutil.copy(ledger.path, tmp_path / "after_two.json")
    ledger.reserve(2.4, job_id="job-a", round_number=2)
    tamper(ledger, tmp_path)
    evidence = _snapshot(local)
    for _attempt in range(2):  # the block holds: a second attempt is refused the same way
        with pytest.raises(LedgerError, match=finding) as refused:
            PrivacyBudgetLedger.open_site(str(local)).reserve(2.4, job_id="job-b")
        assert "Nothing is released until the site admin acts" in str(refused.value) and FIX in str(refused.value)
    with pytest.raises(LedgerError, match=finding):
        ledger.epsilon_spent()
    after = _snapshot(local)
    assert {k: v for k, v in after.items() if not k.endswith(".blocked") and not k.endswith(".lock")} == {
        k: v for k, v in evidence.items() if not k.endswith(".lock")
    }  # nothing recorded, nothing repaired
    check = ledger.inspect()
    assert check.blocked and check.blocked_since  # when the block began is remembered


def _snapshot(folder):
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs]:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read() if os.path.isfile(path) else "dir"
    return out


def test_a_block_survives_deleting_the_damaged_ledger_and_its_seal_afterwards(local):
    ledger = _spent_site(local)
    os.remove(ledger.path)
    with pytest.raises(LedgerError):
        ledger.reserve(2.4)
    os.remove(ledger.seal_path)  # now everything the site spent is gone, but the block is not
    with pytest.raises(LedgerError, match="a block found .* was never acknowledged"):
        ledger.reserve(2.4)
    done = ledger.acknowledge("both files were deleted")  # the marker kept a copy of the seal
    assert done["floor"]["history"] == [[2.4, 1.0, 3]]
    assert ledger.epsilon_spent() == pytest.approx(epsilon_spent([(2.4, 3)], 1e-5))


def test_a_seal_from_another_site_is_named_as_such(tmp_path):
    one = _spent_site(_write_budget(tmp_path / "site-1" / "local"), releases=3)
    two = _spent_site(_write_budget(tmp_path / "site-2" / "local"), releases=2)
    shutil.copy(one.seal_path, two.seal_path)
    with pytest.raises(LedgerError, match=f"the seal was written for the ledger {one.path}"):
        two.reserve(2.4)


def test_deleting_ledger_and_seal_in_the_default_place_cannot_be_detected(local):
    """Documented limitation: with the seal in the workspace, deleting both files (before any
    read noticed) looks like a fresh site. A seal_path outside the workspace closes it (next test)."""
    ledger = _spent_site(local)
    os.remove(ledger.path)
    os.remove(ledger.seal_path)
    assert ledger.inspect().state == "fresh"
    assert ledger.epsilon_spent() == 0.0


def test_a_seal_outside_the_workspace_detects_the_loss_of_the_whole_local_folder(tmp_path):
    seal = tmp_path / "var" / "medflare" / "site-1.seal"
    local = _write_budget(tmp_path / "site-1" / "local", seal_path=str(seal))
    _spent_site(local)
    budget = (local / SITE_BUDGET_FILE_NAME).read_text()
    shutil.rmtree(local)  # the workspace's local/ is wiped (or the startup kit re-provisioned)
    _write_budget(local, seal_path=str(seal))
    assert (local / SITE_BUDGET_FILE_NAME).read_text() == budget
    with pytest.raises(LedgerError, match="is missing but its seal .*site-1.seal records 3 records"):
        PrivacyBudgetLedger.open_site(str(local)).reserve(2.4)


# crash between the two writes ---------------------------------------------------------------


def test_a_seal_one_record_behind_is_repaired(local, tmp_path):
    ledger = _spent_site(local, releases=2)
    shutil.copy(ledger.seal_path, tmp_path / "seal_after_two")
    ledger.reserve(2.4)
    shutil.copy(tmp_path / "seal_after_two", ledger.seal_path)  # as if the process died between the writes
    assert ledger.inspect().state == "seal_behind"
    _, after = ledger.reserve(2.4)
    assert after == pytest.approx(epsilon_spent([(2.4, 4)], 1e-5))
    check = ledger.inspect()
    assert check.state == "sealed" and len(check.records) == 4 and check.seal["records"] == 4


def test_a_failed_seal_write_fails_closed_and_is_repaired_by_the_next_release(local, monkeypatch):
    ledger = _spent_site(local, releases=1)
    real = budget_ledger._write_json

    def seal_fails(path, content, indent=None):
        if path == ledger.seal_path:
            raise OSError("disk full")
        real(path, content, indent)

    monkeypatch.setattr(budget_ledger, "_write_json", seal_fails)
    with pytest.raises(LedgerError, match="cannot write the privacy ledger's seal .*disk full"):
        ledger.reserve(2.4)  # the filter sees an error and releases nothing; the ledger over-counts
    monkeypatch.setattr(budget_ledger, "_write_json", real)
    assert ledger.inspect().state == "seal_behind"
    _, after = ledger.reserve(2.4)
    assert after == pytest.approx(epsilon_spent([(2.4, 3)], 1e-5))
    assert ledger.inspect().state == "sealed"


def test_a_failed_ledger_write_records_nothing(local, monkeypatch):
    ledger = _spent_site(local, releases=1)
    before = _snapshot(local)

    def fails(path, content, indent=None):
        raise OSError("read-only file system")

    monkeypatch.setattr(budget_ledger, "_write_json", fails)
    with pytest.raises(LedgerError, match="cannot write privacy ledger .*read-only file system; nothing released"):
        ledger.reserve(2.4)
    monkeypatch.undo()
    assert _snapshot(local) == before and ledger.inspect().state == "sealed"


# concurrency --------------------------------------------------------------------------------


def _reserve_concurrently(local, tmp_path, script, processes=4, reserves=10):
    """Start ``processes`` processes running ``script`` (jobs ``job-0`` ...), let them all reserve
    at once, wait for them; returns the site's ledger."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(local), f"job-{n}", str(reserves), str(go)], stderr=subprocess.PIPE, text=True, env=env
        )
        for n in range(processes)
    ]
    deadline = time.time() + 240
    while len(list(tmp_path.glob("go.job-*"))) < processes and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    return PrivacyBudgetLedger.open_site(str(local))


def test_concurrent_reserves_from_several_processes_lose_no_record(local, tmp_path):
    ledger = _reserve_concurrently(local, tmp_path, _RESERVE_MANY)
    check = ledger.inspect()
    assert check.state == "sealed" and check.seal["records"] == 40
    releases = ledger.read_releases(ledger.path)  # read_records checks the whole chain
    assert len(releases) == 40
    for n in range(4):
        assert [r["round"] for r in releases if r["job_id"] == f"job-{n}"] == list(range(10))
    assert ledger.epsilon_spent() == pytest.approx(epsilon_spent([(20.0, 40)], 1e-5))
    assert [r["epsilon_before"] for r in releases[1:]] == [r["epsilon_after"] for r in releases[:-1]]


def test_concurrent_gaussian_and_dp_sgd_reserves_compose_as_opacus(local, tmp_path):
    """Four processes, each alternating site-level Gaussian releases and DP-SGD rounds, into one
    site ledger: every record is kept, with its mechanism, and the site's epsilon is Opacus's for
    the whole mixed history, whatever order the processes' reservations interleaved in."""
    ledger = _reserve_concurrently(local, tmp_path, _RESERVE_MIXED, reserves=8)
    check = ledger.inspect()
    assert check.state == "sealed" and check.seal["records"] == 32
    releases = ledger.read_releases(ledger.path)
    assert len(releases) == 32
    for p in range(4):
        own = [r for r in releases if r["job_id"] == f"job-{p}"]
        assert [r["round"] for r in own] == list(range(8))
        for r in own:
            if r["round"] % 2 == 0:
                assert (r["mechanism"], r["noise_multiplier"], r["sample_rate"], r["steps"]) == ("gaussian", 20.0, 1.0, 1)
            else:
                assert r["mechanism"] == "dp_sgd" and r["steps"] == 3
                assert (r["noise_multiplier"], r["sample_rate"]) == pytest.approx((1.0 + 0.2 * (p % 2), 0.01 + 0.02 * (p % 2)))
    # each reservation composed everything recorded before it: the chain of epsilons has no gap
    assert [r["epsilon_before"] for r in releases[1:]] == [r["epsilon_after"] for r in releases[:-1]]
    opacus = RDPAccountant()
    for r in releases:  # Opacus's own bookkeeping, one step at a time, in the ledger's order
        for _ in range(r["steps"]):
            opacus.step(noise_multiplier=r["noise_multiplier"], sample_rate=r["sample_rate"])
    expected = opacus.get_epsilon(delta=1e-5)
    assert ledger.epsilon_spent() == pytest.approx(expected, rel=1e-9)
    assert releases[-1]["epsilon_after"] == pytest.approx(expected, rel=1e-9)
    # and the same for the history as the processes made it, independent of the interleaving
    made = [(20.0, 1.0, 1)] * 16 + [(1.0 + 0.2 * (p % 2), 0.01 + 0.02 * (p % 2), 3) for p in range(4) for _ in range(4)]
    assert ledger.epsilon_spent() == pytest.approx(epsilon_of_history(made, 1e-5, "rdp"), rel=1e-9)
    assert 0.0 < ledger.epsilon_spent() < ledger.max_epsilon


# the site admin's acknowledgement -----------------------------------------------------------


def test_acknowledging_a_deleted_ledger_carries_the_sealed_spend_over(local):
    ledger = _spent_site(local, releases=3)
    sealed = ledger.epsilon_spent()
    os.remove(ledger.path)
    with pytest.raises(LedgerError):
        ledger.reserve(2.4)
    since = ledger.inspect().blocked_since
    done = ledger.acknowledge("job process deleted local/ by mistake; no backup", by="admin")
    assert done["changed"] and done["epsilon"] == pytest.approx(sealed) and done["evidence"] is None
    assert done["floor"]["history"] == [[2.4, 1.0, 3]]
    assert ledger.epsilon_spent() == pytest.approx(sealed)
    records = ledger.read_records(ledger.path)
    assert [r["event"] for r in records] == ["floor", "acknowledged"]
    ack = records[-1]
    assert (ack["by"], ack["reason"], ack["blocked_since"]) == ("admin", "job process deleted local/ by mistake; no backup", since)
    assert "deleted or moved" in ack["finding"]
    assert not os.path.exists(ledger.block_path)
    _, after = ledger.reserve(2.4)  # the site releases again, from where it was
    assert after == pytest.approx(epsilon_spent([(2.4, 4)], 1e-5))


@pytest.mark.parametrize(
    "tamper",
    [_older_copy, _truncate_json, _raise_first_noise_multiplier, _raise_last_noise_multiplier, _edit_and_rechain, _garbage, _directory, _format_1_copy],
)
def test_acknowledging_never_lowers_the_epsilon_spent(local, tmp_path, tamper):
    ledger = _spent_site(local, releases=2)
    shutil.copy(ledger.path, tmp_path / "after_two.json")
    ledger.reserve(2.4)
    sealed = ledger.epsilon_spent()
    tamper(ledger, tmp_path)
    done = ledger.acknowledge("looked at it")
    assert done["changed"]
    assert ledger.epsilon_spent() >= sealed - 1e-12
    assert os.path.lexists(done["evidence"])  # the damaged file is kept for the admin
    assert ledger.inspect().state == "sealed"


def test_acknowledging_a_rolled_back_ledger_restores_exactly_the_sealed_epsilon(local, tmp_path):
    ledger = _spent_site(local, releases=2)
    shutil.copy(ledger.path, tmp_path / "after_two.json")
    ledger.reserve(2.4)
    ledger.reserve(1.1, sample_rate=0.01, steps=300, mechanism="dp_sgd")
    sealed = ledger.epsilon_spent()
    _older_copy(ledger, tmp_path)
    done = ledger.acknowledge("restored the wrong backup")
    assert sorted(map(tuple, done["floor"]["history"])) == [(1.1, 0.01, 300), (2.4, 1.0, 1)]
    assert ledger.epsilon_spent() == pytest.approx(sealed)


def test_acknowledging_a_missing_seal_keeps_the_ledger(local):
    ledger = _spent_site(local, releases=2)
    spent = ledger.epsilon_spent()
    os.remove(ledger.seal_path)
    done = ledger.acknowledge("moved the seal to another disk and back")
    assert done["floor"] is None and done["epsilon"] == pytest.approx(spent)
    assert [r["event"] for r in ledger.read_records(ledger.path)] == ["release", "release", "acknowledged"]


def test_restoring_a_matching_backup_lifts_the_block_and_says_so(local, tmp_path):
    ledger = _spent_site(local, releases=2)
    shutil.copy(ledger.path, tmp_path / "backup.json")
    os.remove(ledger.path)
    with pytest.raises(LedgerError):
        ledger.reserve(2.4)
    shutil.copy(tmp_path / "backup.json", ledger.path)
    ledger.reserve(2.4)
    events = [r for r in ledger.read_records(ledger.path) if r["event"] != "release"]
    assert [e["event"] for e in events] == ["cleared"] and "deleted or moved" in events[0]["finding"]
    assert not os.path.exists(ledger.block_path)


def test_nothing_to_acknowledge_writes_nothing(local):
    ledger = _spent_site(local, releases=1)
    before = _snapshot(local)
    assert ledger.acknowledge("just checking")["changed"] is False
    assert _snapshot(local) == before


@pytest.mark.parametrize("reason", ["", "   ", None, 3])
def test_an_acknowledgement_needs_a_reason(local, reason):
    ledger = _spent_site(local, releases=1)
    os.remove(ledger.path)
    with pytest.raises(ValueError, match="reason must be a non-empty string"):
        ledger.acknowledge(reason)
    assert ledger.inspect().blocked


# format-1 damage kept from before seals ------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        ("{broken", "unreadable"),
        (json.dumps({"releases": []}), "is not a medflare-privacy-ledger file"),
        (json.dumps({"format": "medflare-privacy-ledger/1", "releases": [{"noise_multiplier": "x"}]}), "release 0"),
        (json.dumps({"format": "medflare-privacy-ledger/1", "releases": [{"noise_multiplier": 1e400}]}), "release 0"),
        (json.dumps({"format": "medflare-privacy-ledger/2", "records": [{"event": "release", "noise_multiplier": 2.0}]}), "record 0 has no valid 'prev'"),
    ],
)
def test_a_damaged_ledger_blocks_instead_of_resetting(tmp_path, content, message):
    path = tmp_path / "l.json"
    path.write_text(content)
    ledger = PrivacyBudgetLedger(str(path), max_epsilon=100.0, delta=1e-5)
    with pytest.raises(LedgerError, match=message):
        ledger.reserve(1.0)
    with pytest.raises(LedgerError, match=message):
        PrivacyBudgetLedger.read_releases(str(path))
