"""The job folders medflare ships in ``jobs/``, each exported from its study definition.

:data:`SHIPPED_JOBS` names every shipped job and the study call that defines it;
:func:`export_shipped_jobs` writes them all. A folder in ``jobs/`` is never edited by hand:
change the study function or the options here, then rewrite the folders::

    python -m medflare.recipes.shipped_jobs [JOB_ROOT]    # JOB_ROOT defaults to jobs

A test exports every job and compares it byte for byte with ``jobs/``, so a hand edit, or a
definition changed without re-exporting, fails in CI.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Callable, Optional, Sequence

from medflare.recipes.brats_segmentation import brats_segmentation
from medflare.recipes.heart_disease import heart_disease
from medflare.recipes.job_definition import JobDefinition
from medflare.recipes.outcome_prediction import outcome_prediction

__all__ = ["SHIPPED_JOBS", "export_shipped_jobs", "main"]

#: every shipped job: its name and the zero-argument builder of its definition
SHIPPED_JOBS: dict[str, Callable[[], JobDefinition]] = {
    "brats_fedavg": partial(brats_segmentation, "brats_fedavg"),
    "brats_fedyogi": partial(brats_segmentation, "brats_fedyogi", aggregation="fedyogi"),
    "brats_percentile": partial(brats_segmentation, "brats_percentile", privacy="percentile"),
    "brats_gaussian_dp": partial(brats_segmentation, "brats_gaussian_dp", privacy="gaussian"),
    "brats_dpsgd": partial(brats_segmentation, "brats_dpsgd", privacy="dpsgd"),
    "brats_he": partial(brats_segmentation, "brats_he", privacy="he"),
    "cxr_emr_fedavg": partial(outcome_prediction, "cxr_emr_fedavg"),
    "cxr_emr_dpsgd": partial(outcome_prediction, "cxr_emr_dpsgd", privacy="dpsgd"),
    "heart_disease_fedavg": partial(heart_disease, "heart_disease_fedavg"),
    "heart_disease_fedyogi": partial(heart_disease, "heart_disease_fedyogi", aggregation="fedyogi"),
    "heart_disease_dpsgd": partial(heart_disease, "heart_disease_dpsgd", privacy="dpsgd"),
    "heart_disease_he": partial(heart_disease, "heart_disease_he", privacy="he"),
}


def export_shipped_jobs(job_root: str) -> list[str]:
    """Write every shipped job folder under ``job_root``; their paths, in :data:`SHIPPED_JOBS` order.

    Only each job's ``meta.json`` and app configs are rewritten; nothing else in ``job_root`` is
    touched or removed.
    """
    return [build().write(job_root) for build in SHIPPED_JOBS.values()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or any(a.startswith("-") for a in args):
        print("usage: python -m medflare.recipes.shipped_jobs [JOB_ROOT]", file=sys.stderr)
        return 2
    for path in export_shipped_jobs(args[0] if args else "jobs"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
