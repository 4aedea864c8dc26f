"""``medflare site install``: put a site profile and the site's data location into a FLARE workspace.

Into a **client** workspace (one with ``startup/fed_client.json``) it installs, under ``local/``:

* ``privacy.json``: the profile's policy, verbatim;
* ``resources.json``: the workspace's current file (or NVFlare's ``resources.json.default``)
  with the profile's settings merged in, the GPU resource manager sized to this machine, and
  the class allow-list extended by medflare's entries;
* ``medflare_data.json``: where the site's data sets are, keyed by name (absolute paths;
  :mod:`medflare.data.site_data_config`). A site holding several data sets installs them all at
  once, one ``--data [NAME=]PATH`` each; a NAME defaults to the kind detected (``segmentation``
  for a BraTS datalist, ``outcome_image`` for an outcome table with images, ``outcome_table``
  for one without), the name a job's executor of that kind asks for. So one install serves
  every job of the site, whatever it trains on;
* ``medflare_privacy_budget.json``: the site's lifetime privacy budget, from the profile (a
  ``seal_path`` the site already set is kept); a profile without one leaves the site's as it
  is. The privacy ledger and its seal are never written, moved or deleted by an install, so
  no install lowers what the site has spent; the seal may not be moved away from a ledger;
* ``medflare_site.json``: what was installed, from which profile, with each file's SHA-256,
  so ``medflare site show`` can tell a hand edit from the installed policy.

Into the **server** workspace (``startup/fed_server.json``) it installs only the class allow-list:
the server builds medflare's aggregators and persistor, and has no privacy policy or data.

Nothing is written until every file has been built and checked: the profile's filters are
built from their arguments, each data set's datalist (or outcome table) is read and every file
it names must lie inside the data root and pass the content checks the trainer runs
(:mod:`medflare.data.brats_volume_checks`: labels, shapes, affines, finite voxels), and the
staged policy is loaded by NVFlare's own privacy configurator. Files are then swapped in one at
a time with the previous versions kept in ``local/medflare_backup/<time>/``; if any swap fails
the earlier ones are rolled back, so a site never runs with half a profile. The FLARE client
reads ``privacy.json`` and ``resources.json`` when it starts: restart it after installing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

from medflare.data.brats_layout import DataListError, load_datalist, read_json_object
from medflare.data.brats_volume_checks import check_brats_subjects
from medflare.data.site_data_config import (
    DATASETS_KEY,
    OUTCOME_IMAGE,
    OUTCOME_TABLE,
    SEGMENTATION,
    check_dataset_name,
    keyed_data_config,
    read_site_datasets,
)
from medflare.data.site_data_config import LOCAL_FILE_NAME as DATA_CONFIG_FILE
from medflare.privacy.budget_ledger import LEDGER_FILE_NAME, LedgerError, PrivacyBudgetLedger, default_seal_path
from medflare.privacy.site_budget import SITE_BUDGET_FILE_NAME, SiteBudget, load_site_budget, parse_site_budget
from medflare.sites.class_allow_list import site_class_allow_list
from medflare.sites.site_profiles import AUTO, SiteProfile, SiteProfileError, check_budget_fits_policy, resolve_profile

__all__ = [
    "DATA_CONFIG_FILE",
    "InstallError",
    "InstallPlan",
    "MANIFEST_FILE",
    "apply_install",
    "detect_gpus",
    "install_site",
    "plan_install",
    "read_manifest",
    "workspace_role",
]

MANIFEST_FILE = "medflare_site.json"
BACKUP_DIR = "medflare_backup"
GPU_MANAGER = "nvflare.app_common.resource_managers.gpu_resource_manager.GPUResourceManager"


class InstallError(RuntimeError):
    """The install was refused or could not complete; the workspace is as it was."""


@dataclass
class InstallPlan:
    """Everything to be written, checked, not yet written."""

    workspace: str
    role: str
    files: dict = field(default_factory=dict)  # name under local/ -> text
    summary: list = field(default_factory=list)


def workspace_role(workspace: str) -> str:
    """``"client"`` or ``"server"`` from the workspace's startup kit.

    Raises:
        InstallError: the folder is missing or is not a provisioned FLARE client or server.
    """
    if not os.path.isdir(workspace):
        raise InstallError(f"workspace not found: {workspace}")
    startup = os.path.join(workspace, "startup")
    if os.path.isfile(os.path.join(startup, "fed_client.json")):
        return "client"
    if os.path.isfile(os.path.join(startup, "fed_server.json")):
        return "server"
    raise InstallError(
        f"{workspace} is not a FLARE client or server workspace: no startup/fed_client.json or "
        "startup/fed_server.json (give the folder of a provisioned startup kit)"
    )


def detect_gpus() -> tuple[int, int]:
    """``(number of CUDA GPUs, GiB of the smallest)``; ``(0, 0)`` without CUDA."""
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            return 0, 0
        smallest = min(torch.cuda.get_device_properties(i).total_memory for i in range(count))
        return count, int(smallest // 2**30)
    except Exception:  # noqa: BLE001 - a broken driver means no usable GPU
        return 0, 0


def _current_resources(local_dir: str) -> dict:
    for name in ("resources.json", "resources.json.default"):
        path = os.path.join(local_dir, name)
        if os.path.isfile(path):
            try:
                return read_json_object(path, "site resources")
            except DataListError as e:
                raise InstallError(str(e)) from None
    return {"format_version": 2}


def _merge_resources(current: dict, profile: Optional[SiteProfile], gpus: Optional[int], gpu_mem: Optional[float]) -> tuple[dict, list]:
    merged = copy.deepcopy(current)
    notes = []
    if profile is not None:
        fragment = profile.resources
        for key, value in fragment.items():
            if key != "components":
                merged[key] = value
        by_id = {c.get("id"): i for i, c in enumerate(merged.get("components", []))}
        components = list(merged.get("components", []))
        for c in copy.deepcopy(fragment.get("components", [])):
            if c["id"] in by_id:
                components[by_id[c["id"]]] = c
            else:
                components.append(c)
        merged["components"] = components
    detected = None
    for c in merged.get("components", []):
        if c.get("path") != GPU_MANAGER:
            continue
        args = c.setdefault("args", {})
        for key, given in (("num_of_gpus", gpus), ("mem_per_gpu_in_GiB", gpu_mem)):
            if given is not None:
                args[key] = given
            elif args.get(key, AUTO) == AUTO:
                detected = detected or detect_gpus()
                args[key] = detected[0] if key == "num_of_gpus" else detected[1]
        notes.append(f"GPU resource manager: {args['num_of_gpus']} GPU(s), {args['mem_per_gpu_in_GiB']} GiB each")
    merged["class_allow_list"] = list(dict.fromkeys(list(merged.get("class_allow_list", [])) + site_class_allow_list()))
    merged.setdefault("class_list_enforcement_mode", "enforce")
    notes.append(f"class allow-list: {len(merged['class_allow_list'])} entries, medflare's included")
    return merged, notes


def _data_entries(data) -> list[tuple[Optional[str], str, str]]:
    """``(NAME or None, PATH, as given)`` of each ``--data``: a ``[NAME=]PATH`` string, a list of
    them, or a dict ``{NAME: PATH}``. A NAME is the text before the first ``=`` when that text
    holds no path separator (so ``./a=b.json`` is a path)."""
    if isinstance(data, str):
        data = [data]
    if isinstance(data, dict):
        entries = []
        for name, path in data.items():
            check_dataset_name(name, f"--data {name}=...: the data set name", InstallError)
            if not isinstance(path, str) or not path:
                raise InstallError(f"--data {name}=...: the path must be a non-empty string, got {path!r}")
            entries.append((name, path, f"{name}={path}"))
        return entries
    if not isinstance(data, (list, tuple)):
        raise InstallError(f"--data must be [NAME=]PATH, a list of them or a dict {{NAME: PATH}}, got {data!r}")
    entries = []
    for given in data:
        if not isinstance(given, str) or not given:
            raise InstallError(f"--data entries must be non-empty strings [NAME=]PATH, got {given!r}")
        name, sep, path = given.partition("=")
        if sep and os.sep not in name and "/" not in name:
            check_dataset_name(name, f"--data {given}: the data set name (before '=')", InstallError)
            if not path:
                raise InstallError(f"--data {given}: no PATH after {name}=")
            entries.append((name, path, given))
        else:
            entries.append((None, given, given))
    return entries


def _data_locations(given: str, data: str, data_root: Optional[str]) -> list[tuple[Optional[str], str, str]]:
    """``(name in the file or None, data_root, datalist)`` of one ``--data`` PATH: a site data
    configuration (flat: one; keyed: each of its data sets), a datalist or an outcome table."""
    path = os.path.abspath(data)
    base = os.path.dirname(path)
    content = {}
    if os.path.isdir(path) and _is_outcome_table(path):
        from medflare.data.chest_xray_tables import detect_table_format

        # CheXpert's paths start with its folder's name; MIMIC-CXR-JPG's with files/ inside it
        table_format, _ = detect_table_format(path)
        default_root = base if table_format == "chexpert" else path
        return [(None, os.path.abspath(data_root) if data_root is not None else default_root, path)]
    if not path.lower().endswith(".csv"):
        try:
            content = read_json_object(path, "--data")
        except DataListError as e:
            raise InstallError(str(e)) from None
    if DATASETS_KEY in content:
        if data_root is not None:
            raise InstallError(f"--data {given} is a keyed site data configuration with its own data roots; drop --data-root")
        try:
            return [(entry.dataset, entry.data_root, entry.datalist) for entry in read_site_datasets(path)]
        except DataListError as e:
            raise InstallError(f"--data {given}: {e}") from None
    if "datalist" in content and "training" not in content:
        if data_root is not None:
            raise InstallError(f"--data {given} is a site data configuration with its own data_root; drop --data-root")
        for key in ("data_root", "datalist"):
            if not isinstance(content.get(key), str) or not content[key]:
                raise InstallError(f"--data {given}: a site data configuration needs a non-empty string {key!r}")
        root = os.path.normpath(os.path.join(base, os.path.expanduser(content["data_root"])))
        datalist = os.path.normpath(os.path.join(base, os.path.expanduser(content["datalist"])))
        return [(None, root, datalist)]
    return [(None, os.path.abspath(data_root) if data_root is not None else base, path)]


def _is_outcome_table(datalist: str) -> bool:
    """A CSV, or a folder holding CheXpert's ``train.csv`` or a MIMIC-CXR labels file."""
    if datalist.lower().endswith(".csv"):
        return True
    if not os.path.isdir(datalist):
        return False
    from medflare.data.chest_xray_tables import detect_table_format

    try:
        detect_table_format(datalist)
    except DataListError:
        return False
    return True


