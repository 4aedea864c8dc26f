"""``medflare budget show``: print a site's privacy ledger and the epsilon it has spent."""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from typing import Optional

from medflare.privacy.budget_ledger import LEDGER_FILE_NAME, PrivacyBudgetLedger

__all__ = ["ledger_path", "format_budget"]


def ledger_path(workspace: str) -> str:
    """The ledger of the FLARE client whose workspace is ``workspace`` (or the file itself)."""
    if os.path.isfile(workspace):
        return workspace
    return os.path.join(workspace, "local", LEDGER_FILE_NAME)


def format_budget(path: str, delta: Optional[float] = None, accountant: Optional[str] = None) -> str:
    """The ledger as text: per job the releases and noise, then the site's totals.

    ``delta``, ``accountant`` and the budget default to those of the most recent release.
    """
    releases = PrivacyBudgetLedger.read_releases(path)
    if not releases:
        return f"{path}: no Gaussian releases recorded; epsilon spent 0"
    last = releases[-1]
    delta = last["delta"] if delta is None else delta
    accountant = last.get("accountant", "rdp") if accountant is None else accountant
    spent = PrivacyBudgetLedger.epsilon_of(releases, delta, accountant)
    by_job: OrderedDict[str, list] = OrderedDict()
    for r in releases:
        by_job.setdefault(r.get("job_id") or "?", []).append(r)
    lines = [f"privacy ledger {path}", "", f"{'job':<40} {'releases':>8} {'noise multipliers':<24} {'first':<25} {'last':<25}"]
    for job, items in by_job.items():
        zs = ", ".join(f"{z:g} x{n}" for z, n in sorted(Counter(r["noise_multiplier"] for r in items).items()))
        lines.append(f"{job:<40} {len(items):>8} {zs:<24} {items[0].get('time', ''):<25} {items[-1].get('time', ''):<25}")
    budget = last.get("max_epsilon")
    lines += [
        "",
        f"releases: {len(releases)}",
        f"epsilon spent: {spent:.4g} at delta {delta:g} ({accountant} accountant)",
        f"budget (max_epsilon of the latest release's filter): {budget:g}" if budget else "budget: unknown",
    ]
    if budget:
        lines.append(f"remaining: {max(budget - spent, 0.0):.4g}")
    return "\n".join(lines)
