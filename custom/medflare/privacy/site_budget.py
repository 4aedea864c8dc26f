"""The site's lifetime privacy budget: a file the site admin owns, not an argument a job sets.

A FLARE client's budget is ``<client workspace>/local/medflare_privacy_budget.json``::

    {"max_epsilon": 8.0, "delta": 1e-05, "accountant": "rdp", "seal_path": "/var/lib/medflare/site-1.seal"}

``max_epsilon`` (a real number in (0, inf)) caps the epsilon of everything the site ever
releases, over all jobs, scopes and restarts; ``delta`` (in (0, 1)) is the delta at which that
epsilon is computed; ``accountant`` (``"rdp"`` or ``"prv"``) is the Opacus accountant that
computes it; the optional ``seal_path`` (an absolute path) puts the ledger's seal outside the
workspace (see :mod:`medflare.privacy.budget_ledger` for why one would). No other field is
accepted: a misspelt ``max_epsilon`` must not silently leave the site without a cap.

A process with no site workspace of its own, the NVFlare simulator's simulated clients, can
name the file in the environment variable ``MEDFLARE_PRIVACY_BUDGET`` of the client process
(``{site_name}`` in it is replaced by the client's name), as ``medflare run`` does; the file in
``local/`` wins when both exist. The environment is the site's, never the job's.

The ledger reads the budget from here (:meth:`PrivacyBudgetLedger.open_site
<medflare.privacy.budget_ledger.PrivacyBudgetLedger.open_site>`); a filter's own
``max_epsilon`` can only lower it for that job. The file is installed by ``medflare site
install`` from the profile's copy; a missing or malformed file is an error, never "no cap".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import NoReturn, Optional

from medflare.privacy.accounting import ACCOUNTANTS
from medflare.privacy.argument_checks import check_real
from medflare.privacy.budget_ledger import LedgerError

__all__ = ["ENV_VAR", "SITE_BUDGET_FILE_NAME", "SITE_BUDGET_FIELDS", "SiteBudget", "load_site_budget", "parse_site_budget"]

SITE_BUDGET_FILE_NAME = "medflare_privacy_budget.json"
#: names the budget file of a client without one in ``local/`` (the simulator's clients)
ENV_VAR = "MEDFLARE_PRIVACY_BUDGET"

#: field -> what it must be, for messages
SITE_BUDGET_FIELDS = {
    "max_epsilon": "a real number in (0, inf)",
    "delta": "a real number in (0, 1)",
    "accountant": f"one of {', '.join(repr(a) for a in ACCOUNTANTS)}",
    "seal_path": "an absolute path (optional)",
}
_REQUIRED = ("max_epsilon", "delta", "accountant")


@dataclass(frozen=True)
class SiteBudget:
    """A site's lifetime budget, checked (see the module docstring).

    Attributes:
        max_epsilon: the cap on the site's cumulative epsilon, in (0, inf).
        delta: the delta at which the site's epsilon is computed, in (0, 1).
        accountant: ``"rdp"`` or ``"prv"``.
        seal_path: absolute path of the ledger's seal, or ``None`` for the default next to the ledger.
    """

    max_epsilon: float
    delta: float
    accountant: str
    seal_path: Optional[str] = None


def _refuse(source: str, message: str) -> NoReturn:
    raise LedgerError(f"site privacy budget {source}: {message}")


def parse_site_budget(content, source: str) -> SiteBudget:
    """Check the content of a site budget file.

    Args:
        content: the decoded JSON.
        source: where it came from, for messages.

    Raises:
        LedgerError: naming ``source``, the field, its value and what is allowed.
    """
    if not isinstance(content, dict):
        _refuse(source, f"must be a JSON object with {', '.join(_REQUIRED)}, got {type(content).__name__}")
    unknown = sorted(set(content) - set(SITE_BUDGET_FIELDS))
    if unknown:
        _refuse(source, f"unknown field(s) {unknown}; allowed: {', '.join(SITE_BUDGET_FIELDS)}")
    for name in _REQUIRED:
        if name not in content:
            _refuse(source, f"missing field {name!r} ({SITE_BUDGET_FIELDS[name]})")
    try:
        max_epsilon = check_real("max_epsilon", content["max_epsilon"], 0.0, None, low_open=True)
        delta = check_real("delta", content["delta"], 0.0, 1.0, low_open=True, high_open=True)
    except (TypeError, ValueError) as e:
        _refuse(source, str(e))
    accountant = content["accountant"]
    if accountant not in ACCOUNTANTS:
        _refuse(source, f"accountant must be {SITE_BUDGET_FIELDS['accountant']}, got {accountant!r}")
    seal_path = content.get("seal_path")
    if seal_path is not None and (not isinstance(seal_path, str) or not os.path.isabs(seal_path)):
        _refuse(source, f"seal_path must be an absolute path, got {seal_path!r}")
    return SiteBudget(max_epsilon, delta, accountant, os.path.normpath(seal_path) if seal_path else None)


def load_site_budget(local_dir: str, site_name: Optional[str] = None, environ: Optional[dict] = None) -> SiteBudget:
    """Read ``<local_dir>/medflare_privacy_budget.json``, or the file :data:`ENV_VAR` names.

    Args:
        local_dir: the FLARE client's ``local/`` folder (its site config dir).
        site_name: the client's name, for ``{site_name}`` in :data:`ENV_VAR`.
        environ: the environment (default ``os.environ``).

    Raises:
        LedgerError: the file is missing, unreadable or malformed; nothing may be released.
    """
    path = os.path.join(local_dir, SITE_BUDGET_FILE_NAME)
    named = (os.environ if environ is None else environ).get(ENV_VAR)
    if not os.path.isfile(path) and named:
        path = named.replace("{site_name}", site_name or "")
        if not os.path.isfile(path):
            raise LedgerError(f"site has no privacy budget: {path} (from {ENV_VAR}) not found")
    if not os.path.isfile(path):
        raise LedgerError(
            f"site has no privacy budget: {path} not found; install a site profile (medflare site install) "
            "or write it, see docs/site-admin.md"
        )
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, ValueError) as e:
        _refuse(path, f"is not readable JSON ({e})")
    return parse_site_budget(content, path)