def _check_data(given: str, root: str, datalist: str) -> tuple[str, str]:
    """Check every file ``datalist`` names, content included, as the site's trainer will.

    Returns:
        ``(the data set kind detected, a summary note)``: ``segmentation`` for a BraTS
        datalist, ``outcome_image`` for an outcome table with images, else ``outcome_table``.
    """
    try:
        if _is_outcome_table(datalist):  # medflare's own table, CheXpert or MIMIC-CXR-JPG
            from medflare.data.chest_xray_tables import check_site_table

            counts = check_site_table(datalist, root)
            kind = OUTCOME_IMAGE if counts["images"] > 0 else OUTCOME_TABLE
            return kind, (
                f"outcome table {datalist} ({counts['format']}): {counts['train']} training and {counts['test']} test cases, "
                f"{counts['images']} images under {root}"
            )
        training, validation = load_datalist(datalist, root, check_files=True)
        # the trainer's own content checks, so bad volumes are found now, not at the first job
        check_brats_subjects(training + validation)
    except DataListError as e:
        raise InstallError(f"--data {given}: {e}") from None
    return SEGMENTATION, (
        f"{len(training)} training and {len(validation)} validation subjects, datalist {datalist}, "
        f"images under {root}; labels, shapes, affines and voxels checked"
    )


