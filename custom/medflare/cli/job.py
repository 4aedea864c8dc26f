"""``medflare job``: the shipped jobs, exported from their study definitions, and what the
server and a site would refuse, found before submission.

    medflare job list
    medflare job export (NAME ... | --all) --out DIR
    medflare job check JOB_DIR [--profile NAME | --site-workspace DIR]
    medflare job simulator-workspace WS [--data TEMPLATE]
"""

from __future__ import annotations

__all__ = ["add_job_parser", "run_job_command"]


def add_job_parser(sub) -> None:
    job = sub.add_parser("job", help="the shipped jobs: list, export, check before submitting")
    job_sub = job.add_subparsers(dest="action", required=True)
    job_sub.add_parser("list", help="the jobs medflare ships (each exported from its study definition)")
    export = job_sub.add_parser("export", help="write shipped job folders, as `nvflare job submit -j` takes them")
    export.add_argument("names", nargs="*", help="shipped job names (see `medflare job list`)")
    export.add_argument("--all", action="store_true", help="every shipped job")
    export.add_argument("--out", required=True, help="folder to write <name>/ into")
    sim = job_sub.add_parser(
        "simulator-workspace",
        help="make a workspace ready for the stock `nvflare simulator` (medflare's allow-list, a site budget)",
    )
    sim.add_argument("workspace", help="the folder you will pass to `nvflare simulator -w`")
    sim.add_argument("--data", default=None, help="each site's data_config.json, with {site_name} for the site")
    check = job_sub.add_parser(
        "check", help="build every component as the server and sites would, against a site's policy and budget"
    )
    check.add_argument("job", help="the job folder, e.g. jobs/cxr_emr_fedavg")
    which = check.add_mutually_exclusive_group()
    which.add_argument("--profile", default=None, help="a site profile to check against (see `medflare site profiles`)")
    which.add_argument("--site-workspace", default=None, help="a FLARE client workspace with an installed privacy.json")


def run_job_command(args) -> int:
    if args.action == "list":
        return _list()
    if args.action == "export":
        return _export(args)
    if args.action == "simulator-workspace":
        return _simulator_workspace(args)
    from medflare.jobs.job_check import check_job

    result = check_job(args.job, profile=args.profile, site_workspace=args.site_workspace)
    if result.ok:
        print(f"job {args.job}: OK ({'; '.join(result.checked)})")
        return 0
    print(f"job {args.job}: {len(result.problems)} problem(s); the job would fail at the server or a site:")
    for problem in result.problems:
        print(f"  - {problem}")
    return 2


def _list() -> int:
    from medflare.recipes.shipped_jobs import SHIPPED_JOBS

    for name, build in SHIPPED_JOBS.items():
        definition = build()
        scope = f", scope {definition.scope}" if definition.scope else ""
        print(f"{name}: {build.func.__name__}({', '.join(f'{k}={v!r}' for k, v in build.keywords.items())}), "
              f"min_clients {definition.min_clients}{scope}")
    return 0


def _export(args) -> int:
    from medflare.recipes.shipped_jobs import SHIPPED_JOBS

    if args.all == bool(args.names):
        raise ValueError("give shipped job names or --all (not both, not neither)")
    names = list(SHIPPED_JOBS) if args.all else args.names
    unknown = [n for n in names if n not in SHIPPED_JOBS]
    if unknown:
        raise ValueError(f"unknown job(s) {unknown}; shipped jobs: {', '.join(SHIPPED_JOBS)}")
    for name in names:
        print(SHIPPED_JOBS[name]().write(args.out))
    return 0


def _simulator_workspace(args) -> int:
    from medflare.recipes.recipe import prepare_simulation

    env = prepare_simulation(args.workspace, args.data)
    print(f"{args.workspace}: medflare's class allow-list in local/resources.json; the research profile's budget in local/")
    print("set these for `nvflare simulator` (each simulated site reads them as a real site reads its environment):")
    for key, value in env.items():
        print(f"export {key}={value}")
    return 0
