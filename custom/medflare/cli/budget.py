"""``medflare budget show`` and ``medflare budget acknowledge``: a site's privacy budget for its admin.

``show`` prints the site's cap (from ``local/medflare_privacy_budget.json``), the epsilon spent
(every release composed, see :mod:`medflare.privacy.budget_ledger`), what remains, the releases
and epsilon of each job, and the tamper events the ledger holds (blocks, their findings,
acknowledgements and their reasons). A ledger that does not match its seal is an error: what was
found and what to do go to stderr and the command exits non-zero.

``acknowledge`` lifts such a block after the admin has looked (:meth:`PrivacyBudgetLedger.
acknowledge`): spent epsilon is carried over, never reset.
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from typing import Optional

from medflare.privacy.budget_ledger import LEDGER_FILE_NAME, LedgerError, PrivacyBudgetLedger
from medflare.privacy.site_budget import SITE_BUDGET_FILE_NAME, SiteBudget, load_site_budget

__all__ = ["ledger_path", "site_ledger", "format_budget", "acknowledge_block"]


def ledger_path(workspace: str) -> str:
    """The ledger of the FLARE client whose workspace is ``workspace`` (or the file itself)."""
    if os.path.isfile(workspace) or os.path.basename(workspace) == LEDGER_FILE_NAME:
        return workspace
    return os.path.join(workspace, "local", LEDGER_FILE_NAME)


def site_ledger(path: str) -> tuple[PrivacyBudgetLedger, Optional[SiteBudget]]:
    """The ledger at ``path`` with the budget of the site whose ``local/`` holds it.

    Without a site budget file the ledger is opened with the latest release's delta,
    accountant and cap (records written before budgets moved to the site) and the budget is
    ``None``.

    Raises:
        LedgerError: the site budget file exists but is malformed, or the ledger is unreadable.
    """
    local_dir = os.path.dirname(os.path.abspath(path))
    if os.path.lexists(os.path.join(local_dir, SITE_BUDGET_FILE_NAME)):
        budget = load_site_budget(local_dir)
        return PrivacyBudgetLedger(path, budget.max_epsilon, budget.delta, budget.accountant, budget.seal_path), budget
    last = next(reversed(_releases_or_empty(path)), {})
    return PrivacyBudgetLedger(path, last.get("max_epsilon") or 1.0, last.get("delta", 1e-5), last.get("accountant", "rdp")), None


def _releases_or_empty(path: str) -> list:
    try:
        return PrivacyBudgetLedger.read_releases(path)
    except LedgerError:
        return []  # the check that follows says what is wrong with it


def _noise_label(items: list) -> str:
    counts = Counter((r["mechanism"], r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in items)
    parts = []
    for (mechanism, z, q, steps), n in sorted(counts.items()):
        parts.append(f"{z:g} x{n}" if mechanism == "gaussian" else f"{z:g} q{q:g} T{steps} x{n}")
    return ", ".join(parts)


def _job_table(releases: list, delta: float, accountant: str) -> list[str]:
    by_job: OrderedDict[str, list] = OrderedDict()
    for r in releases:
        by_job.setdefault(r.get("job_id") or "?", []).append(r)
    lines = [f"{'job':<40} {'releases':>8} {'noise multipliers':<24} {'epsilon':>8} {'first':<25} {'last':<25}"]
    for job, items in by_job.items():
        eps = PrivacyBudgetLedger.epsilon_of(items, delta, accountant)
        lines.append(
            f"{job:<40} {len(items):>8} {_noise_label(items):<24} {eps:>8.4g} {items[0].get('time', ''):<25} {items[-1].get('time', ''):<25}"
        )
    return lines


def _events(records: list) -> list[str]:
    lines = []
    for r in records:
        event = r["event"]
        if event == "acknowledged":
            lines.append(
                f"  {r.get('time')} acknowledged by {r.get('by') or '?'}: {r.get('reason')!r}; found: {r.get('finding')}"
                f"; blocked since {r.get('blocked_since') or 'not recorded'}"
                + (f"; damaged ledger kept as {r['evidence']}" if r.get("evidence") else "")
            )
        elif event == "floor":
            steps = ", ".join(f"z {z:g} q {q:g} x{s}" for z, q, s in r["history"])
            lines.append(f"  {r.get('time')} spend carried over from the seal of {r.get('sealed_at')}: {steps}")
        elif event == "cleared":
            lines.append(f"  {r.get('time')} block found {r.get('blocked_since')} cleared (the ledger matched its seal again): {r.get('finding')}")
        elif event == "adopted":
            lines.append(f"  {r.get('time')} format-1 ledger of {r.get('records')} records adopted and sealed")
    return lines


def format_budget(path: str, delta: Optional[float] = None, accountant: Optional[str] = None) -> str:
    """The site's budget as text: per job the releases and epsilon, the totals, the events.

    ``delta`` and ``accountant`` recompute the epsilon spent at other settings (default: the
    site's); the remaining budget is always against the site's own.

    Raises:
        LedgerError: the ledger is blocked (tampered, missing, unreadable); the message says
            what was found, since when, and what the admin must do.
    """
    ledger, budget = site_ledger(path)
    check = ledger.check()
    if check.blocked:
        since = f" (blocked since {check.blocked_since})" if check.blocked_since else ""
        raise LedgerError(f"{check.finding}{since}. Every release is blocked. To fix: {ledger.fix_hint()}")
    records = check.records
    releases = [r for r in records if r["event"] == "release"]
    history_site = PrivacyBudgetLedger.epsilon_of(records, ledger.delta, ledger.accountant)
    delta = ledger.delta if delta is None else delta
    accountant = ledger.accountant if accountant is None else accountant
    spent = history_site
    if (delta, accountant) != (ledger.delta, ledger.accountant):
        spent = PrivacyBudgetLedger.epsilon_of(records, delta, accountant)
    if budget is not None:
        budget_file = os.path.join(os.path.dirname(os.path.abspath(path)), SITE_BUDGET_FILE_NAME)
        cap_line = f"site budget: max_epsilon {budget.max_epsilon:g} at delta {budget.delta:g} ({budget.accountant}), from {budget_file}"
        cap = budget.max_epsilon
    else:
        cap = releases[-1].get("max_epsilon") if releases else None
        cap_line = (
            f"site budget: NONE ({SITE_BUDGET_FILE_NAME} not found next to the ledger; releases through the site's ledger are refused "
            "until it is installed: medflare site install)"
            + (f"; the latest release was checked against max_epsilon {cap:g}" if cap else "")
        )
    if not records:
        return "\n".join([f"{path}: no releases recorded; epsilon spent 0", cap_line])
    lines = [f"privacy ledger {path}", ""] + _job_table(releases, ledger.delta, ledger.accountant)
    floors = sum(s for r in records if r["event"] == "floor" for _, _, s in r["history"])
    carried = f" (and {floors} carried over from the seal after the ledger was lost)" if floors else ""
    lines += ["", f"releases: {len(releases)}{carried}", f"epsilon spent: {spent:.4g} at delta {delta:g} ({accountant} accountant)"]
    if spent != history_site:
        lines.append(f"epsilon spent at the site's delta {ledger.delta:g} ({ledger.accountant}): {history_site:.4g}")
    lines.append(cap_line)
    if cap:
        lines.append(f"remaining: {max(cap - history_site, 0.0):.4g}")
    seal_state = {
        "sealed": "matches the ledger",
        "seal_behind": "one record behind (a crash; repaired at the next release)",
        "legacy": "none yet (format-1 ledger; sealed at the next release)",
    }
    lines.append(f"seal: {ledger.seal_path}: {seal_state.get(check.state, check.state)}")
    events = _events(records)
    if events:
        lines += ["", "tamper events:"] + events
    return "\n".join(lines)


def acknowledge_block(path: str, reason: str) -> str:
    """Acknowledge a blocked ledger (see :meth:`PrivacyBudgetLedger.acknowledge`); the report as text.

    Raises:
        LedgerError: no site budget file, or the new ledger cannot be written.
        ValueError: an empty reason.
    """
    local_dir = os.path.dirname(os.path.abspath(path))
    budget = load_site_budget(local_dir)
    ledger = PrivacyBudgetLedger(path, budget.max_epsilon, budget.delta, budget.accountant, budget.seal_path)
    done = ledger.acknowledge(reason)
    if not done["changed"]:
        return f"nothing to acknowledge: {path} matches its seal {ledger.seal_path} ({done['records']} records); nothing changed"
    lines = [f"acknowledged: {done['finding']}", f"reason recorded: {reason.strip()!r}"]
    if done["floor"]:
        carried = ", ".join(f"z {z:g} q {q:g} x{s}" for z, q, s in done["floor"]["history"])
        lines.append(f"spend the ledger had lost, carried over from the seal: {carried}")
    if done["evidence"]:
        lines.append(f"the damaged ledger is kept as {done['evidence']}")
    lines.append(
        f"epsilon spent: {done['epsilon']:.4g} at delta {budget.delta:g} ({budget.accountant}); max_epsilon {budget.max_epsilon:g}; "
        f"ledger {path} sealed again ({done['records']} records)"
    )
    return "\n".join(lines)
