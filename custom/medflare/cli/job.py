"""``medflare job check``: what the server and a site would refuse, found before submission.

    medflare job check JOB_DIR [--profile NAME | --site-workspace DIR]
"""

from __future__ import annotations

__all__ = ["add_job_parser", "run_job_command"]


def add_job_parser(sub) -> None:
    job = sub.add_parser("job", help="check a job folder before it is submitted")
    job_sub = job.add_subparsers(dest="action", required=True)
    check = job_sub.add_parser(
        "check", help="build every component as the server and sites would, against a site's policy and budget"
    )
    check.add_argument("job", help="the job folder, e.g. jobs/cxr_emr_fedavg")
    which = check.add_mutually_exclusive_group()
    which.add_argument("--profile", default=None, help="a site profile to check against (see `medflare site profiles`)")
    which.add_argument("--site-workspace", default=None, help="a FLARE client workspace with an installed privacy.json")


def run_job_command(args) -> int:
    from medflare.jobs.job_check import check_job

    result = check_job(args.job, profile=args.profile, site_workspace=args.site_workspace)
    if result.ok:
        print(f"job {args.job}: OK ({'; '.join(result.checked)})")
        return 0
    print(f"job {args.job}: {len(result.problems)} problem(s); the job would fail at the server or a site:")
    for problem in result.problems:
        print(f"  - {problem}")
    return 2