def _data_config(data, data_root: Optional[str]) -> tuple[dict, list]:
    """The keyed ``medflare_data.json`` for ``data`` (see :func:`plan_install`), every data set
    checked; and a summary note per data set.

    Raises:
        InstallError: an entry that is malformed or fails the checks, two data sets under one
            name (both paths named), or ``data_root`` with more than one entry.
    """
    entries = _data_entries(data)
    if data_root is not None and len(entries) > 1:
        raise InstallError(
            f"--data-root applies when exactly one --data is given, got {len(entries)} "
            f"({', '.join(given for _, _, given in entries)}): give each data set as a site data configuration "
            "{data_root, datalist}, or a datalist or table whose paths are relative to its own folder"
        )
    chosen: dict = {}  # name -> (data_root, datalist, as given)
    notes = []
    for name, path, given in entries:
        locations = _data_locations(given, path, data_root)
        if name is not None and locations[0][0] is not None:
            raise InstallError(
                f"--data {given}: {path} is a keyed site data configuration whose data sets have their own names "
                f"{[n for n, _, _ in locations]}; give it without {name}="
            )
        for in_file, root, datalist in locations:
            kind, note = _check_data(given, root, datalist)
            key = name or in_file or kind
            how = "named" if name else "as in the file" if in_file else "detected"
            if key in chosen:
                raise InstallError(
                    f"--data: two data sets named {key!r}: {chosen[key][2]} and {given}; a site holds one data set "
                    f"per name: name them apart with --data NAME=PATH (a job asks for a name with its executor's "
                    f"'dataset' argument)"
                )
            chosen[key] = (root, datalist, given)
            notes.append(f"data set {key} ({how}): {note}")
    return keyed_data_config({key: (root, datalist) for key, (root, datalist, _) in chosen.items()}), notes


