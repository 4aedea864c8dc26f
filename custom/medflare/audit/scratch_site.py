"""A scratch copy of a FLARE client's site configuration, so an audit never touches the real one.

An audit runs the site's real filters, and those charge the site's privacy ledger before they
release anything. Run against the real workspace that would spend the site's budget on an
audit; so each round trip gets a fresh copy of ``<workspace>/local`` and ``startup/`` in a
temporary folder, with:

* the ledger, its seal and any block marker copied in (a seal kept outside the workspace, the
  budget's ``seal_path``, is copied too and the copy's budget file points at the copy);
* the budget read as the client reads it (``local/`` or ``MEDFLARE_PRIVACY_BUDGET``) and written
  into the copy, and the location of the data set the audited job trains on (from
  ``local/medflare_data.json`` or ``MEDFLARE_DATA_CONFIG``, flat or keyed by data set name)
  written into the copy as a flat file with absolute paths, which serves the job's executor
  whatever name it asks for; both environment variables are cleared while the audit runs, so
  nothing reaches past the copy;
* the privacy policy read by NVFlare's own configurator
  (``nvflare.private.fed.app.fl_conf.create_privacy_manager``) from the copied ``privacy.json``.

:func:`workspace_fingerprint` records every file of the real workspace (size and SHA-256), so the
audit can prove it changed nothing but its own report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterator, Optional

from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.workspace import Workspace

from medflare.data.site_data_config import ENV_VAR as DATA_ENV_VAR
from medflare.data.site_data_config import LOCAL_FILE_NAME as DATA_FILE_NAME
from medflare.data.site_data_config import SiteDataConfig, resolve_site_data_config
from medflare.privacy.budget_ledger import LEDGER_FILE_NAME, LedgerError, default_seal_path
from medflare.privacy.site_budget import ENV_VAR as BUDGET_ENV_VAR
from medflare.privacy.site_budget import SITE_BUDGET_FILE_NAME, load_site_budget

__all__ = ["AuditError", "SiteUnderAudit", "ScratchSite", "open_site", "scratch_copy", "workspace_fingerprint", "changed_files"]


class AuditError(ValueError):
    """An audit that cannot run as asked; the message names the file or argument."""


@dataclass(frozen=True)
class SiteUnderAudit:
    """The real site, read once: its workspace, name, scopes and data location.

    Attributes:
        workspace: the client's workspace folder (absolute).
        name: the site's name (the workspace folder's name unless given).
        scopes: the scope names of its ``privacy.json``, in file order.
        default_scope: the scope a job naming none gets.
        data: where the audited job's data set is (:class:`~medflare.data.site_data_config.SiteDataConfig`).
        budget: the site's budget as read (``None`` when it has none).
        privacy_file: the policy file.
    """

    workspace: str
    name: str
    scopes: tuple
    default_scope: Optional[str]
    data: SiteDataConfig
    budget: Optional[object]
    privacy_file: str


@dataclass
class ScratchSite:
    """One scratch copy: its root, an FLContext of the site on it, and NVFlare's privacy manager."""

    root: str
    fl_ctx: FLContext
    privacy_manager: object

    @property
    def local_dir(self) -> str:
        return os.path.join(self.root, "local")

    @property
    def ledger_path(self) -> str:
        return os.path.join(self.local_dir, LEDGER_FILE_NAME)

    def use_scope(self, scope_name: Optional[str]) -> None:
        """Put the scope on the context as the FLARE client does for a job of that scope
        (``None``: no site filters at all, the audit's unfiltered reference)."""
        if scope_name is None:
            self.fl_ctx.remove_prop(FLContextKey.SCOPE_OBJECT)
            return
        scope = self.privacy_manager.get_scope(scope_name)
        if scope is None:
            raise AuditError(f"the site's privacy.json defines no scope {scope_name!r}")
        self.fl_ctx.set_prop(FLContextKey.SCOPE_OBJECT, scope, private=True, sticky=False)

    def use_data(self, data_root: str, datalist: str) -> None:
        """Point the scratch site at another datalist (the worst case's one-case list)."""
        _write_flat_data_config(self.local_dir, data_root, datalist)


def _write_flat_data_config(local_dir: str, data_root: str, datalist: str) -> None:
    """The copy's ``medflare_data.json`` in the flat form: one data set, served to every name
    (the copy runs only the audited job, whose data set it is)."""
    with open(os.path.join(local_dir, DATA_FILE_NAME), "w") as f:
        json.dump({"data_root": data_root, "datalist": datalist}, f)


