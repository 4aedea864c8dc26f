"""Reading a finished (or running) job's records and presenting them: progress lines, tables, plot.

Inputs are the files a job writes in its server run directory: ``medflare_metrics.jsonl``
(one line per round, see :mod:`medflare.reporting.round_metrics_writer`) and NVFlare's
``cross_site_val/cross_val_results.json`` (the final global-model evaluation).
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

__all__ = [
    "read_round_records",
    "read_global_eval",
    "format_round_line",
    "format_summary",
    "final_global_metrics",
    "plot_metrics_per_round",
    "metric_kind",
    "record_kind",
    "METRIC_COLUMNS",
]

#: the metrics shown per kind of job: (key, column label)
METRIC_COLUMNS = {
    "dice": (("dice_mean", "mean"), ("dice_tc", "TC"), ("dice_wt", "WT"), ("dice_et", "ET")),
    "outcome": (("auc", "AUC"), ("accuracy", "acc")),
}


def metric_kind(metrics: list[dict]) -> str:
    """``"outcome"`` when the metrics are AUC / accuracy, else ``"dice"``."""
    keys = {k for m in metrics for k in m}
    return "outcome" if not any(k.startswith("dice_") for k in keys) and keys & {"auc", "accuracy"} else "dice"


def record_kind(records: list[dict], global_eval: Optional[dict] = None) -> str:
    """:func:`metric_kind` of a job's round records and its final evaluation."""
    metrics = [r.get("global_model_metrics", {}) for r in records]
    metrics += [m for models in (global_eval or {}).values() for m in models.values()]
    return metric_kind(metrics)