def _dumps(obj: dict) -> str:
    return json.dumps(obj, indent=2) + "\n"


def _check_with_nvflare(workspace: str, files: dict) -> None:
    """Load the staged ``privacy.json`` with NVFlare's own configurator, as the client will."""
    from nvflare.apis.workspace import Workspace
    from nvflare.private.fed.app.fl_conf import create_privacy_manager

    with tempfile.TemporaryDirectory(prefix="medflare-site-check-") as staging:
        os.makedirs(os.path.join(staging, "local"))
        shutil.copytree(os.path.join(workspace, "startup"), os.path.join(staging, "startup"))
        for name, text in files.items():
            with open(os.path.join(staging, "local", name), "w") as f:
                f.write(text)
        try:
            manager = create_privacy_manager(Workspace(root_dir=staging), names_only=False)
        except Exception as e:  # noqa: BLE001 - anything NVFlare refuses, the client would refuse
            raise InstallError(f"NVFlare refuses the staged privacy.json: {type(e).__name__}: {e}") from None
        if not manager.is_policy_defined():
            raise InstallError("NVFlare reads no privacy policy from the staged privacy.json")


def _uses_budget(policy: dict) -> bool:
    """Whether a filter of the policy charges the site's ledger (which needs the budget file)."""
    return any(
        f.get("path", "").endswith(("GaussianPrivacyFilter", "PatientDPSGDFilter")) or "max_epsilon" in f.get("args", {})
        for scope in policy.get("scopes", [])
        for chain in ("task_data_filters", "task_result_filters")
        for f in scope.get(chain, [])
    )


def _budget_file(local_dir: str, chosen: SiteProfile) -> tuple[Optional[str], Optional[SiteBudget], Optional[SiteBudget], list]:
    """``(text to install or None, budget in force after the install, the site's current budget, notes)``."""
    notes = []
    current = None
    if os.path.lexists(os.path.join(local_dir, SITE_BUDGET_FILE_NAME)):
        try:
            current = load_site_budget(local_dir)
        except LedgerError as e:
            if chosen.budget is None:
                raise InstallError(f"{e}; the profile {chosen.name} brings no budget file to replace it") from None
            notes.append(f"privacy budget: the site's budget file is malformed and is replaced ({e})")
    if chosen.budget is None:
        if current is not None:
            try:
                check_budget_fits_policy(current, chosen.privacy, os.path.join(chosen.folder, "privacy.json"))
            except SiteProfileError as e:
                raise InstallError(str(e)) from None
        elif _uses_budget(chosen.privacy):
            raise InstallError(
                f"profile {chosen.name} ({chosen.folder}) has differential-privacy scopes (Gaussian or DP-SGD) but no "
                f"{SITE_BUDGET_FILE_NAME}, and the site has none: every release they make would be refused; add the "
                f"site's budget to the profile or write "
                f"local/{SITE_BUDGET_FILE_NAME} (see docs/site-admin.md)"
            )
        return None, current, current, notes
    content = dict(chosen.budget_content)
    if "seal_path" not in content and current is not None and current.seal_path:
        content["seal_path"] = current.seal_path
        notes.append(f"privacy budget: the site's seal_path {current.seal_path} is kept")
    budget = parse_site_budget(content, os.path.join(chosen.folder, SITE_BUDGET_FILE_NAME))
    return _dumps(content), budget, current, notes


