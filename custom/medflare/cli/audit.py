"""``medflare audit``: what the site's released update reveals about its patients, per scope.

    medflare audit --workspace SITE_DIR --job JOB_DIR [--scope NAME ... | --all-scopes]
                   [--cases N] [--attack inverting-gradients] [--iterations I] [--restarts R]
                   [--setting worst_case|as_configured] [--utility-rounds U] [--out DIR]

Run by the site admin at the site, on the site's own data; spends nothing from the site's
privacy budget, sends nothing, and writes only its report (see :mod:`medflare.audit.site_audit`).
"""

from __future__ import annotations

__all__ = ["add_audit_parser", "run_audit_command"]


#: as :data:`medflare.audit.site_audit.SETTINGS` and ``ATTACKS`` (kept here so that building the
#: parser imports neither torch nor NVFlare; a test checks they agree)
SETTINGS = ("worst_case", "as_configured")
ATTACKS = ("inverting-gradients",)


def add_audit_parser(sub) -> None:
    audit = sub.add_parser(
        "audit", help="attack the site's own update under each privacy scope: what would the server learn about its patients?"
    )
    audit.add_argument("--workspace", required=True, help="the FLARE client's workspace (local/privacy.json, the site's data)")
    audit.add_argument("--job", required=True, help="the job folder the site is asked to run, e.g. jobs/cxr_emr_fedavg")
    which = audit.add_mutually_exclusive_group()
    which.add_argument("--scope", action="append", default=None, help="a scope of the site's privacy.json (repeatable)")
    which.add_argument("--all-scopes", action="store_true", help="every scope of the site's privacy.json (the default)")
    audit.add_argument("--cases", type=int, default=5, help="patients attacked in the worst case (default 5)")
    audit.add_argument("--attack", choices=list(ATTACKS), default=ATTACKS[0])
    audit.add_argument("--iterations", type=int, default=300, help="inversion iterations per restart (default 300; the paper uses 4,800-24,000 on a GPU)")
    audit.add_argument("--restarts", type=int, default=1, help="inversion restarts (default 1)")
    audit.add_argument("--setting", action="append", choices=list(SETTINGS), default=None, help="worst_case and/or as_configured (default both)")
    audit.add_argument("--utility-rounds", type=int, default=3, help="rounds of the single-site utility run per scope (0: skip)")
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument("--device", default="auto", help="auto (the site's GPU when present), cpu, cuda or cuda:N")
    audit.add_argument("--out", default=None, help="report folder (default WORKSPACE/audit/JOB-TIME)")


def run_audit_command(args) -> int:
    from medflare.audit.audit_report import format_table
    from medflare.audit.site_audit import AuditOptions, run_audit

    options = AuditOptions(
        scopes=args.scope,
        cases=args.cases,
        settings=tuple(args.setting or SETTINGS),
        attack=args.attack,
        iterations=args.iterations,
        restarts=args.restarts,
        utility_rounds=args.utility_rounds,
        seed=args.seed,
        device=args.device,
    )
    report = run_audit(args.workspace, args.job, args.out, options)
    print(format_table(report), end="")
    print(f"report: {report['report_dir']}/report.json" + (f", montage {report['montage']}" if report.get("montage") else ""))
    return 0
