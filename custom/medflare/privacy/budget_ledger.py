"""A site's privacy budget: every release it ever made, on disk, sealed, checked before the next.

The ledger is one JSON file in the site's workspace (``local/medflare_privacy_ledger.json``).
It spans rounds, jobs and client restarts: each release is appended under a file lock and the
file replaced atomically, so a crash never leaves half a ledger. Before a release the ledger
composes every recorded release with the one asked for (:func:`medflare.privacy.accounting.
epsilon_of_history`, at the *site's* delta and accountant) and refuses when the site's epsilon
would exceed the site's cap, or the job's own lower limit: the refusal happens before any noise
is drawn. The release is recorded before it is made, so a failure after the check can only
over-count, never under-count. The cap is the site's (:mod:`medflare.privacy.site_budget`),
read by :meth:`PrivacyBudgetLedger.open_site`; a job can spend less, never more.

A release record is ``(noise_multiplier, sample_rate, steps)`` with a ``mechanism``:
``"gaussian"`` (a site-level noised update: q = 1, one step) or ``"dp_sgd"`` (a patient-level
DP-SGD run: Poisson rate q, T steps). Records of format 1 (only ``noise_multiplier``) read as
Gaussian releases.

Tamper evidence, and why this design
------------------------------------
Deleting, truncating, editing or rolling back the ledger must not give a site its budget back.
Two pieces of state, written under the same lock, one after the other:

* each record carries ``prev``, the SHA-256 of the previous record's canonical JSON
  (:data:`GENESIS` for the first), so an edit anywhere breaks the chain at that record;
* a **seal** file (default ``.medflare_privacy_ledger.seal`` next to the ledger, or the site
  budget's ``seal_path``) holds the number of records, the head hash, the running epsilon and
  the composed history ``[(z, q, steps), ...]``. It is written after the ledger.

Every read checks one against the other:

======================================================  ==========================================
found                                                   meaning, action
======================================================  ==========================================
no ledger, no seal                                      a fresh site
ledger and seal agree (count and head)                  normal
ledger one record past the seal, chain extends it       crash between the two writes: seal repaired
seal but no ledger                                      deleted or moved: blocked
ledger shorter than the seal, or head differs           truncated, rolled back, replaced: blocked
chain broken inside the ledger                          edited: blocked
ledger more than one record past the seal               appended without the lock: blocked
ledger but no seal                                      seal deleted (or ``seal_path`` changed): blocked
unreadable, empty, not a file, malformed                blocked
format-1 ledger, no seal                                written before seals existed: adopted, sealed
                                                        at the next write
======================================================  ==========================================

A block is remembered in ``<seal>.blocked`` (first detection time, finding and a copy of the
seal), so deleting a damaged ledger and its seal after the fact neither looks like a fresh
site nor lowers the spend an acknowledgement carries over. Only the site admin lifts it:
restoring a copy that matches the seal (the next read records a ``cleared`` event), or
:meth:`PrivacyBudgetLedger.acknowledge` (``medflare budget acknowledge``), which keeps every
readable record, moves the damaged file aside as evidence, tops the history up from the seal
with a ``floor`` record so that for every ``(z, q)`` the kept steps are at least the sealed
steps (RDP and PRV epsilon only grow with steps: the site's epsilon never goes down; an edited
record may be counted twice, erring on the side of the patient), records an ``acknowledged``
event with the time, the reason and the finding, and seals.

What this cannot detect: a writer who replaces ledger *and* seal consistently, for instance
by deleting both when the seal sits in the default place (the workspace looks fresh), or
restoring an older copy of both. A ``seal_path`` outside the workspace, on storage that jobs
and workspace clean-ups do not touch, turns "both deleted" into "ledger deleted". A hash chain
without a secret is evidence against accidents and careless edits, not against an adversary
with write access to both files; a key would have to live where that adversary cannot read it,
which on a FLARE client (jobs run as the client's user) is nowhere the client can reach.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from medflare.privacy.accounting import check_accountant, epsilon_of_history, merge_history
from medflare.privacy.argument_checks import check_int, check_real
from medflare.privacy.update_checks import UnsafeUpdateError

__all__ = [
    "GENESIS",
    "LEDGER_FILE_NAME",
    "MECHANISMS",
    "SEAL_FILE_NAME",
    "LedgerCheck",
    "LedgerError",
    "PrivacyBudgetExceeded",
    "PrivacyBudgetLedger",
    "default_seal_path",
    "record_digest",
]

LEDGER_FILE_NAME = "medflare_privacy_ledger.json"
SEAL_FILE_NAME = ".medflare_privacy_ledger.seal"
MECHANISMS = ("gaussian", "dp_sgd")
_FORMAT = "medflare-privacy-ledger/2"
_LEGACY_FORMAT = "medflare-privacy-ledger/1"
_SEAL_FORMAT = "medflare-privacy-seal/1"
_EVENTS = ("release", "floor", "acknowledged", "cleared", "adopted")
#: ``prev`` of the first record
GENESIS = hashlib.sha256(_FORMAT.encode()).hexdigest()

FRESH, SEALED, LEGACY, SEAL_BEHIND, BLOCKED = "fresh", "sealed", "legacy", "seal_behind", "blocked"


class PrivacyBudgetExceeded(UnsafeUpdateError):
    """The release would take the site past its cap (or the job past its limit)."""


class LedgerError(UnsafeUpdateError):
    """The ledger cannot be read, written or trusted; nothing may be released."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def record_digest(record: dict) -> str:
    """SHA-256 of a record's canonical JSON (sorted keys, no spaces, ASCII)."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def default_seal_path(ledger_path: str) -> str:
    """``.<ledger name without .json>.seal`` next to the ledger."""
    folder, name = os.path.split(os.path.abspath(ledger_path))
    return os.path.join(folder, "." + os.path.splitext(name)[0] + ".seal")


def _head(records: list) -> str:
    return record_digest(records[-1]) if records else GENESIS


def _chain(records: list) -> list:
    """Copies of ``records`` with ``prev`` set so that they form one chain from :data:`GENESIS`."""
    out = []
    for r in records:
        r = dict(r)
        r["prev"] = _head(out)
        out.append(r)
    return out


def _history_of(records: list) -> list:
    """``(z, q, steps)`` of every record that costs privacy: releases and floors."""
    history = []
    for r in records:
        if r["event"] == "release":
            history.append((float(r["noise_multiplier"]), float(r["sample_rate"]), int(r["steps"])))
        elif r["event"] == "floor":
            history.extend((float(z), float(q), int(s)) for z, q, s in r["history"])
    return history


def _steps_by_rate(history: list) -> Counter:
    return Counter({(z, q): s for z, q, s in merge_history(history)})


# reading and checking files ---------------------------------------------------------------


class _Unreadable(Exception):
    pass


def _is_hash(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _normalise(n: int, r, path: str, legacy: bool) -> dict:
    """Check record ``n`` and fill in what format 1 left implicit."""
    if not isinstance(r, dict):
        raise _Unreadable(f"privacy ledger {path}: record {n} is not an object")
    r = dict(r)
    if legacy:
        r.setdefault("event", "release")
    event = r.get("event")
    if event not in _EVENTS:
        raise _Unreadable(f"privacy ledger {path}: record {n} has unknown event {event!r}; known: {', '.join(_EVENTS)}")
    if not legacy and not _is_hash(r.get("prev")):
        raise _Unreadable(f"privacy ledger {path}: record {n} has no valid 'prev' hash")
    if event == "release":
        r.setdefault("mechanism", "gaussian")
        r.setdefault("sample_rate", 1.0)
        r.setdefault("steps", 1)
        z, q, steps = r.get("noise_multiplier"), r["sample_rate"], r["steps"]
        if isinstance(z, bool) or not isinstance(z, (int, float)) or not z > 0 or z == float("inf"):
            raise _Unreadable(f"privacy ledger {path}: release {n} has no valid noise_multiplier")
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1:
            raise _Unreadable(f"privacy ledger {path}: release {n} has no valid sample_rate in (0, 1]")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise _Unreadable(f"privacy ledger {path}: release {n} has no valid steps (an int >= 1)")
        if r["mechanism"] not in MECHANISMS:
            raise _Unreadable(f"privacy ledger {path}: release {n} has unknown mechanism {r['mechanism']!r}")
    elif event == "floor":
        try:
            merge_history([tuple(e) if isinstance(e, list) else e for e in r.get("history", None)])
        except (TypeError, ValueError) as e:
            raise _Unreadable(f"privacy ledger {path}: floor record {n} has no valid history ({e})") from None
    return r


def _read_ledger_file(path: str) -> tuple[str, list]:
    """``(format, normalised records)`` of a ledger file that exists.

    Raises:
        _Unreadable: with the finding.
    """
    if not os.path.isfile(path):
        raise _Unreadable(f"privacy ledger {path} is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, ValueError) as e:  # ValueError: bytes that are not UTF-8
        raise _Unreadable(f"privacy ledger {path} is unreadable ({e})") from None
    if not text.strip():
        raise _Unreadable(f"privacy ledger {path} is empty (truncated?)")
    try:
        content = json.loads(text)
    except ValueError as e:
        raise _Unreadable(f"privacy ledger {path} is unreadable ({e})") from None
    fmt = content.get("format") if isinstance(content, dict) else None
    key = {_FORMAT: "records", _LEGACY_FORMAT: "releases"}.get(fmt)
    if key is None or not isinstance(content.get(key), list):
        raise _Unreadable(
            f"privacy ledger {path} is not a medflare-privacy-ledger file (format {fmt!r}; "
            f"expected {_FORMAT!r} with a 'records' list)"
        )
    legacy = fmt == _LEGACY_FORMAT
    records = [_normalise(n, r, path, legacy) for n, r in enumerate(content[key])]
    if not legacy:
        expected = GENESIS
        for n, r in enumerate(records):
            if r["prev"] != expected:
                raise _Unreadable(
                    f"privacy ledger {path}: record {n} does not extend record {n - 1} (hash chain broken): "
                    "the ledger was edited"
                )
            expected = record_digest(r)
    return fmt, records


def _read_json(path: str) -> Optional[dict]:
    """A small JSON object file, ``None`` when absent.

    Raises:
        _Unreadable: present but not a readable JSON object.
    """
    if not os.path.lexists(path):
        return None
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, ValueError) as e:
        raise _Unreadable(f"{path} is unreadable ({e})") from None
    if not isinstance(content, dict):
        raise _Unreadable(f"{path} is not a JSON object")
    return content


def _read_seal(path: str) -> Optional[dict]:
    seal = _read_json(path)
    return None if seal is None else _check_seal(seal, path)


def _check_seal(seal, path: str) -> dict:
    ok = isinstance(seal, dict) and (
        seal.get("format") == _SEAL_FORMAT
        and isinstance(seal.get("records"), int)
        and not isinstance(seal.get("records"), bool)
        and seal["records"] >= 0
        and _is_hash(seal.get("head"))
        and isinstance(seal.get("history"), list)
    )
    if ok:
        try:
            seal["history"] = merge_history([tuple(e) if isinstance(e, list) else e for e in seal["history"]])
        except (TypeError, ValueError):
            ok = False
    if not ok:
        raise _Unreadable(f"privacy ledger seal {path} is not a {_SEAL_FORMAT} file")
    return dict(seal)


def _write_json(path: str, content: dict, indent: Optional[int] = None) -> None:
    """Atomically: temporary file, fsync, rename, fsync of the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(content, f, indent=indent, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@dataclass(frozen=True)
class LedgerCheck:
    """What a look at the ledger and its seal found.

    Attributes:
        state: ``"fresh"``, ``"sealed"``, ``"legacy"`` (format 1, not sealed yet),
            ``"seal_behind"`` (a crash between the two writes; repaired at the next write) or
            ``"blocked"``.
        records: the ledger's records, normalised (empty when it is missing or unreadable).
        finding: what is wrong, ``""`` when nothing is.
        seal: the seal, or ``None``.
        blocked_since: when the block was first found, if it was recorded.
        readable: the ledger file could be read and its chain is whole.
        legacy: the ledger is a format-1 file (no hash chain).
    """

    state: str
    records: list = field(default_factory=list)
    finding: str = ""
    seal: Optional[dict] = None
    blocked_since: Optional[str] = None
    readable: bool = True
    legacy: bool = False

    @property
    def blocked(self) -> bool:
        return self.state == BLOCKED


class PrivacyBudgetLedger:
    """Site-wide, tamper-evident record of privacy releases.

    Args:
        path: the ledger file.
        max_epsilon: the site's budget, in (0, inf).
        delta: delta at which epsilon is computed, in (0, 1).
        accountant: ``"rdp"`` or ``"prv"``.
        seal_path: the seal file (default :func:`default_seal_path`); keep it outside the
            workspace to detect the deletion of the whole ``local/`` folder.

    Use :meth:`open_site` in a FLARE client: it takes the cap, delta, accountant and seal from
    the site's budget file instead of from whoever builds the ledger.
    """

    def __init__(self, path: str, max_epsilon: float, delta: float, accountant: str = "rdp", seal_path: Optional[str] = None):
        self.path = path
        self.max_epsilon = check_real("max_epsilon", max_epsilon, 0.0, None, low_open=True)
        self.delta = check_real("delta", delta, 0.0, 1.0, low_open=True, high_open=True)
        self.accountant = check_accountant(accountant)
        if seal_path is not None and (not isinstance(seal_path, str) or not seal_path):
            raise ValueError(f"seal_path must be a file path or None, got {seal_path!r}")
        self.seal_path = os.path.abspath(seal_path) if seal_path else default_seal_path(path)
        if self.seal_path == os.path.abspath(path):
            raise ValueError(f"seal_path must differ from the ledger's path, got {seal_path!r}")

    @classmethod
    def open_site(cls, local_dir: str, site_name: Optional[str] = None) -> "PrivacyBudgetLedger":
        """The ledger ``<local_dir>/medflare_privacy_ledger.json`` with the site's budget
        (:func:`medflare.privacy.site_budget.load_site_budget`; ``site_name`` for its
        environment variable).

        Raises:
            LedgerError: the site budget file is missing or malformed.
        """
        from medflare.privacy.site_budget import load_site_budget  # site_budget imports LedgerError from here

        budget = load_site_budget(local_dir, site_name)
        return cls(os.path.join(local_dir, LEDGER_FILE_NAME), budget.max_epsilon, budget.delta, budget.accountant, budget.seal_path)

    @property
    def block_path(self) -> str:
        return self.seal_path + ".blocked"

    # reading -------------------------------------------------------------------------------

    @staticmethod
    def read_records(path: str) -> list[dict]:
        """Every record (releases and events), normalised; empty when the file does not exist.

        Checks the file and its hash chain, not the seal (see :meth:`inspect`).

        Raises:
            LedgerError: the file exists but is not a valid ledger.
        """
        if not os.path.lexists(path):
            return []
        try:
            return _read_ledger_file(path)[1]
        except _Unreadable as e:
            raise LedgerError(f"{e}; refusing to release anything") from None

    @staticmethod
    def read_releases(path: str) -> list[dict]:
        """The release records of :meth:`read_records`."""
        return [r for r in PrivacyBudgetLedger.read_records(path) if r["event"] == "release"]

    @staticmethod
    def epsilon_of(records: list[dict], delta: float, accountant: str = "rdp") -> float:
        """Epsilon of the releases and floors among ``records`` (other events cost nothing)."""
        try:
            normalised = [_normalise(n, r, "(records)", "prev" not in r) for n, r in enumerate(records)]
        except _Unreadable as e:
            raise LedgerError(str(e)) from None
        return epsilon_of_history(_history_of(normalised), delta, accountant)

    def epsilon_spent(self) -> float:
        """The site's epsilon, after checking the ledger against its seal.

        Raises:
            LedgerError: the ledger is blocked (see the module docstring).
        """
        with self._locked():
            records, _ = self._verified()
            return epsilon_of_history(_history_of(records), self.delta, self.accountant)

    def inspect(self) -> LedgerCheck:
        """Look at the ledger and its seal; write nothing, raise nothing for what is found."""
        with self._locked(create=False):
            return self._inspect()

    def check(self) -> LedgerCheck:
        """:meth:`inspect`, and a block found for the first time is remembered (``<seal>.blocked``)
        so that the time it started survives later deletions."""
        with self._locked(create=False):
            found = self._inspect()
            if found.blocked and found.blocked_since is None:
                self._remember_block(found)
                found = self._inspect()
            return found

    def _inspect(self) -> LedgerCheck:
        try:
            marker = _read_json(self.block_path)
        except _Unreadable:
            marker = {"since": None, "finding": f"{self.block_path} is unreadable"}
        since = marker.get("since") if marker else None
        try:
            seal = _read_seal(self.seal_path)
        except _Unreadable as e:
            return self._blocked(f"{e}; the seal was damaged", since, self._try_records(), None)
        if not os.path.lexists(self.path):
            if seal is not None:
                return self._blocked(
                    f"privacy ledger {self.path} is missing but its seal {self.seal_path} records "
                    f"{seal['records']} records (epsilon {seal.get('epsilon', 0.0):.4g}, sealed {seal.get('time')}): "
                    "the ledger was deleted or moved",
                    since, [], seal, readable=False,
                )
            if marker is not None:
                return self._blocked(f"a block found {since} was never acknowledged ({marker.get('finding')})", since, [], None, readable=False)
            return LedgerCheck(FRESH)
        try:
            fmt, records = _read_ledger_file(self.path)
        except _Unreadable as e:
            return self._blocked(str(e), since, [], seal, readable=False)
        return self._compare(fmt, records, seal, marker)

    def _compare(self, fmt: str, records: list, seal: Optional[dict], marker: Optional[dict]) -> LedgerCheck:
        since = marker.get("since") if marker else None
        legacy = fmt == _LEGACY_FORMAT
        if seal is None:
            if not legacy:
                return self._blocked(
                    f"privacy ledger {self.path} has {len(records)} sealed records but its seal {self.seal_path} is "
                    "missing: the seal was deleted or moved (was seal_path changed?)",
                    since, records, None,
                )
            if marker is not None:
                return self._blocked(f"a block found {since} was never acknowledged ({marker.get('finding')})", since, records, None, legacy=True)
            return LedgerCheck(LEGACY, records, legacy=True)
        n, sealed = len(records), seal["records"]
        where = f"privacy ledger {self.path} has {n} records, its seal {self.seal_path} {sealed} (epsilon {seal.get('epsilon', 0.0):.4g})"
        if seal.get("ledger") not in (None, os.path.abspath(self.path)):
            where += f" and the seal was written for the ledger {seal['ledger']}"
        if legacy:
            return self._blocked(f"{where}, and the ledger is an unsealed format-1 file: it was replaced by an older copy", since, records, seal, legacy=True)
        if n < sealed:
            return self._blocked(f"{where}: the ledger was truncated or replaced by an older copy", since, records, seal)
        if _head(records[:sealed]) != seal["head"]:
            return self._blocked(f"{where} and its records differ from the sealed ones: the ledger was edited or replaced", since, records, seal)
        if n > sealed + 1:
            return self._blocked(f"{where}: {n - sealed} records were added without being sealed", since, records, seal)
        state = SEAL_BEHIND if n == sealed + 1 else SEALED
        return LedgerCheck(state, records, seal=seal, blocked_since=since)

    def _blocked(self, finding, since, records, seal, readable=True, legacy=False) -> LedgerCheck:
        return LedgerCheck(BLOCKED, records, finding, seal, since, readable, legacy)

    def _try_records(self) -> list:
        try:
            return _read_ledger_file(self.path)[1] if os.path.lexists(self.path) else []
        except _Unreadable:
            return []

    def fix_hint(self) -> str:
        folder = os.path.dirname(os.path.abspath(self.path))
        target = os.path.dirname(folder) if os.path.basename(folder) == "local" else self.path
        return (
            "restore the ledger from a backup that matches the seal, or, after finding out what happened, run "
            f"`medflare budget acknowledge {target} --reason \"...\"` (it keeps every epsilon the seal records)"
        )

    # writing -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, create: bool = True):
        """The ledger's exclusive lock (``<ledger>.lock``). ``create=False``: a reader that finds no
        ledger folder creates none and locks nothing (there is nothing to race with)."""
        folder = os.path.dirname(os.path.abspath(self.path))
        if not create and not os.path.isdir(folder):
            yield
            return
        os.makedirs(folder, exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _verified(self) -> tuple[list, bool]:
        """``(records, legacy)`` of a ledger that may be written to; the lock must be held.

        Repairs a seal left one record behind by a crash, records a ``cleared`` event when a
        block was lifted by restoring a matching copy, and remembers a new block.

        Raises:
            LedgerError: the ledger is blocked.
        """
        check = self._inspect()
        if check.blocked:
            self._remember_block(check)
            raise LedgerError(f"{check.finding}. Nothing is released until the site admin acts: {self.fix_hint()}")
        records = check.records
        if check.state == SEAL_BEHIND:
            self._write_seal(records)
        if os.path.lexists(self.block_path):
            marker = {}
            with contextlib.suppress(_Unreadable):
                marker = _read_json(self.block_path) or {}
            event = {"event": "cleared", "time": _now(), "blocked_since": marker.get("since"), "finding": marker.get("finding")}
            records = self._commit(self._upgraded(records, check.legacy) + [event])
            os.remove(self.block_path)
            return records, False
        return records, check.legacy

    def _remember_block(self, check: LedgerCheck) -> None:
        if check.blocked_since is not None or os.path.lexists(self.block_path):
            return
        marker = {"since": _now(), "finding": check.finding, "ledger": os.path.abspath(self.path)}
        if check.seal is not None:  # so that deleting the seal too cannot lower the spend an acknowledgement keeps
            marker["seal"] = dict(check.seal, history=[list(e) for e in check.seal["history"]])
        with contextlib.suppress(OSError, ValueError):
            _write_json(self.block_path, marker, indent=1)

    def _upgraded(self, records: list, legacy: bool) -> list:
        if not legacy:
            return records
        return _chain(records + [{"event": "adopted", "time": _now(), "from_format": _LEGACY_FORMAT, "records": len(records)}])

    def _write_seal(self, records: list, epsilon: Optional[float] = None) -> None:
        history = _history_of(records)
        if epsilon is None:
            epsilon = epsilon_of_history(history, self.delta, self.accountant)
        seal = {
            "format": _SEAL_FORMAT,
            "ledger": os.path.abspath(self.path),
            "records": len(records),
            "head": _head(records),
            "epsilon": epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "history": [list(e) for e in merge_history(history)],
            "time": _now(),
        }
        try:
            _write_json(self.seal_path, seal, indent=1)
        except OSError as e:
            raise LedgerError(
                f"cannot write the privacy ledger's seal {self.seal_path}: {e}; the release is recorded in the ledger "
                "and the seal will be repaired at the next release if the ledger is one record ahead"
            ) from None

    def _commit(self, records: list, epsilon: Optional[float] = None) -> list:
        """Write ``records`` (the last one's ``prev`` set here) to the ledger, then seal it
        (``epsilon``: theirs, when the caller has it)."""
        if records and "prev" not in records[-1]:
            records = records[:-1] + [dict(records[-1], prev=_head(records[:-1]))]
        try:
            _write_json(self.path, {"format": _FORMAT, "records": records}, indent=1)
        except OSError as e:
            raise LedgerError(f"cannot write privacy ledger {self.path}: {e}; nothing released") from None
        self._write_seal(records, epsilon)
        return records

    def reserve(
        self,
        noise_multiplier: float,
        job_id: str = "",
        round_number: Optional[int] = None,
        source: str = "",
        sample_rate: float = 1.0,
        steps: int = 1,
        mechanism: str = "gaussian",
        limit: Optional[float] = None,
        delta: Optional[float] = None,
    ) -> tuple[float, float]:
        """Record one release if it fits the site's budget and the job's limit.

        Args:
            noise_multiplier: z in (0, inf).
            job_id, round_number, source: where the release comes from, for the record.
            sample_rate: Poisson sampling rate q in (0, 1]; 1 for ``"gaussian"``.
            steps: noised steps T >= 1; 1 for ``"gaussian"``.
            mechanism: ``"gaussian"`` (site-level update noise) or ``"dp_sgd"``.
            limit: the job's own cap, in (0, inf); the release must fit ``min(site cap, limit)``.
            delta: the job's delta; larger than the site's is refused.

        Returns:
            ``(epsilon_before, epsilon_after)`` for the site, at the site's delta and accountant.

        Raises:
            PrivacyBudgetExceeded: over the site's cap or the job's limit; nothing is recorded.
            LedgerError: the ledger is blocked or cannot be written.
            ValueError, TypeError: an argument out of range.

        Notes:
            With :math:`H` the history of every recorded release and floor and :math:`e` the
            new entry :math:`(z, q, T)`, the release is recorded iff
            :math:`\varepsilon_{acc}(H \cup \{e\}, \delta_{site}) \le \min(\varepsilon_{site},
            \varepsilon_{limit})` and, for a job delta :math:`\delta_{job} < \delta_{site}`,
            also :math:`\varepsilon_{acc}(H \cup \{e\}, \delta_{job}) \le \varepsilon_{limit}`.
            Composition is by the site's accountant (see :mod:`medflare.privacy.accounting`):
            the neighbouring relation of a Gaussian entry is one site's whole data, of a DP-SGD
            entry one patient. The guarantee assumes each entry was released as recorded
            (clipped, noise of multiplier :math:`z` from a secure source, Poisson sampling at
            :math:`q`) and that nothing is released without a reservation.
        """
        entry = self._check_release(noise_multiplier, sample_rate, steps, mechanism)
        limit, delta = self._check_job_bounds(limit, delta)
        cap = self.max_epsilon if limit is None else min(self.max_epsilon, limit)
        with self._locked():
            records, legacy = self._verified()
            history = _history_of(records)
            before = epsilon_of_history(history, self.delta, self.accountant)
            after = epsilon_of_history(history + [entry], self.delta, self.accountant)
            self._refuse_over(before, after, cap, limit)
            if limit is not None and delta is not None and delta < self.delta:
                self._refuse_over(None, epsilon_of_history(history + [entry], delta, self.accountant), limit, limit, delta)
            record = {
                "event": "release",
                "time": _now(),
                "job_id": str(job_id),
                "round": round_number if round_number is None or isinstance(round_number, int) else str(round_number),
                "source": str(source),
                "mechanism": mechanism,
                "noise_multiplier": entry[0],
                "sample_rate": entry[1],
                "steps": entry[2],
                "delta": self.delta,
                "job_delta": delta,
                "max_epsilon": self.max_epsilon,
                "limit": limit,
                "accountant": self.accountant,
                "epsilon_before": before,
                "epsilon_after": after,
            }
            self._commit(self._upgraded(records, legacy) + [record], after)
        return before, after

    def _check_job_bounds(self, limit, delta) -> tuple[Optional[float], Optional[float]]:
        if limit is not None:
            limit = check_real("limit", limit, 0.0, None, low_open=True)
        if delta is not None:
            delta = check_real("delta", delta, 0.0, 1.0, low_open=True, high_open=True)
            if delta > self.delta:
                raise LedgerError(
                    f"the job's delta {delta:g} is above the site's delta {self.delta:g}: a job can ask for a smaller "
                    "delta, never a larger one; nothing released"
                )
        return limit, delta

    @staticmethod
    def _check_release(noise_multiplier, sample_rate, steps, mechanism) -> tuple[float, float, int]:
        z = check_real("noise_multiplier", noise_multiplier, 0.0, None, low_open=True)
        q = check_real("sample_rate", sample_rate, 0.0, 1.0, low_open=True)
        steps = check_int("steps", steps, 1)
        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
        if mechanism == "gaussian" and (q != 1.0 or steps != 1):
            raise ValueError(
                f"a 'gaussian' release is one site-level release: sample_rate 1 and steps 1, got sample_rate={q!r}, "
                f"steps={steps!r} (use mechanism='dp_sgd' for subsampled steps)"
            )
        return z, q, steps

    def _refuse_over(self, before, after, cap, limit, job_delta=None) -> None:
        if after <= cap:
            return
        at = f"delta {self.delta:g}" if job_delta is None else f"the job's delta {job_delta:g}"
        whose = f"the job's limit {limit:g} (the site's max_epsilon is {self.max_epsilon:g})" if limit is not None and limit < self.max_epsilon else f"max_epsilon {self.max_epsilon:g} (the site's cap)"
        start = f"from {before:.4g} " if before is not None else ""
        raise PrivacyBudgetExceeded(
            f"privacy budget exhausted: this release would bring the site's epsilon {start}to {after:.4g} "
            f"({at}, {self.accountant}), above {whose}; ledger {self.path}"
        )

    # the site admin ------------------------------------------------------------------------

    def acknowledge(self, reason: str, by: str = "") -> dict:
        """Lift a block after the site admin has looked: keep what is readable, carry the seal's
        spend over, record why, seal again. The site's epsilon never goes down.

        Args:
            reason: what the admin found and did, a non-empty string (it goes into the ledger).
            by: who acknowledges (default: the operating-system user).

        Returns:
            ``{"changed", "finding", "epsilon", "floor", "evidence", "records"}``; ``changed`` is
            False when there was nothing to acknowledge (then nothing is written).

        Raises:
            ValueError: ``reason`` is empty.
            LedgerError: the new ledger cannot be written.
        """
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError(f"reason must be a non-empty string saying what was found and done, got {reason!r}")
        with self._locked():
            check = self._inspect()
            marker = {}
            with contextlib.suppress(_Unreadable):
                marker = _read_json(self.block_path) or {}
            if not check.blocked and not marker:
                if check.state == SEAL_BEHIND:
                    self._write_seal(check.records)
                return {"changed": False, "finding": "", "epsilon": None, "floor": None, "evidence": None, "records": len(check.records)}
            kept = [{k: v for k, v in r.items() if k != "prev"} for r in check.records]
            floor = self._floor(kept, check.seal or self._marker_seal(marker))
            evidence = self._keep_evidence() if check.blocked else None
            event = {
                "event": "acknowledged",
                "time": _now(),
                "by": by or _user(),
                "reason": reason.strip(),
                "finding": check.finding or f"a block found {marker.get('since')} ({marker.get('finding')}); the ledger matches its seal again",
                "blocked_since": check.blocked_since or marker.get("since"),
                "evidence": evidence,
            }
            records = _chain(kept + ([floor] if floor else []) + [event])
            epsilon = epsilon_of_history(_history_of(records), self.delta, self.accountant)
            self._commit(records, epsilon)
            if os.path.lexists(self.block_path):
                os.remove(self.block_path)
        return {"changed": True, "finding": event["finding"], "epsilon": epsilon, "floor": floor, "evidence": evidence, "records": len(records)}

    def _marker_seal(self, marker: dict) -> Optional[dict]:
        """The seal as it was when the block was found, if the marker kept it."""
        try:
            return _check_seal(marker["seal"], self.block_path) if marker.get("seal") is not None else None
        except _Unreadable:
            return None

    def _floor(self, kept: list, seal: Optional[dict]) -> Optional[dict]:
        """A record holding the sealed steps that ``kept`` lacks, per ``(z, q)``."""
        if seal is None:
            return None
        deficit = _steps_by_rate(seal["history"]) - _steps_by_rate(_history_of(kept))
        if not deficit:
            return None
        return {
            "event": "floor",
            "time": _now(),
            "history": [[z, q, s] for (z, q), s in sorted(deficit.items())],
            "sealed_records": seal["records"],
            "sealed_head": seal["head"],
            "sealed_epsilon": seal.get("epsilon"),
            "sealed_at": seal.get("time"),
        }

    def _keep_evidence(self) -> Optional[str]:
        if not os.path.lexists(self.path):
            return None
        evidence = f"{self.path}.tampered-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        try:
            if os.path.isfile(self.path) and not os.path.islink(self.path):
                shutil.copy2(self.path, evidence)
            else:
                os.rename(self.path, evidence)
        except OSError as e:
            raise LedgerError(f"cannot keep the damaged ledger {self.path} as {evidence}: {e}; nothing changed") from None
        return evidence


def _user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name is not a reason to refuse the acknowledgement
        return ""