def _budget_notes(local_dir: str, budget: Optional[SiteBudget], current: Optional[SiteBudget]) -> list:
    """Refuse to move the seal away from a ledger; say what the site has spent against the new cap."""
    ledger_file = os.path.join(local_dir, LEDGER_FILE_NAME)
    old_seal = current.seal_path if current is not None and current.seal_path else default_seal_path(ledger_file)
    new_seal = (budget.seal_path or default_seal_path(ledger_file)) if budget is not None else old_seal
    if new_seal != old_seal and os.path.lexists(old_seal) and not os.path.lexists(new_seal):
        raise InstallError(
            f"the install would move the privacy ledger's seal from {old_seal} to {new_seal}, and the ledger would be "
            f"blocked: move the seal file to {new_seal} first, or set seal_path {old_seal!r} in the profile's {SITE_BUDGET_FILE_NAME}"
        )
    if budget is None:
        return []
    note = f"privacy budget: max_epsilon {budget.max_epsilon:g} at delta {budget.delta:g} ({budget.accountant}), seal {new_seal}"
    if not (os.path.lexists(ledger_file) or os.path.lexists(new_seal)):
        return [note + "; nothing spent yet"]
    ledger = PrivacyBudgetLedger(ledger_file, budget.max_epsilon, budget.delta, budget.accountant, new_seal)
    check = ledger.inspect()
    if check.blocked:
        return [note, f"WARNING: the privacy ledger is blocked and stays blocked: {check.finding}; {ledger.fix_hint()}"]
    spent = PrivacyBudgetLedger.epsilon_of(check.records, budget.delta, budget.accountant)
    note += f"; spent so far {spent:.4g} (the ledger is kept as it is)"
    if spent >= budget.max_epsilon:
        note += "; NOTHING REMAINS: every further Gaussian release is refused"
    return [note]


def plan_install(
    workspace: str,
    profile: Optional[str] = None,
    data: Union[str, Sequence[str], Mapping[str, str], None] = None,
    data_root: Optional[str] = None,
    gpus: Optional[int] = None,
    gpu_memory_gib: Optional[float] = None,
) -> InstallPlan:
    """Build and check every file to install; write nothing.

    Args:
        workspace: the FLARE client's (or server's) workspace folder.
        profile: profile name or folder; required for a client, refused for the server.
        data: the site's data sets, each a site data configuration (flat
            ``{"data_root", "datalist"}``, or keyed: each of its data sets), a datalist JSON or
            an outcome table: one ``"[NAME=]PATH"``, a list of them (``--data`` repeated) or a
            dict ``{NAME: PATH}``. A NAME defaults to the kind detected: ``segmentation`` (a
            BraTS datalist), ``outcome_image`` (an outcome table with images) or
            ``outcome_table``. Required for a client, refused for the server.
        data_root: folder a datalist's relative paths start from (default: its own folder);
            only with exactly one ``data`` entry.
        gpus, gpu_memory_gib: override the GPU count and memory per GPU found on this machine.

    Raises:
        InstallError: naming the argument or file at fault.
    """
    workspace = os.path.abspath(workspace)
    role = workspace_role(workspace)
    if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0):
        raise InstallError(f"--gpus must be an int >= 0, got {gpus!r}")
    if gpu_memory_gib is not None and (isinstance(gpu_memory_gib, bool) or not isinstance(gpu_memory_gib, (int, float)) or gpu_memory_gib < 0):
        raise InstallError(f"--gpu-memory must be a number >= 0 (GiB), got {gpu_memory_gib!r}")
    plan = InstallPlan(workspace, role)
    local_dir = os.path.join(workspace, "local")
    if role == "server":
        if profile is not None or data is not None:
            raise InstallError(
                f"{workspace} is the server's workspace: it takes no --profile or --data (the server has no privacy "
                "policy or data; only the class allow-list is installed)"
            )
        resources, notes = _merge_resources(_current_resources(local_dir), None, gpus, gpu_memory_gib)
        plan.files["resources.json"] = _dumps(resources)
        plan.summary += notes
        manifest = {"role": "server"}
    else:
        if profile is None:
            raise InstallError("--profile is required for a client workspace (e.g. research or clinical)")
        if data is None or (isinstance(data, (list, tuple, dict)) and not data):
            raise InstallError("--data is required for a client workspace: the site's data configuration or datalist")
        try:
            chosen = resolve_profile(profile)
        except SiteProfileError as e:
            raise InstallError(str(e)) from None
        data_config, data_notes = _data_config(data, data_root)
        resources, notes = _merge_resources(_current_resources(local_dir), chosen, gpus, gpu_memory_gib)
        plan.files["privacy.json"] = _dumps(chosen.privacy)
        plan.files["resources.json"] = _dumps(resources)
        plan.files[DATA_CONFIG_FILE] = _dumps(data_config)
        budget_text, budget, current_budget, budget_notes = _budget_file(local_dir, chosen)
        budget_notes += _budget_notes(local_dir, budget, current_budget)
        if budget_text is not None:
            plan.files[SITE_BUDGET_FILE_NAME] = budget_text
        _check_with_nvflare(workspace, {"privacy.json": plan.files["privacy.json"]})
        plan.summary.append(
            f"profile {chosen.name} ({chosen.folder}): scopes {', '.join(chosen.scope_names)}; default {chosen.default_scope}"
        )
        plan.summary += notes + data_notes + budget_notes
        manifest = {
            "role": "client",
            "profile": chosen.name,
            "profile_folder": chosen.folder,
            "datasets": list(data_config[DATASETS_KEY]),
        }
    from medflare import __version__

    manifest.update(
        {
            "medflare_version": __version__,
            "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": {name: hashlib.sha256(text.encode()).hexdigest() for name, text in plan.files.items()},
        }
    )
    plan.files[MANIFEST_FILE] = _dumps(manifest)
    return plan


