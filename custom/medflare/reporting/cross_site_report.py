"""EXAM's measures from NVFlare's cross-site model evaluation: own-site performance and generalizability.

Input is the ``cross_val_results.json`` that NVFlare's ``ValidationJsonGenerator`` writes during the
``CrossSiteModelEval`` workflow, in the server's run folder under ``cross_site_val/``::

    {data_client: {model_owner: {metric_name: value, ...}, ...}, ...}

``data_client`` is the site whose test data was used. ``model_owner`` is either a site (its local model,
returned by the ``submit_model`` task) or a server model, which ``CrossSiteModelEval._locate_server_models``
names ``"SRV_" + name`` for each name its model locator lists; with ``PTFileModelLocator`` over
``PTFileModelPersistor`` these are ``SRV_FL_global_model.pt`` (the final global model) and, when the
persistor kept one, ``SRV_best_FL_global_model.pt``. Pure functions; NVFlare is not imported.
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import numbers
import os
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = [
    "ReportError",
    "SiteMeasures",
    "ExamMeasures",
    "RESULTS_FILE_NAME",
    "SERVER_MODEL_PREFIX",
    "FINAL_GLOBAL_MODEL",
    "BEST_GLOBAL_MODEL",
    "find_cross_site_results",
    "load_cross_site_results",
    "exam_measures",
    "format_report",
    "write_report",
]

#: ``ValidationJsonGenerator``'s default ``json_file_name``.
RESULTS_FILE_NAME = "cross_val_results.json"
#: Prefix ``CrossSiteModelEval`` puts on every server model's name.
SERVER_MODEL_PREFIX = "SRV_"
#: ``"SRV_" +`` NVFlare 2.9's ``DefaultCheckpointFileName.GLOBAL_MODEL`` / ``.BEST_GLOBAL_MODEL``, the
#: ``PTFileModelPersistor``'s default file names (a job may rename them: then pass the key).
FINAL_GLOBAL_MODEL = SERVER_MODEL_PREFIX + "FL_global_model.pt"
BEST_GLOBAL_MODEL = SERVER_MODEL_PREFIX + "best_FL_global_model.pt"
_ALIASES = {"best": BEST_GLOBAL_MODEL, "final": FINAL_GLOBAL_MODEL}
#: Keys of a result that count cases rather than measure anything.
_NOT_METRICS = frozenset({"num_cases"})


class ReportError(ValueError):
    """The cross-site results are missing, ambiguous or malformed, or the request does not fit them."""


@dataclass(frozen=True)
class SiteMeasures:
    """EXAM's four measures for one site ``i`` (or their means over sites, with ``site="mean"``)."""

    site: str
    local_own: float
    global_own: float
    local_generalizability: float
    global_generalizability: float


