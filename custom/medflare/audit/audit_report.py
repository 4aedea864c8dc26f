"""The audit's report: ``report.json``, ``report.txt`` (the table) and ``montage.png``.

The montage has one row per attacked patient: the true image, the prior baseline (the mean
image of the site's other cases) and the worst-case reconstruction under each audited scope; a
blocked scope's cell says so.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import numpy as np

__all__ = ["write_report", "write_json", "format_table", "finite"]


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(report: dict) -> str:
    """The per-scope table a site admin reads first."""
    lines = [
        f"medflare audit of job {report['job']} at site {report['site']} ({report['site_cases']} cases; "
        f"{report['options']['iterations']} iterations x {report['options']['restarts']} restart(s))",
        "",
        "setting        scope                  released  SSIM  prior  PSNR  prior  beats  re-id (chance)  labels (const)  BN exact  eps     utility (cost)",
    ]
    for row in report["rows"]:
        inv = row.get("inversion", {})
        labels = row.get("labels", {})
        bn = row.get("batchnorm_statistics") or {}
        eps = (row.get("epsilon") or {}).get("epsilon_release") or (row.get("epsilon") or {}).get("epsilon_run")
        utility = row.get("utility") or {}
        reid = f"{_number(inv.get('reidentification_rate'), 2)} ({_number(inv.get('chance'), 2)})" if "chance" in inv else "-"
        lab = f"{_number(labels.get('accuracy'), 2)} ({_number(labels.get('baseline_accuracy'), 2)})"
        util = f"{_number(utility.get('metric'))} ({_number(utility.get('cost'))})" if utility else "-"
        lines.append(
            f"{row['setting']:<14} {('*' if row.get('job_runs_under_it') else '') + row['scope'][:21]:<22} {'yes' if row['released'] else 'NO':<9} "
            f"{_number(inv.get('mean_ssim')):<5} {_number(inv.get('mean_prior_ssim')):<6} "
            f"{_number(inv.get('mean_psnr'), 1):<5} {_number(inv.get('mean_prior_psnr'), 1):<6} "
            f"{_number(inv.get('beat_prior_fraction'), 2):<6} {reid:<15} {lab:<15} "
            f"{_number(bn.get('exact_fraction'), 2) if bn.get('entries') else '-':<9} {_number(eps, 2):<7} {util}"
        )
        lines.append(f"  {row['verdict']}" + (f" -- {row['blocked']}" if row.get("blocked") else ""))
    lines += ["", "* the scope this job runs under at this site (its meta.json scope, else the site's default)"]
    lines += ["", f"threat model: {report['threat_model']}", f"not covered: {report['not_covered']}"]
    return "\n".join(lines) + "\n"


def _montage(path: str, report: dict, reconstructions: Mapping, truths: Mapping, case_ids: Mapping) -> None:
    from medflare.optional_dependencies import require

    matplotlib = require("matplotlib", "the audit's montage of reconstructions")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scopes = []
    for row in report["rows"]:
        if row["setting"] == "worst_case" and row["scope"] not in scopes:
            scopes.append(row["scope"])
    cases = sorted(truths)
    if not cases or not scopes:
        return
    fig, axes = plt.subplots(len(cases), 2 + len(scopes), figsize=(1.7 * (2 + len(scopes)), 1.8 * len(cases)), squeeze=False)
    for r, index in enumerate(cases):
        true_image, prior_image = truths[index]
        cells = [("true " + str(case_ids[index]), true_image), ("prior (mean of others)", prior_image)] + [(scope, reconstructions.get((scope, index))) for scope in scopes]
        for c, (title, image) in enumerate(cells):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if image is None:
                ax.text(0.5, 0.5, "nothing\nreleased", ha="center", va="center", fontsize=8)
            else:
                ax.imshow(np.asarray(image), cmap="gray", vmin=0.0, vmax=1.0)
            if r == 0 or c == 0:
                ax.set_title(title[:22], fontsize=7)
    fig.suptitle(f"worst case (one step, one patient): {report['job']} at {report['site']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    from PIL import Image

    with Image.open(path) as image:  # greyscale: half the bytes of matplotlib's RGBA, nothing lost
        grey = image.convert("L")
    grey.save(path, optimize=True)


def finite(value):
    """``value`` with NaN and infinities as null (strict JSON) and numpy scalars as numbers."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(report: dict, out_dir: str) -> None:
    """``report.json``: strict JSON (a NaN score, e.g. an undefined AUC, is null)."""
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(finite(report), f, indent=2, allow_nan=False)
        f.write("\n")


def write_report(report: dict, out_dir: str, reconstructions: Mapping, truths: Mapping, case_ids: Mapping) -> None:
    """``truths``: case index -> (true image, prior image). Write ``report.json``, ``report.txt`` and ``montage.png`` (when images were attacked)."""
    os.makedirs(out_dir, exist_ok=True)
    if truths:
        report["montage"] = os.path.join(out_dir, "montage.png")
        _montage(report["montage"], report, reconstructions, truths, case_ids)
    write_json(report, out_dir)
    with open(os.path.join(out_dir, "report.txt"), "w") as f:
        f.write(format_table(report))