def apply_install(plan: InstallPlan, _replace=os.replace) -> str:
    """Write a checked plan into ``<workspace>/local``: all files or none.

    Returns:
        The backup folder holding the files that were replaced (empty when none existed).

    Raises:
        InstallError: when a file could not be written; every file is then as it was.
    """
    local_dir = os.path.join(plan.workspace, "local")
    os.makedirs(local_dir, exist_ok=True)
    backup = os.path.join(local_dir, BACKUP_DIR, time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}")
    staged, done = {}, []
    try:
        for name, text in plan.files.items():
            tmp = os.path.join(local_dir, f".{name}.medflare-new")
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            staged[name] = tmp
        os.makedirs(backup, exist_ok=True)
        for name in plan.files:
            target = os.path.join(local_dir, name)
            if os.path.exists(target):
                shutil.copy2(target, os.path.join(backup, name))
        for name, tmp in staged.items():
            _replace(tmp, os.path.join(local_dir, name))
            done.append(name)
    except OSError as e:
        for name in done:
            saved = os.path.join(backup, name)
            target = os.path.join(local_dir, name)
            if os.path.exists(saved):
                shutil.copy2(saved, target)
            else:
                os.remove(target)
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        raise InstallError(f"install into {local_dir} failed and was rolled back: {e}") from None
    if not os.listdir(backup):
        os.rmdir(backup)
        if not os.listdir(os.path.dirname(backup)):
            os.rmdir(os.path.dirname(backup))
    return backup


def install_site(
    workspace: str, profile: Optional[str] = None, data: Union[str, Sequence[str], Mapping[str, str], None] = None, **kwargs
) -> InstallPlan:
    """:func:`plan_install` then :func:`apply_install`; returns the plan that was installed.
    ``data``: one ``"[NAME=]PATH"``, a list of them or a dict ``{NAME: PATH}`` (see :func:`plan_install`)."""
    plan = plan_install(workspace, profile, data, **kwargs)
    backup = apply_install(plan)
    if os.path.isdir(backup):
        plan.summary.append(f"previous files kept in {backup}")
    return plan


def read_manifest(workspace: str) -> dict:
    """The install record of a workspace, with ``"modified"``: installed files changed since.

    Raises:
        InstallError: nothing was installed there by medflare, or the record is unreadable.
    """
    path = os.path.join(os.path.abspath(workspace), "local", MANIFEST_FILE)
    if not os.path.isfile(path):
        raise InstallError(f"no medflare install record at {path}; run medflare site install first")
    try:
        manifest = read_json_object(path, "install record")
    except DataListError as e:
        raise InstallError(str(e)) from None
    modified = []
    for name, digest in manifest.get("files", {}).items():
        if name == MANIFEST_FILE:
            continue
        target = os.path.join(os.path.dirname(path), name)
        try:
            with open(target, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != digest:
                    modified.append(name)
        except OSError:
            modified.append(name)
    manifest["modified"] = modified
    return manifest