@dataclass(frozen=True, eq=False)
class ExamMeasures:
    """Everything :func:`exam_measures` computed; :func:`format_report` and :func:`write_report` present it.

    Attributes:
        metric: the metric ``M`` used, e.g. ``"auc"``.
        global_model: the server model key used as ``G``, e.g. ``"SRV_best_FL_global_model.pt"``.
        sites: the sites, in natural order; also the matrix's columns (their test data).
        models: the matrix's rows: each site's local model (named by its site), then every server model.
        matrix: ``M(model, data site)``, shape ``(len(models), len(sites))``, NaN where absent.
        per_site: one :class:`SiteMeasures` per site, NaN where it cannot be computed.
        means: the means over sites (paired, see :func:`exam_measures`).
        own_sites_in_mean / generalizability_sites_in_mean: the sites each pair of means is over.
        own_improvement_percent / generalizability_improvement_percent: relative improvements in %.
        notes: what was missing or left out, in words; empty when the matrix is complete and finite.
        source: the results file, when known.
    """

    metric: str
    global_model: str
    sites: tuple[str, ...]
    models: tuple[str, ...]
    matrix: np.ndarray
    per_site: tuple[SiteMeasures, ...]
    means: SiteMeasures
    own_sites_in_mean: tuple[str, ...]
    generalizability_sites_in_mean: tuple[str, ...]
    own_improvement_percent: float
    generalizability_improvement_percent: float
    notes: tuple[str, ...]
    source: Optional[str] = None


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def find_cross_site_results(path: str) -> str:
    """The ``cross_val_results.json`` at ``path``: the file itself, or the only one anywhere under a folder.

    Raises:
        ReportError: ``path`` does not exist, a folder holds none, or holds several (they are listed).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file or folder path, got {path!r}")
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise ReportError(f"path {path!r} does not exist")
    found = sorted(
        os.path.join(root, RESULTS_FILE_NAME) for root, _, files in os.walk(path) if RESULTS_FILE_NAME in files
    )
    if not found:
        raise ReportError(
            f"no {RESULTS_FILE_NAME} under {path}: NVFlare writes it in the server's run folder "
            f"(cross_site_val/) when the job ran CrossSiteModelEval with the ValidationJsonGenerator widget"
        )
    if len(found) > 1:
        listing = "\n  ".join(found)
        raise ReportError(f"{len(found)} {RESULTS_FILE_NAME} files under {path}; pass one of them:\n  {listing}")
    return found[0]


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _checked(results, source: str) -> dict:
    """A copy of ``results`` with ``null`` metric values as NaN, after checking shape and numbers."""
    if not isinstance(results, dict) or not results:
        shape = "{data_client: {model_owner: {metric: value}}}"
        raise ReportError(f"{source}: expected a non-empty {shape}, got {results!r:.200}")
    out = {}
    for data_client, by_model in results.items():
        if not isinstance(by_model, dict):
            raise ReportError(f"{source}: results of data client {data_client!r} are {by_model!r:.100}, not a mapping")
        out[data_client] = {}
        for model_owner, metrics in by_model.items():
            if not isinstance(metrics, dict):
                raise ReportError(
                    f"{source}: model {model_owner!r} on data client {data_client!r} is {metrics!r:.100}, "
                    "not a metric mapping"
                )
            for name, value in metrics.items():
                if value is not None and not _is_number(value):
                    raise ReportError(
                        f"{source}: {name!r} of model {model_owner!r} on data client {data_client!r} "
                        f"is {value!r:.100}, not a number"
                    )
            out[data_client][model_owner] = {k: math.nan if v is None else v for k, v in metrics.items()}
    return out


def load_cross_site_results(path: str) -> dict:
    """Read and check NVFlare's cross-site results (``path``: the file, or a folder holding exactly one).

    Returns:
        ``{data_client: {model_owner: {metric: value}}}``, JSON ``NaN`` and ``null`` both as ``float('nan')``.

    Raises:
        ReportError: see :func:`find_cross_site_results`; the file is not JSON, or not of that shape, or a
            value is not a number.
    """
    path = find_cross_site_results(path)
    try:
        with open(path) as f:
            results = json.load(f)
    except ValueError as e:
        raise ReportError(f"{path} is not valid JSON: {e}") from e
    return _checked(results, path)


def _resolve_global_model(choice: Optional[str], server_models: list[str], owners: list[str]) -> str:
    if choice is not None and (not isinstance(choice, str) or not choice.strip()):
        raise ReportError(f"global_model must be 'best', 'final' or a server model key, got {choice!r}")
    if not server_models:
        raise ReportError(
            f"no server (global) model in the results; model owners are {owners}. CrossSiteModelEval names "
            f"server models {SERVER_MODEL_PREFIX}<name>, e.g. {FINAL_GLOBAL_MODEL}"
        )
    if choice is None:
        for key in (BEST_GLOBAL_MODEL, FINAL_GLOBAL_MODEL):
            if key in server_models:
                return key
        if len(server_models) == 1:
            return server_models[0]
        raise ReportError(f"server models {server_models} include neither best nor final: pass global_model")
    key = _ALIASES.get(choice.strip().lower(), choice)
    for candidate in (key, SERVER_MODEL_PREFIX + key):
        if candidate in server_models:
            return candidate
    raise ReportError(f"global_model {choice!r} is not among the server models evaluated: {server_models}")


def _check_metric(metric, results: dict) -> None:
    if not isinstance(metric, str) or not metric:
        raise ReportError(f"metric must be a metric name such as 'auc', got {metric!r}")
    available = sorted({k for by_model in results.values() for m in by_model.values() for k in m} - _NOT_METRICS)
    if metric in available:
        return
    if metric in _NOT_METRICS:
        raise ReportError(f"metric {metric!r} counts cases, it is no metric; metrics available: {available}")
    lower = {name.lower(): name for name in available}
    close = difflib.get_close_matches(metric.lower(), list(lower), n=1)
    close = [lower[c] for c in close]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ReportError(f"metric {metric!r} is in none of the results{hint}; metrics available: {available}")


def _cell_label(model: str, site: str) -> str:
    owner = model if model.startswith(SERVER_MODEL_PREFIX) else f"{model}'s local model"
    return f"{owner} on {site}"


def _paired_mean(pairs: dict[str, tuple[float, float]]) -> tuple[float, float, tuple[str, ...]]:
    """Means of both members over the keys where both are finite, and those keys."""
    kept = tuple(k for k, (a, b) in pairs.items() if math.isfinite(a) and math.isfinite(b))
    if not kept:
        return math.nan, math.nan, kept
    return (
        float(np.mean([pairs[k][0] for k in kept])),
        float(np.mean([pairs[k][1] for k in kept])),
        kept,
    )


def _relative_improvement(global_mean: float, local_mean: float) -> float:
    if not (math.isfinite(global_mean) and math.isfinite(local_mean)) or local_mean == 0:
        return math.nan
    return (global_mean - local_mean) / local_mean * 100.0


def exam_measures(results: dict, metric: str = "auc", global_model: Optional[str] = None) -> ExamMeasures:
    """EXAM's comparison of the global model ``G`` with each site's local model ``L_i``.

    Args:
        results: ``{data_client: {model_owner: {metric: value}}}`` (see :func:`load_cross_site_results`).
        metric: the metric ``M`` to compare, e.g. ``"auc"`` or ``"accuracy"``; higher must be better.
        global_model: the server model to use as ``G``: ``"best"``, ``"final"`` or a model-owner key
            (``"SRV_"`` may be left off). Default: the best global model if evaluated, else the final one.

    Returns:
        :class:`ExamMeasures`.

    Raises:
        ReportError: malformed results, ``metric`` absent from every result (the available ones are
            listed), or ``global_model`` not among the server models.

    Notes:
        With ``D_i`` site ``i``'s test data, ``N`` sites, and ``M(model, D)`` the metric, per site ``i``::

            local_own_i               = M(L_i, D_i)
            global_own_i              = M(G,   D_i)
            local_generalizability_i  = mean_{j in J_i} M(L_i, D_j)
            global_generalizability_i = mean_{j in J_i} M(G,   D_j)

        where ``J_i`` holds the other sites ``j != i`` at which both ``M(L_i, D_j)`` and ``M(G, D_j)`` are
        finite, so both models are scored on the same data. The means over sites are paired the same way:
        each pair of means (own, generalizability) is over the sites where both members are finite. The
        relative improvements are ratios of those means::

            improvement_% = (mean_global - mean_local) / mean_local * 100

        EXAM [1] reports +16% AUC on each site's own data and +38% generalizability; its Extended Data
        Fig. 1 shows the same ratio of means (0.760 -> 0.899 is +18%; 0.669 -> 0.899 is +34%). With a
        complete matrix, ``mean_i global_generalizability_i = mean_i global_own_i`` (each ``D_j`` enters
        ``N - 1`` of the inner means with weight ``1 / (N - 1)``), which is why [1] quotes one global value
        for both. Sites are the data clients and the sites that submitted a local model; a site in only
        one role, a missing cell or a NaN (e.g. AUC on a test set with one class) gives NaN where it is
        needed and a line in ``notes``, never a silently different average.

        References:
            [1] I. Dayan et al., "Federated learning for predicting clinical outcomes in patients with
                COVID-19", Nature Medicine 27, 1735-1743 (2021), doi:10.1038/s41591-021-01506-3.
    """
    results = _checked(results, "results")
    _check_metric(metric, results)
    owners = sorted({owner for by_model in results.values() for owner in by_model}, key=_natural_key)
    server_models = [o for o in owners if o.startswith(SERVER_MODEL_PREFIX)]
    global_key = _resolve_global_model(global_model, server_models, owners)
    local_owners = [o for o in owners if not o.startswith(SERVER_MODEL_PREFIX)]
    sites = tuple(sorted(set(results) | set(local_owners), key=_natural_key))
    models = tuple([s for s in sites if s in local_owners] + server_models)

    notes: list[str] = []
    for site in sites:
        if site not in local_owners:
            notes.append(f"{site} has no local model in the results (never a model owner): its local measures are n/a")
        if site not in results:
            notes.append(f"{site} has no results on its test data (never a data client): its own-data measures are n/a")
    matrix = np.full((len(models), len(sites)), math.nan)
    missing, non_finite = [], []
    for r, model in enumerate(models):
        for c, site in enumerate(sites):
            value = results.get(site, {}).get(model, {}).get(metric)
            if value is None:
                if site in results:
                    missing.append(_cell_label(model, site))
                continue
            matrix[r, c] = float(value)
            if not math.isfinite(value):
                non_finite.append(_cell_label(model, site))
    matrix.setflags(write=False)
    if missing:
        notes.append(f"no {metric} for: {'; '.join(missing)}")
    if non_finite:
        notes.append(f"{metric} is NaN or infinite (e.g. a test set with one class) for: {'; '.join(non_finite)}")

    def cell(model: str, site: str) -> float:
        return float(matrix[models.index(model), sites.index(site)]) if model in models else math.nan

    per_site = []
    for site in sites:
        others = {j: (cell(site, j), cell(global_key, j)) for j in sites if j != site}
        local_gen, global_gen, kept = _paired_mean(others)
        if len(kept) < len(others) and site in local_owners:
            left_out = [j for j in others if j not in kept]
            notes.append(
                f"{site}: generalizability over {', '.join(kept) or 'no site'}; left out {', '.join(left_out)} "
                f"(no finite {metric} for its local model or {global_key})"
            )
        per_site.append(SiteMeasures(site, cell(site, site), cell(global_key, site), local_gen, global_gen))

    local_own, global_own, own_sites = _paired_mean({m.site: (m.local_own, m.global_own) for m in per_site})
    local_gen, global_gen, gen_sites = _paired_mean(
        {m.site: (m.local_generalizability, m.global_generalizability) for m in per_site}
    )
    for label, kept in (("own-data", own_sites), ("generalizability", gen_sites)):
        if len(kept) < len(sites):
            left_out = [s for s in sites if s not in kept]
            notes.append(
                f"means of the {label} measures over {len(kept)} of {len(sites)} sites; "
                f"left out {', '.join(left_out)} (local or global value n/a)"
            )
    own_improvement = _relative_improvement(global_own, local_own)
    gen_improvement = _relative_improvement(global_gen, local_gen)
    if not (math.isfinite(own_improvement) and math.isfinite(gen_improvement)):
        notes.append("a relative improvement is n/a: its local mean is n/a or 0")
    return ExamMeasures(
        metric=metric,
        global_model=global_key,
        sites=sites,
        models=models,
        matrix=matrix,
        per_site=tuple(per_site),
        means=SiteMeasures("mean", local_own, global_own, local_gen, global_gen),
        own_sites_in_mean=own_sites,
        generalizability_sites_in_mean=gen_sites,
        own_improvement_percent=own_improvement,
        generalizability_improvement_percent=gen_improvement,
        notes=tuple(notes),
    )


_COLUMNS = ("local own", "global own", "local generalizability", "global generalizability")


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def _percent(value: float) -> str:
    return f"{value:+.1f}%" if math.isfinite(value) else "n/a"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[k])) for r in [header] + rows) for k in range(len(header))]

    def line(cells):
        padded = (c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if k else "-") for k, w in enumerate(widths)) + "|"
    return [line(header), rule] + [line(r) for r in rows]


def _model_label(measures: ExamMeasures, model: str) -> str:
    if not model.startswith(SERVER_MODEL_PREFIX):
        return f"{model} (local)"
    return f"{model} (global, used)" if model == measures.global_model else f"{model} (global)"


def _global_name(key: str) -> str:
    short = {v: k for k, v in _ALIASES.items()}.get(key)
    return f"{key} ({short} global model)" if short else key


def format_report(measures: ExamMeasures) -> str:
    """Markdown: EXAM's measures per site and their means, the relative improvements, the full matrix, notes."""
    m = measures
    lines = [f"# EXAM measures from cross-site evaluation ({m.metric})", ""]
    if m.source:
        lines += [f"source: {m.source}", ""]
    rows = [
        [s.site, _fmt(s.local_own), _fmt(s.global_own), _fmt(s.local_generalizability), _fmt(s.global_generalizability)]
        for s in m.per_site + (m.means,)
    ]
    lines += _table(["site", *_COLUMNS], rows)
    lines += [
        "",
        f"global vs local model, own data: {_percent(m.own_improvement_percent)} "
        f"(mean over {len(m.own_sites_in_mean)} of {len(m.sites)} sites; EXAM: +16% AUC)",
        f"global vs local model, generalizability: {_percent(m.generalizability_improvement_percent)} "
        f"(mean over {len(m.generalizability_sites_in_mean)} of {len(m.sites)} sites; EXAM: +38%)",
        f"metric: {m.metric}; global model: {_global_name(m.global_model)}",
        "own = M(model, D_i); generalizability = mean over the other sites j of M(model, D_j), "
        "local and global model on the same j (Dayan et al. 2021, Nat Med 27:1735)",
        "",
        f"## {m.metric} of each model (rows) on each site's test data (columns)",
        "",
    ]
    lines += _table(
        ["model", *m.sites],
        [[_model_label(m, model), *(_fmt(v) for v in m.matrix[r])] for r, model in enumerate(m.models)],
    )
    if m.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in m.notes]
    return "\n".join(lines)