def _read_policy(path: str) -> dict:
    try:
        with open(path) as f:
            policy = json.load(f)
    except FileNotFoundError:
        raise AuditError(f"{path}: no privacy policy; install a site profile first (medflare site install)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AuditError(f"{path}: cannot read the site's privacy policy: {e}") from None
    if not isinstance(policy, dict) or not isinstance(policy.get("scopes"), list):
        raise AuditError(f"{path}: a privacy policy needs a list of scopes")
    return policy


@contextlib.contextmanager
def _without_site_environment() -> Iterator[dict]:
    """Clear the two site environment variables for the audit's duration (restored after)."""
    saved = {name: os.environ.pop(name) for name in (DATA_ENV_VAR, BUDGET_ENV_VAR) if name in os.environ}
    try:
        yield saved
    finally:
        for name in (DATA_ENV_VAR, BUDGET_ENV_VAR):
            os.environ.pop(name, None)
        os.environ.update(saved)


def open_site(
    workspace: str, site_name: Optional[str] = None, dataset: Optional[str] = None, dataset_from: Optional[str] = None
) -> SiteUnderAudit:
    """Read the real site's policy, data location and budget (nothing is written).

    Args:
        workspace: the FLARE client's workspace.
        site_name: the site's name (default: the workspace folder's name).
        dataset: the data set name the audited job's executor asks for
            (:attr:`~medflare.executors.site_training_executor.SiteTrainingExecutor.dataset_name`);
            ``None``: the site's only data set.
        dataset_from: where that name came from, for the message when the site lacks it.

    Raises:
        AuditError: no such workspace, no or unreadable ``privacy.json``, no data configuration
            or none for ``dataset``.
    """
    if not isinstance(workspace, str) or not os.path.isdir(workspace):
        raise AuditError(f"--workspace {workspace!r}: not a folder (give the FLARE client's workspace)")
    root = os.path.abspath(workspace)
    local = os.path.join(root, "local")
    name = site_name or os.path.basename(root.rstrip(os.sep))
    privacy_file = os.path.join(local, "privacy.json")
    policy = _read_policy(privacy_file)
    scopes = tuple(s.get("name") for s in policy["scopes"] if isinstance(s, dict))
    try:
        data = resolve_site_data_config(name, local, dataset=dataset, dataset_from=dataset_from)
    except Exception as e:  # DataListError naming the file
        raise AuditError(f"--workspace {workspace}: cannot find the site's data: {e}") from None
    try:
        budget = load_site_budget(local, name)
    except LedgerError:
        budget = None  # a site without a budget: its DP scopes will block, which the audit reports
    return SiteUnderAudit(root, name, scopes, policy.get("default_scope"), data, budget, privacy_file)


def _copy_if_present(source: str, target: str) -> None:
    if os.path.lexists(source) and os.path.isfile(source):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(source, target)


@contextlib.contextmanager
def scratch_copy(site: SiteUnderAudit, data: Optional[tuple] = None) -> Iterator[ScratchSite]:
    """A fresh scratch copy of ``site``; removed on exit.

    Args:
        site: from :func:`open_site`.
        data: ``(data_root, datalist)`` to use instead of the site's (the worst case's list).
    """
    from nvflare.private.fed.app.fl_conf import create_privacy_manager

    with _without_site_environment() as saved, tempfile.TemporaryDirectory(prefix="medflare-audit-") as scratch:
        root = os.path.join(scratch, site.name)
        local = os.path.join(root, "local")
        shutil.copytree(os.path.join(site.workspace, "local"), local, symlinks=False)
        startup = os.path.join(site.workspace, "startup")
        if os.path.isdir(startup):
            shutil.copytree(startup, os.path.join(root, "startup"), symlinks=False)
            if os.path.isfile(os.path.join(root, "startup", "client_context.tenseal")):
                # a kit provisioned with HE: the encrypting scopes read the copy's key as the client reads its own
                from medflare.transport.he_context import use_startup_kit

                use_startup_kit(os.path.join(root, "startup"))
        else:
            os.makedirs(os.path.join(root, "startup"))
        if site.budget is not None:
            real_ledger = os.path.join(site.workspace, "local", LEDGER_FILE_NAME)
            real_seal = site.budget.seal_path or default_seal_path(real_ledger)
            scratch_seal = default_seal_path(os.path.join(local, LEDGER_FILE_NAME))
            for suffix in ("", ".blocked"):
                _copy_if_present(real_seal + suffix, scratch_seal + suffix)
            budget = {"max_epsilon": site.budget.max_epsilon, "delta": site.budget.delta, "accountant": site.budget.accountant}
            with open(os.path.join(local, SITE_BUDGET_FILE_NAME), "w") as f:
                json.dump(budget, f)  # the copy's seal next to the copy's ledger
        elif BUDGET_ENV_VAR in saved:
            pass  # an unreadable budget: the copy has none either, so DP scopes block as they would
        data_root, datalist = data or (site.data.data_root, site.data.datalist)
        _write_flat_data_config(local, data_root, datalist)  # replaces the copied (maybe keyed) file
        try:
            manager = create_privacy_manager(Workspace(root_dir=root, site_name=site.name), names_only=False)
        except Exception as e:  # noqa: BLE001 - what NVFlare refuses, the client would refuse at start
            raise AuditError(f"{site.privacy_file}: NVFlare refuses the site's privacy policy: {type(e).__name__}: {e}") from None
        fl_ctx = FLContext()
        fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, site.name, private=False, sticky=True)
        fl_ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, Workspace(root, site.name), private=True, sticky=True)
        yield ScratchSite(root, fl_ctx, manager)


def workspace_fingerprint(workspace: str, skip: Optional[str] = None) -> dict:
    """``{relative path: (size, sha256)}`` of every file under ``workspace`` (``skip``: a folder
    left out, the audit's own report folder)."""
    found = {}
    skip = os.path.abspath(skip) if skip else None
    for folder, dirs, files in os.walk(workspace):
        if skip and (os.path.abspath(folder) == skip or os.path.abspath(folder).startswith(skip + os.sep)):
            dirs[:] = []
            continue
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path) or not os.path.isfile(path):
                found[os.path.relpath(path, workspace)] = ("link", os.readlink(path) if os.path.islink(path) else "")
                continue
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            found[os.path.relpath(path, workspace)] = (os.path.getsize(path), digest.hexdigest())
    return found


def changed_files(before: dict, after: dict) -> list[str]:
    """Paths added, removed or changed between two fingerprints."""
    return sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
