"""The site's privacy ledger as a filter finds it: from the FLARE client's workspace, never the job."""

from __future__ import annotations

from typing import Optional

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext

from medflare.privacy.budget_ledger import LedgerError, PrivacyBudgetLedger

__all__ = ["site_ledger", "release_cap"]


def site_ledger(fl_ctx: FLContext) -> PrivacyBudgetLedger:
    """The site's own ledger, with the site's cap, delta and accountant (never the job's).

    Raises:
        LedgerError: no workspace in the context, or the site's budget file is missing or malformed.
    """
    workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
    if workspace is None:
        raise LedgerError("no site workspace in the FL context: the privacy ledger cannot be found")
    return PrivacyBudgetLedger.open_site(workspace.get_site_config_dir(), fl_ctx.get_identity_name())


def release_cap(ledger: PrivacyBudgetLedger, limit: Optional[float]) -> float:
    """The cap that holds for a filter with its own ``limit``: the site's, or lower, never higher."""
    return ledger.max_epsilon if limit is None else min(ledger.max_epsilon, limit)