def read_round_records(path: str) -> list[dict]:
    """All complete lines of a ``medflare_metrics.jsonl`` (a partly written last line is skipped)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def read_global_eval(run_dir: str) -> dict[str, dict[str, dict]]:
    """``{site: {model_name: metrics}}`` from NVFlare's cross-site results, or ``{}``."""
    path = os.path.join(run_dir, "cross_site_val", "cross_val_results.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return "-"


def format_round_line(record: dict, kind: Optional[str] = None) -> str:
    """One progress line: round, each site's training loss, the global model's Dice (or AUC and
    accuracy). ``kind`` (``"dice"`` or ``"outcome"``) names the job's metric when the record may
    not show it: sites under a DP scope withhold the scores it is read from."""
    sites = record.get("sites", {})
    losses = " ".join(f"{s}={_fmt(v.get('train_loss'))}" for s, v in sorted(sites.items()))
    g = record.get("global_model_metrics", {})
    if (kind or record_kind([record])) == "outcome":
        scores = f"global model AUC {_fmt(g.get('auc'))}, accuracy {_fmt(g.get('accuracy'))}"
    else:
        scores = (
            f"global model Dice mean {_fmt(g.get('dice_mean'))} "
            f"(TC {_fmt(g.get('dice_tc'))}, WT {_fmt(g.get('dice_wt'))}, ET {_fmt(g.get('dice_et'))})"
        )
    return f"round {record.get('round')}: train loss {losses} | {scores} | {_fmt(record.get('round_seconds'), 1)} s"


def _time_split(record: dict) -> tuple[float, float, float]:
    """(training, validation, other) seconds of a round; sites run in parallel, so the slowest site counts."""
    sites = record.get("sites", {}).values()
    train = max((v.get("train_seconds") or 0.0 for v in sites), default=0.0)
    val = max((v.get("validate_seconds") or 0.0 for v in sites), default=0.0)
    total = record.get("round_seconds") or 0.0
    return train, val, max(total - train - val, 0.0)


def format_summary(records: list[dict], global_eval: dict, wall_seconds: Optional[float] = None) -> str:
    """The closing table: the global model's metrics per round with the time split, then the
    server's models scored at every site (each site's own model too, in cross-site evaluation)."""
    kind = record_kind(records, global_eval)
    columns = METRIC_COLUMNS[kind]
    name = "Dice" if kind == "dice" else "AUC and accuracy"
    lines = ["", f"Global model {name} at the start of each round (weighted over sites' validation cases)"]
    header = f"{'round':>5} " + " ".join(f"{label:>6}" for _, label in columns)
    header += f" {'round s':>8} {'train s':>8} {'val s':>6} {'other s':>8}"
    lines += [header, "-" * len(header)]
    for r in records:
        g = r.get("global_model_metrics", {})
        train, val, other = _time_split(r)
        lines.append(
            f"{r.get('round'):>5} " + " ".join(f"{_fmt(g.get(key)):>6}" for key, _ in columns)
            + f" {_fmt(r.get('round_seconds'), 1):>8} {_fmt(train, 1):>8} {_fmt(val, 1):>6} {_fmt(other, 1):>8}"
        )
    if global_eval:
        lines += ["", f"Final evaluation at each site ({name}; SRV_ models are the server's)"]
        header = f"{'site':<10} {'model':<28} " + " ".join(f"{label:>6}" for _, label in columns)
        lines += [header, "-" * len(header)]
        for site in sorted(global_eval):
            for model, m in sorted(global_eval[site].items()):
                lines.append(f"{site:<10} {model:<28} " + " ".join(f"{_fmt(m.get(key)):>6}" for key, _ in columns))
    if wall_seconds is not None:
        lines += ["", f"wall time {wall_seconds:.0f} s"]
    return "\n".join(lines)


def final_global_metrics(global_eval: dict, model_name: str = "SRV_FL_global_model.pt") -> dict[str, float]:
    """Metrics of one server model in the final evaluation, averaged over sites weighted by their
    number of validation cases (as the per-round figures are)."""
    from medflare.reporting.round_metrics_writer import weighted_mean_metrics

    return weighted_mean_metrics({site: models[model_name] for site, models in global_eval.items() if model_name in models})


def plot_metrics_per_round(records: list[dict], global_eval: dict, path: str, title: str = "") -> str:
    """Save a PNG of the global model's Dice (mean and per region) or AUC and accuracy per
    round, with the final evaluation of the last global model as the last point; beside it, the
    same global model's main metric at each site (the site's own validation data), one thin line
    per site.

    Raises:
        MissingDependency: matplotlib is not installed (the ``demo`` extra).
    """
    from medflare.optional_dependencies import require

    matplotlib = require("matplotlib", "the per-round plot")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = record_kind(records, global_eval)
    styles = {
        "dice": (("dice_mean", "mean", "-o"), ("dice_tc", "tumour core", "--"), ("dice_wt", "whole tumour", "--"), ("dice_et", "enhancing tumour", "--")),
        "outcome": (("auc", "AUC", "-o"), ("accuracy", "accuracy", "--s")),
    }[kind]
    fig, (ax, per_site) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    rounds = [r["round"] for r in records]
    final = final_global_metrics(global_eval)
    for key, label, style in styles:
        xs = list(rounds)
        ys = [r.get("global_model_metrics", {}).get(key, math.nan) for r in records]
        if key in final:
            xs.append((rounds[-1] + 1) if rounds else 0)
            ys.append(final[key])
        ys = [math.nan if y is None else y for y in ys]
        ax.plot(xs, ys, style, label=label)
    ax.set_xlabel("round (global model after this many aggregations)")
    ax.set_ylabel("validation Dice" if kind == "dice" else "test AUC / accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title(title or "Global model per round")
    main_key, main_label, _ = styles[0]
    sites = sorted({s for r in records for s in (r.get("sites") or {})})
    for site in sites:
        ys = [((r.get("sites") or {}).get(site) or {}).get("global_model_metrics", {}).get(main_key) for r in records]
        per_site.plot(rounds, [math.nan if y is None else y for y in ys], "-", lw=1, marker=".", label=site)
    global_ys = [r.get("global_model_metrics", {}).get(main_key) for r in records]
    per_site.plot(rounds, [math.nan if y is None else y for y in global_ys], "k-o", lw=2, label=f"all sites ({main_label})")
    per_site.set_xlabel("round")
    per_site.set_title(f"{main_label} of the global model at each site")
    per_site.grid(alpha=0.3)
    per_site.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
