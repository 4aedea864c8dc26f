"""The site's privacy ledger as a filter finds it: from the FLARE client's workspace, never the job."""

from __future__ import annotations

from typing import Optional

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

from medflare.privacy.budget_ledger import LedgerError, PrivacyBudgetLedger

__all__ = ["site_ledger", "release_cap", "reserve_release"]


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


def reserve_release(
    fl_ctx: FLContext, shareable: Shareable, source: str, noise_multiplier: float, limit: Optional[float], delta: float, **release
) -> tuple[PrivacyBudgetLedger, float, Optional[int]]:
    """Charge one release to the site's ledger before anything is released.

    Args:
        fl_ctx, shareable: the result's context and shareable (for the job and the round).
        source: the filter's class name, for the record.
        noise_multiplier, limit, delta: the release's z, the filter's own cap and its delta.
        **release: ``sample_rate``, ``steps`` and ``mechanism`` of a DP-SGD release.

    Returns:
        ``(ledger, the site's epsilon after the release, the round)``.

    Raises:
        LedgerError, PrivacyBudgetExceeded: nothing may be released; nothing is recorded.
    """
    ledger = site_ledger(fl_ctx)
    round_number = shareable.get_header(AppConstants.CURRENT_ROUND, fl_ctx.get_prop(AppConstants.CURRENT_ROUND))
    _, site_epsilon = ledger.reserve(
        noise_multiplier,
        job_id=fl_ctx.get_job_id() or "",
        round_number=round_number,
        source=source,
        limit=limit,
        delta=delta,
        **release,
    )
    return ledger, site_epsilon, round_number
