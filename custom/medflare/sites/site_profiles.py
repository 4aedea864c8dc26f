"""Site profiles: the privacy policy and resource settings a site admin installs, checked first.

A profile is a folder holding two files in NVFlare's own formats and the site's privacy budget:

``privacy.json``
    the site's privacy policy, installed verbatim as ``local/privacy.json``:
    ``{"scopes": [{"name", "properties", "task_data_filters", "task_result_filters"}],
    "default_scope": NAME}``. A job picks a scope with ``"scope"`` in its ``meta.json``; a job
    that names none gets the default; a job naming a scope the site lacks is refused by NVFlare
    at deployment. Site filters run before any filter the job brings.
``resources.json``
    settings merged into the client's ``local/resources.json``: top-level keys replace the
    site's, ``components`` replace the site's components of the same ``id``. The GPU
    resource manager's ``num_of_gpus`` and ``mem_per_gpu_in_GiB`` may be ``"auto"``: the
    installer fills in what the machine has.
``medflare_privacy_budget.json``
    the site's lifetime privacy budget (:mod:`medflare.privacy.site_budget`), installed as
    ``local/medflare_privacy_budget.json``: ``{"max_epsilon", "delta", "accountant", optional
    "seal_path"}``. Every release of the site, Gaussian or DP-SGD, whatever filter or job makes
    it, is counted against it; a filter's own ``max_epsilon`` can only lower it. Optional for a
    profile whose scopes release nothing noised; a profile without one leaves the site's own
    budget file as it is.

Profiles shipped in ``site_configs/``: ``research`` (default scope ``partial_sharing``, plus
``dp_sgd``, ``differential_privacy`` and ``public_data``) and ``clinical`` (default scope
``dp_sgd``, patient-level DP-SGD, plus the site-level Gaussian scopes ``clinical`` and
``clinical_sparse``: differential privacy in every scope; log streaming to the server off). A profile is named by its folder name or given
as a path to any folder with these two files.

Checks made before anything is installed (:func:`check_privacy_policy`): the JSON shape, unique
scope names, a default scope that exists, and every filter built from its arguments, so an
out-of-range argument is reported with the scope and filter it sits in instead of surfacing when
the FLARE client starts. The budget file is checked field by field, and no filter may ask for a
``target_delta`` above the budget's ``delta`` (the ledger would refuse each of its releases).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Iterable, Optional

from medflare.data.brats_layout import DataListError, read_json_object
from medflare.privacy.budget_ledger import LedgerError
from medflare.privacy.site_budget import SITE_BUDGET_FILE_NAME, SiteBudget, parse_site_budget

__all__ = [
    "BUDGET_FILE",
    "PROFILE_FILES",
    "REQUIRED_PROFILE_FILES",
    "PROFILES_ENV_VAR",
    "SiteProfile",
    "SiteProfileError",
    "available_profiles",
    "check_budget_fits_policy",
    "check_privacy_policy",
    "check_resources_fragment",
    "is_allowed",
    "load_profile",
    "profile_search_path",
    "resolve_profile",
]

BUDGET_FILE = SITE_BUDGET_FILE_NAME
#: every file a profile may hold; the budget is optional (see the module docstring)
PROFILE_FILES = ("privacy.json", "resources.json", BUDGET_FILE)
REQUIRED_PROFILE_FILES = ("privacy.json", "resources.json")
PROFILES_ENV_VAR = "MEDFLARE_SITE_CONFIGS"
AUTO = "auto"


class SiteProfileError(ValueError):
    """A profile is unknown, incomplete or invalid; the message names the file and the field."""


@dataclass(frozen=True)
class SiteProfile:
    name: str
    folder: str
    privacy: dict
    resources: dict
    budget: Optional[SiteBudget] = None
    budget_content: Optional[dict] = None  # the budget file as written in the profile

    @property
    def scope_names(self) -> list[str]:
        return [s["name"] for s in self.privacy["scopes"]]

    @property
    def default_scope(self) -> str:
        return self.privacy["default_scope"]


def shipped_profiles_folder() -> str:
    """The profiles medflare ships, inside the installed package (``medflare/site_profiles``,
    found with ``importlib.resources``: an editable install, a wheel, ``pip install --user`` or a
    virtual environment alike). A checkout's ``site_configs/<name>`` links to the same folders."""
    from importlib.resources import files

    return str(files("medflare") / "site_profiles")


def profile_search_path() -> list[str]:
    """Folders searched for named profiles, in order: ``$MEDFLARE_SITE_CONFIGS``, then the
    profiles shipped in the package (:func:`shipped_profiles_folder`)."""
    folders = []
    env = os.environ.get(PROFILES_ENV_VAR)
    if env:
        folders.append(os.path.abspath(env))
    folders.append(shipped_profiles_folder())
    return folders


