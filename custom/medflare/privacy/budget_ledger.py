"""A site's privacy budget: every Gaussian release it ever made, on disk, checked before the next.

The ledger is one JSON file in the site's workspace (``local/medflare_privacy_ledger.json``).
It spans rounds, jobs and client restarts: each release is appended under a file lock and the
file replaced atomically, so a crash never leaves half a ledger. Before a release the ledger
computes the epsilon the site would have spent *with* it (all past releases composed, see
:mod:`medflare.privacy.accounting`) and refuses when that exceeds ``max_epsilon``: the refusal
happens before any noise is drawn. The release is recorded before it is made, so a failure
after the check can only over-count, never under-count.

An unreadable or malformed ledger is an error, never an empty budget.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections import Counter
from typing import Optional

from medflare.privacy.accounting import check_accountant, epsilon_spent
from medflare.privacy.argument_checks import check_real
from medflare.privacy.update_checks import UnsafeUpdateError

__all__ = ["LEDGER_FILE_NAME", "PrivacyBudgetExceeded", "LedgerError", "PrivacyBudgetLedger"]

LEDGER_FILE_NAME = "medflare_privacy_ledger.json"
_FORMAT = "medflare-privacy-ledger/1"


class PrivacyBudgetExceeded(UnsafeUpdateError):
    """The release would take the site past its ``max_epsilon``."""


class LedgerError(UnsafeUpdateError):
    """The ledger file cannot be read or written; nothing may be released."""


class PrivacyBudgetLedger:
    """Site-wide record of Gaussian releases.

    Args:
        path: the ledger file.
        max_epsilon: the site's budget, in (0, inf).
        delta: delta at which epsilon is computed, in (0, 1).
        accountant: ``"rdp"`` or ``"prv"``.
    """

    def __init__(self, path: str, max_epsilon: float, delta: float, accountant: str = "rdp"):
        self.path = path
        self.max_epsilon = check_real("max_epsilon", max_epsilon, 0.0, None, low_open=True)
        self.delta = check_real("delta", delta, 0.0, 1.0, low_open=True, high_open=True)
        self.accountant = check_accountant(accountant)

    # reading -------------------------------------------------------------------------------

    @staticmethod
    def read_releases(path: str) -> list[dict]:
        """All recorded releases (empty when the file does not exist yet).

        Raises:
            LedgerError: the file exists but is not a valid ledger.
        """
        if not os.path.exists(path):
            return []
        try:
            with open(path) as f:
                content = json.load(f)
        except (OSError, ValueError) as e:
            raise LedgerError(f"privacy ledger {path} is unreadable ({e}); refusing to release anything") from None
        if not isinstance(content, dict) or content.get("format") != _FORMAT or not isinstance(content.get("releases"), list):
            raise LedgerError(f"privacy ledger {path} is not a {_FORMAT} file; refusing to release anything")
        for n, r in enumerate(content["releases"]):
            z = r.get("noise_multiplier") if isinstance(r, dict) else None
            if isinstance(z, bool) or not isinstance(z, (int, float)) or not z > 0:
                raise LedgerError(f"privacy ledger {path}: release {n} has no valid noise_multiplier")
        return content["releases"]

    @staticmethod
    def epsilon_of(releases: list[dict], delta: float, accountant: str = "rdp") -> float:
        counts = Counter(float(r["noise_multiplier"]) for r in releases)
        return epsilon_spent(sorted(counts.items()), delta, accountant)

    def epsilon_spent(self) -> float:
        return self.epsilon_of(self.read_releases(self.path), self.delta, self.accountant)

    # writing -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def reserve(self, noise_multiplier: float, job_id: str = "", round_number: Optional[int] = None, source: str = "") -> tuple[float, float]:
        """Record one release of ``noise_multiplier`` if it fits the budget.

        Returns:
            ``(epsilon_before, epsilon_after)`` for the site.

        Raises:
            PrivacyBudgetExceeded: ``epsilon_after`` would exceed ``max_epsilon``; nothing is recorded.
            LedgerError: the ledger cannot be read or written.
        """
        z = check_real("noise_multiplier", noise_multiplier, 0.0, None, low_open=True)
        with self._locked():
            releases = self.read_releases(self.path)
            before = self.epsilon_of(releases, self.delta, self.accountant)
            record = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "job_id": str(job_id),
                "round": round_number,
                "source": source,
                "noise_multiplier": z,
                "delta": self.delta,
                "max_epsilon": self.max_epsilon,
                "accountant": self.accountant,
            }
            after = self.epsilon_of(releases + [record], self.delta, self.accountant)
            if after > self.max_epsilon:
                raise PrivacyBudgetExceeded(
                    f"privacy budget exhausted: this release would bring the site's epsilon from {before:.4g} to "
                    f"{after:.4g} (delta {self.delta:g}, {self.accountant}), above max_epsilon {self.max_epsilon:g}; "
                    f"ledger {self.path}"
                )
            record["epsilon_after"] = after
            self._write(releases + [record])
        return before, after

    def _write(self, releases: list[dict]) -> None:
        tmp = f"{self.path}.tmp.{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump({"format": _FORMAT, "releases": releases}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            raise LedgerError(f"cannot write privacy ledger {self.path}: {e}; nothing released") from None
