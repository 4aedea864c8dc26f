"""``medflare report``: EXAM's measures (own-site performance, generalizability) from a finished job.

    medflare report PATH [--metric auc] [--global-model best|final|KEY] [--out DIR]

PATH is NVFlare's ``cross_val_results.json`` or a folder holding exactly one (a ``medflare run``
workspace, a simulator workspace, a job result downloaded with the FLARE API). The computation lives
in :mod:`medflare.reporting.cross_site_report`.
"""

from __future__ import annotations

import dataclasses
import os

from medflare.reporting.cross_site_report import (
    RESULTS_FILE_NAME,
    exam_measures,
    find_cross_site_results,
    format_report,
    load_cross_site_results,
    write_report,
)

__all__ = ["add_report_parser", "run_report_command"]


def add_report_parser(sub) -> None:
    report = sub.add_parser(
        "report",
        help="EXAM's measures from cross-site evaluation: each site's local model vs the global model, "
        "on the site's own test data and on the other sites'",
    )
    report.add_argument(
        "path",
        help=f"{RESULTS_FILE_NAME}, or a folder searched recursively for exactly one "
        "(e.g. a `medflare run` workspace or a downloaded job result)",
    )
    report.add_argument("--metric", default="auc", help="metric to compare, higher is better (default auc)")
    report.add_argument(
        "--global-model",
        default=None,
        help="server model to compare with: best, final, or a key such as SRV_FL_global_model.pt "
        "(default: best if it was evaluated, else final)",
    )
    report.add_argument(
        "--out",
        default=None,
        help="folder for exam_report.md/.json/.csv and cross_site_METRIC.png "
        f"(default: the folder holding {RESULTS_FILE_NAME})",
    )


def run_report_command(args) -> int:
    path = find_cross_site_results(args.path)
    measures = exam_measures(load_cross_site_results(path), metric=args.metric, global_model=args.global_model)
    measures = dataclasses.replace(measures, source=path)
    print(format_report(measures))
    print()
    for kind, written in write_report(measures, args.out or os.path.dirname(path)).items():
        print(f"wrote {kind}: {written}")
    return 0