def available_profiles() -> dict[str, str]:
    """``{name: folder}`` of every profile on the search path; earlier folders win."""
    found: dict[str, str] = {}
    for root in profile_search_path():
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            folder = os.path.join(root, name)
            if name not in found and all(os.path.isfile(os.path.join(folder, f)) for f in REQUIRED_PROFILE_FILES):
                found[name] = folder
    return found


def resolve_profile(name_or_path: str) -> SiteProfile:
    """Load a profile by name (see :func:`profile_search_path`) or from a folder path.

    Raises:
        SiteProfileError: unknown name (listing the known ones), or an invalid profile.
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise SiteProfileError(f"profile must be a name or a folder, got {name_or_path!r}")
    if os.sep in name_or_path or os.path.isdir(name_or_path):
        if not os.path.isdir(name_or_path):
            raise SiteProfileError(f"profile folder not found: {name_or_path}")
        return load_profile(name_or_path)
    profiles = available_profiles()
    if name_or_path not in profiles:
        known = ", ".join(sorted(profiles)) or "none found"
        raise SiteProfileError(
            f"unknown profile {name_or_path!r}; known profiles: {known} (searched {', '.join(profile_search_path())}); "
            f"or give the path of a folder holding privacy.json and resources.json (and {BUDGET_FILE})"
        )
    return load_profile(profiles[name_or_path])


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise SiteProfileError(f"profile file missing: {path}")
    try:
        return read_json_object(path, "profile file")
    except DataListError as e:
        raise SiteProfileError(str(e)) from None


def load_profile(folder: str, allow_list: Optional[Iterable[str]] = None) -> SiteProfile:
    """Read and check the files of a profile folder (see the module docstring).

    Args:
        folder: the profile folder.
        allow_list: class allow-list the privacy filters must be on (default: what the
            installer gives a site, NVFlare's defaults plus medflare's entries).
    """
    folder = os.path.abspath(folder)
    privacy_path = os.path.join(folder, "privacy.json")
    resources_path = os.path.join(folder, "resources.json")
    privacy = _read_json(privacy_path)
    resources = _read_json(resources_path)
    if allow_list is None:
        from medflare.sites.class_allow_list import site_class_allow_list

        allow_list = site_class_allow_list()
    check_privacy_policy(privacy, privacy_path, allow_list)
    check_resources_fragment(resources, resources_path)
    budget_path = os.path.join(folder, BUDGET_FILE)
    budget = content = None
    if os.path.lexists(budget_path):
        content = _read_json(budget_path)
        try:
            budget = parse_site_budget(content, budget_path)
        except LedgerError as e:
            raise SiteProfileError(str(e)) from None
        check_budget_fits_policy(budget, privacy, privacy_path)
    return SiteProfile(os.path.basename(folder), folder, privacy, resources, budget, content)


def check_budget_fits_policy(budget: SiteBudget, policy: dict, source: str) -> None:
    """Refuse a filter whose ``target_delta`` exceeds the site budget's ``delta``: the ledger
    refuses every release of such a filter, so the scope could never release anything.

    Raises:
        SiteProfileError: naming the scope, the filter and both deltas.
    """
    for scope in policy.get("scopes", []):
        for chain in ("task_data_filters", "task_result_filters"):
            for k, component in enumerate(scope.get(chain, [])):
                target = component.get("args", {}).get("target_delta")
                if isinstance(target, (int, float)) and not isinstance(target, bool) and target > budget.delta:
                    raise SiteProfileError(
                        f"{source}: scope {scope['name']!r} {chain}[{k}]: target_delta {target!r} is above the site "
                        f"budget's delta {budget.delta!r} ({BUDGET_FILE}); a filter may use a smaller delta, never a larger one"
                    )


def is_allowed(class_path: str, allow_list: Iterable[str]) -> bool:
    """NVFlare's rule: an entry allows the exact dotted path, or every path under it when it
    ends with ``"."``."""
    for entry in allow_list:
        if class_path == entry or (entry.endswith(".") and class_path.startswith(entry)):
            return True
    return False


def _build(component: dict, where: str):
    path = component["path"]
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise SiteProfileError(f"{where}: class {path!r} cannot be imported: {e}") from None
    try:
        return cls(**component.get("args", {}))
    except (TypeError, ValueError) as e:
        raise SiteProfileError(f"{where}: {path} refuses its arguments {component.get('args', {})}: {e}") from None


def check_privacy_policy(policy: dict, source: str, allow_list: Iterable[str]) -> None:
    """Check a ``privacy.json`` document the way the FLARE client will use it, and more strictly.

    Raises:
        SiteProfileError: naming ``source``, the scope and the filter at fault.
    """
    allow_list = list(allow_list)
    unknown = set(policy) - {"scopes", "default_scope", "format_version"}
    if unknown:
        raise SiteProfileError(f"{source}: unknown top-level keys {sorted(unknown)}; allowed: scopes, default_scope")
    scopes = policy.get("scopes")
    if not isinstance(scopes, list) or not scopes:
        raise SiteProfileError(f"{source}: 'scopes' must be a non-empty list of scope objects, got {scopes!r}")
    names = []
    for n, scope in enumerate(scopes):
        if not isinstance(scope, dict):
            raise SiteProfileError(f"{source}: scopes[{n}] must be an object, got {scope!r}")
        name = scope.get("name")
        if not isinstance(name, str) or not name.strip():
            raise SiteProfileError(f"{source}: scopes[{n}] needs a non-empty string 'name', got {name!r}")
        if name in names:
            raise SiteProfileError(f"{source}: scope name {name!r} is defined twice")
        names.append(name)
        extra = set(scope) - {"name", "properties", "task_data_filters", "task_result_filters"}
        if extra:
            raise SiteProfileError(f"{source}: scope {name!r} has unknown keys {sorted(extra)}")
        if "properties" in scope and not isinstance(scope["properties"], dict):
            raise SiteProfileError(f"{source}: scope {name!r}: 'properties' must be an object")
        for chain in ("task_data_filters", "task_result_filters"):
            filters = scope.get(chain, [])
            if not isinstance(filters, list):
                raise SiteProfileError(f"{source}: scope {name!r}: {chain!r} must be a list, got {filters!r}")
            for k, component in enumerate(filters):
                where = f"{source}: scope {name!r} {chain}[{k}]"
                if not isinstance(component, dict) or not isinstance(component.get("path"), str):
                    raise SiteProfileError(f"{where} must be an object with a dotted 'path', got {component!r}")
                if not isinstance(component.get("args", {}), dict):
                    raise SiteProfileError(f"{where}: 'args' must be an object, got {component.get('args')!r}")
                if not is_allowed(component["path"], allow_list):
                    raise SiteProfileError(f"{where}: {component['path']} is not on the site's class allow-list")
                _build(component, where)
        _check_dp_sgd_told(scope, name, source)
    default = policy.get("default_scope")
    if default not in names:
        raise SiteProfileError(f"{source}: default_scope {default!r} is not one of the scopes {names}")


DP_SGD_FILTER = "medflare.filters.patient_dp_sgd.PatientDPSGDFilter"


def _check_dp_sgd_told(scope: dict, name: str, source: str) -> None:
    """A scope that requires DP-SGD of its results must also tell the executor, on the way in,
    with the same arguments: otherwise every result would be blocked for lack of a record, or
    the executor would train to the job's settings instead of the site's."""
    outgoing = [c for c in scope.get("task_result_filters", []) if c.get("path") == DP_SGD_FILTER]
    incoming = [c for c in scope.get("task_data_filters", []) if c.get("path") == DP_SGD_FILTER]
    for component in outgoing:
        if not any(c.get("args", {}) == component.get("args", {}) for c in incoming):
            raise SiteProfileError(
                f"{source}: scope {name!r}: {DP_SGD_FILTER} in task_result_filters needs the same filter with the "
                "same args in task_data_filters (it tells the executor the DP-SGD the site requires)"
            )


def check_resources_fragment(resources: dict, source: str) -> None:
    """Check a profile's ``resources.json`` fragment: components with ids and dotted paths, and
    the GPU manager's numbers non-negative or ``"auto"``.

    Raises:
        SiteProfileError: naming ``source`` and the entry at fault.
    """
    if "class_allow_list" in resources:
        raise SiteProfileError(
            f"{source}: 'class_allow_list' is set by the installer (NVFlare's defaults plus medflare's entries); remove it"
        )
    components = resources.get("components", [])
    if not isinstance(components, list):
        raise SiteProfileError(f"{source}: 'components' must be a list")
    ids = set()
    for n, c in enumerate(components):
        if not isinstance(c, dict) or not isinstance(c.get("id"), str) or not isinstance(c.get("path"), str):
            raise SiteProfileError(f"{source}: components[{n}] needs a string 'id' and a dotted 'path', got {c!r}")
        if c["id"] in ids:
            raise SiteProfileError(f"{source}: component id {c['id']!r} appears twice")
        ids.add(c["id"])
        args = c.get("args", {})
        if not isinstance(args, dict):
            raise SiteProfileError(f"{source}: component {c['id']!r}: 'args' must be an object")
        for key in ("num_of_gpus", "mem_per_gpu_in_GiB"):
            if key in args and args[key] != AUTO:
                value = args[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise SiteProfileError(
                        f"{source}: component {c['id']!r}: {key} must be {AUTO!r} or a number >= 0, got {value!r}"
                    )