def _none_for_nan(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _none_for_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_none_for_nan(v) for v in value]
    return value


def _as_json(m: ExamMeasures) -> dict:
    def site(s: SiteMeasures) -> dict:
        return {"site": s.site, **{c.replace(" ", "_"): getattr(s, c.replace(" ", "_")) for c in _COLUMNS}}

    return _none_for_nan(
        {
            "metric": m.metric,
            "global_model": m.global_model,
            "source": m.source,
            "sites": list(m.sites),
            "models": list(m.models),
            "matrix": m.matrix.tolist(),
            "per_site": [site(s) for s in m.per_site],
            "means": site(m.means),
            "own_sites_in_mean": list(m.own_sites_in_mean),
            "generalizability_sites_in_mean": list(m.generalizability_sites_in_mean),
            "own_improvement_percent": m.own_improvement_percent,
            "generalizability_improvement_percent": m.generalizability_improvement_percent,
            "notes": list(m.notes),
            "reference": "Dayan et al., Nature Medicine 27, 1735-1743 (2021), doi:10.1038/s41591-021-01506-3",
        }
    )


def _plot_heatmap(m: ExamMeasures, path: str) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError as e:  # pragma: no cover - matplotlib is a dependency of medflare
        raise ImportError("the cross-site heatmap needs matplotlib: pip install matplotlib") from e
    import matplotlib

    rows, cols = m.matrix.shape
    finite = m.matrix[np.isfinite(m.matrix)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    norm = Normalize(low, high)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    fig = Figure(figsize=(max(5.0, 1.0 * cols + 4.0), max(3.0, 0.5 * rows + 1.8)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(m.matrix), cmap=cmap, norm=norm, aspect="auto")
    fig.colorbar(image, ax=ax, label=m.metric)
    for r in range(rows):
        for c in range(cols):
            value = m.matrix[r, c]
            shade = cmap(norm(value)) if math.isfinite(value) else (0.8, 0.8, 0.8, 1.0)
            dark = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] < 0.5
            ax.text(c, r, _fmt(value, 2), ha="center", va="center", color="white" if dark else "black", fontsize=9)
        if m.models[r] in m.sites:  # a local model's own test data, EXAM's "local own"
            ax.add_patch(Rectangle((m.sites.index(m.models[r]) - 0.5, r - 0.5), 1, 1, fill=False, lw=2, ec="red"))
    n_local = sum(not model.startswith(SERVER_MODEL_PREFIX) for model in m.models)
    ax.axhline(n_local - 0.5, color="black", lw=1.5)
    ax.set_xticks(range(cols), m.sites)
    ax.set_yticks(range(rows), [_model_label(m, model) for model in m.models])
    ax.set_xlabel("test data of site")
    ax.set_ylabel("model")
    ax.set_title(f"Cross-site {m.metric}\n(red box: a local model on its own site's test data)", fontsize=10)
    fig.savefig(path, dpi=100)


def write_report(measures: ExamMeasures, out_dir: str) -> dict[str, str]:
    """Write ``exam_report.md``, ``exam_report.json`` (NaN as null), ``exam_report.csv`` and the heatmap
    ``cross_site_<metric>.png`` into ``out_dir`` (created if needed).

    Returns:
        ``{"md": path, "json": path, "csv": path, "png": path}`` (no ``"png"`` without matplotlib,
        :mod:`medflare.optional_dependencies`).
    """
    os.makedirs(out_dir, exist_ok=True)
    safe_metric = re.sub(r"[^A-Za-z0-9_.-]", "_", measures.metric)
    paths = {
        "md": os.path.join(out_dir, "exam_report.md"),
        "json": os.path.join(out_dir, "exam_report.json"),
        "csv": os.path.join(out_dir, "exam_report.csv"),
        "png": os.path.join(out_dir, f"cross_site_{safe_metric}.png"),
    }
    with open(paths["md"], "w") as f:
        f.write(format_report(measures) + "\n")
    with open(paths["json"], "w") as f:
        json.dump(_as_json(measures), f, indent=2, allow_nan=False)
        f.write("\n")
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["site", *(c.replace(" ", "_") for c in _COLUMNS)])
        for s in measures.per_site + (measures.means,):
            values = (s.local_own, s.global_own, s.local_generalizability, s.global_generalizability)
            writer.writerow([s.site, *(f"{v:.6g}" if math.isfinite(v) else "" for v in values)])
    from medflare.optional_dependencies import available

    if available("matplotlib"):
        _plot_heatmap(measures, paths["png"])
    else:  # the tables are the report; the figure needs the demo extra
        del paths["png"]
    return paths
