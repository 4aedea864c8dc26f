"""``medflare site``: install a site profile into a FLARE workspace and show what is installed.

    medflare site profiles
    medflare site install --workspace SITE_DIR --profile clinical --data DATA_CONFIG_OR_DATALIST
    medflare site install --workspace SITE_DIR --profile clinical --data BRATS_DATALIST --data CXR_TABLE ...
    medflare site install --workspace SERVER_DIR
    medflare site show --workspace SITE_DIR
"""

from __future__ import annotations

import json
import os

from medflare.cli.budget import format_budget, ledger_path
from medflare.data.data_errors import DataListError
from medflare.data.site_data_config import read_site_datasets
from medflare.privacy.budget_ledger import LedgerError
from medflare.sites.site_install import DATA_CONFIG_FILE, install_site, plan_install, read_manifest
from medflare.sites.site_profiles import available_profiles, resolve_profile

__all__ = ["add_site_parser", "run_site_command", "format_profiles", "format_site"]


def add_site_parser(sub) -> None:
    site = sub.add_parser("site", help="install a site profile into a FLARE client (or the server) and inspect it")
    site_sub = site.add_subparsers(dest="action", required=True)
    site_sub.add_parser("profiles", help="list the profiles that can be installed")
    install = site_sub.add_parser(
        "install", help="check and install privacy.json, resources.json and the data location into WORKSPACE/local"
    )
    install.add_argument("--workspace", required=True, help="the FLARE client's (or server's) workspace folder")
    install.add_argument("--profile", default=None, help="profile name (see `medflare site profiles`) or a profile folder")
    install.add_argument(
        "--data",
        action="append",
        default=None,
        metavar="[NAME=]PATH",
        help="a data set of the site: its data configuration ({data_root, datalist}), a datalist JSON or an outcome "
        "table; repeat for each data set. NAME defaults to the kind found: segmentation, outcome_image (a table "
        "with images) or outcome_table",
    )
    install.add_argument(
        "--data-root", default=None, help="folder a datalist's paths are relative to (default: its folder); one --data only"
    )
    install.add_argument("--gpus", type=int, default=None, help="GPUs the site offers to jobs (default: all found)")
    install.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU (default: the smallest GPU's)")
    install.add_argument("--dry-run", action="store_true", help="check everything and print the plan; write nothing")
    show = site_sub.add_parser("show", help="what medflare installed in a workspace, and whether it was edited since")
    show.add_argument("--workspace", required=True)


def format_profiles() -> str:
    lines = []
    for name, folder in available_profiles().items():
        profile = resolve_profile(folder)
        lines.append(f"{name}  ({folder})")
        for scope in profile.privacy["scopes"]:
            marker = " (default)" if scope["name"] == profile.default_scope else ""
            filters = [f["path"].rsplit(".", 1)[-1] for f in scope.get("task_result_filters", [])] or ["none"]
            lines.append(f"  scope {scope['name']}{marker}: result filters {', '.join(filters)}")
            description = scope.get("properties", {}).get("description")
            if description:
                lines.append(f"    {description}")
    return "\n".join(lines) if lines else "no profiles found"


def _data_lines(path: str) -> list[str]:
    """One line per data set of the site's data configuration (a flat file serves every job)."""
    try:
        datasets = read_site_datasets(path)
    except DataListError as e:  # a hand-edited file is what the admin most needs to see here
        return [f"data: UNREADABLE: {e}"]
    return [
        f"data set {config.dataset}: datalist {config.datalist}, images under {config.data_root}"
        if config.dataset is not None
        else f"data (flat file, every job): datalist {config.datalist}, images under {config.data_root}"
        for config in datasets
    ]


def format_site(workspace: str) -> str:
    manifest = read_manifest(workspace)
    local = os.path.join(os.path.abspath(workspace), "local")
    lines = [f"workspace {os.path.abspath(workspace)} ({manifest.get('role')})"]
    if manifest.get("profile"):
        lines.append(f"profile: {manifest['profile']} from {manifest.get('profile_folder')}")
    lines.append(f"installed: {manifest.get('installed_at')} by medflare {manifest.get('medflare_version')}")
    if manifest["modified"]:
        lines.append(f"EDITED SINCE INSTALL: {', '.join(manifest['modified'])}")
    else:
        lines.append("installed files unchanged since install")
    privacy_path = os.path.join(local, "privacy.json")
    if os.path.isfile(privacy_path):
        with open(privacy_path) as f:
            privacy = json.load(f)
        lines.append(f"scopes: {', '.join(s['name'] for s in privacy['scopes'])}; default {privacy['default_scope']}")
    data_path = os.path.join(local, DATA_CONFIG_FILE)
    if os.path.isfile(data_path):
        lines += _data_lines(data_path)
    if manifest.get("role") == "client":
        try:
            lines += ["", format_budget(ledger_path(workspace))]
        except LedgerError as e:  # a blocked ledger is what the admin most needs to see here
            lines += ["", f"privacy budget: BLOCKED: {e}"]
    return "\n".join(lines)


def run_site_command(args) -> int:
    if args.action == "profiles":
        print(format_profiles())
        return 0
    if args.action == "show":
        print(format_site(args.workspace))
        return 0
    kwargs = dict(data_root=args.data_root, gpus=args.gpus, gpu_memory_gib=args.gpu_memory)
    if args.dry_run:
        plan = plan_install(args.workspace, args.profile, args.data, **kwargs)
        print("\n".join(plan.summary))
        print(f"dry run: would write {', '.join(plan.files)} into {os.path.join(plan.workspace, 'local')}")
        return 0
    plan = install_site(args.workspace, args.profile, args.data, **kwargs)
    print("\n".join(plan.summary))
    print(f"installed {', '.join(plan.files)} into {os.path.join(plan.workspace, 'local')}")
    if plan.role == "client":
        print("restart the FLARE client: it reads privacy.json and resources.json when it starts")
    return 0
