"""``medflare prepare report OUT``: the QC summary of a preparation, and its intensity histograms.

Read from the manifest and the prepared files of ``OUT``; written into ``OUT/qc_report/``
(``intensity_histograms.json`` always, ``intensity_histograms.png`` when matplotlib, the demo
extra, is installed). Everything stays at the site: the report names cases and counts voxels
of the site's own data, and nothing here sends anything anywhere.

Histograms are per modality over the prepared cases: segmentation images over the brain (the
non-zero voxels), X-rays over every pixel scaled to [0, 1]. Bins: :data:`BINS` equal bins over
[-5, 5] for z-scored volumes, [0, 1] for X-rays, and the prepared data's own range otherwise;
values outside the range are counted in the end bins.
"""

from __future__ import annotations

import json
import os

import numpy as np

from medflare.preparation.manifest import MANIFEST_NAME, read_manifest

__all__ = ["BINS", "REPORT_FOLDER", "intensity_histograms", "qc_summary", "write_qc_report"]

BINS = 50
REPORT_FOLDER = "qc_report"


def _ranges(cases: list, index: str) -> list:
    values = [c[index] for c in cases if isinstance(c.get(index), list)]
    if not values:
        return []
    width = min(len(v) for v in values)
    return [[min(v[i] for v in values), max(v[i] for v in values)] for i in range(width)]


def qc_summary(manifest: dict) -> dict:
    """Counts (pass / fail per reason, warnings per reason), the failed cases with their reason
    codes, and the input and output shape and spacing ranges (``[[min, max] per axis]``) of the
    cases that passed."""
    passed = [c for c in manifest["cases"] if c.get("verdict") == "pass"]
    return {
        "name": manifest.get("name"),
        "version": manifest.get("version"),
        "parameters_hash": manifest.get("parameters_hash"),
        "counts": manifest.get("counts"),
        "failed": [{"case_id": c.get("case_id"), "codes": [r.get("code") for r in c.get("reasons", [])]} for c in manifest["cases"] if c.get("verdict") != "pass"],
        "shape_range": _ranges(passed, "shape"),
        "spacing_range": _ranges(passed, "spacing"),
        "output_shape_range": _ranges(passed, "output_shape"),
        "output_spacing_range": _ranges(passed, "output_spacing"),
    }


def _values(path: str) -> np.ndarray:
    if path.lower().endswith(".png"):
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image, dtype=np.float64)
            top = 255.0 if image.mode == "L" else 65535.0
        return (pixels / top).ravel()
    import nibabel as nib

    voxels = np.asanyarray(nib.load(path).dataobj).astype(np.float64).ravel()
    return voxels[voxels != 0]


def intensity_histograms(manifest: dict, root: str) -> dict:
    """``{role: {"edges": [...], "counts": [...]}}`` over the prepared images (labels left out)."""
    files: dict[str, list] = {}
    for case in manifest["cases"]:
        for output in case.get("outputs", []):
            if output.get("role") != "label":
                files.setdefault(output["role"], []).append(os.path.join(root, output["path"]))
    parameters = manifest.get("parameters", {})
    histograms = {}
    for role, paths in files.items():
        if parameters.get("normalise") == "zscore":
            low, high = -5.0, 5.0
        elif "bit_depth" in parameters:
            low, high = 0.0, 1.0
        else:
            ranges = [(v.min(), v.max()) for v in (_values(p) for p in paths) if v.size]
            low, high = (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else (0.0, 1.0)
            high = high if high > low else low + 1.0
        edges = np.linspace(low, high, BINS + 1)
        counts = np.zeros(BINS, dtype=np.int64)
        for path in paths:
            values = np.clip(_values(path), low, high)
            counts += np.histogram(values, bins=edges)[0]
        histograms[role] = {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist()}
    return histograms


def _plot(histograms: dict, title: str, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * max(1, len(histograms)), 2.8), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (role, h) in enumerate(histograms.items(), start=1):
        ax = fig.add_subplot(1, len(histograms), i)
        edges = np.asarray(h["edges"])
        ax.stairs(h["counts"], edges)
        ax.set_title(role)
        ax.set_xlabel("intensity")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)


def write_qc_report(out: str) -> dict:
    """Write ``out/qc_report/`` (see the module docstring).

    Returns:
        ``{"summary": ..., "histograms_json": path, "histograms_png": path or None, "note": str or None}``.

    Raises:
        DataListError: ``out`` holds no readable manifest.
    """
    from medflare import optional_dependencies

    manifest = read_manifest(os.path.join(out, MANIFEST_NAME))
    histograms = intensity_histograms(manifest, out)
    folder = os.path.join(out, REPORT_FOLDER)
    os.makedirs(folder, exist_ok=True)
    json_path = os.path.join(folder, "intensity_histograms.json")
    with open(json_path, "w") as f:
        json.dump(histograms, f, indent=1)
    png_path, note = None, None
    if not histograms:
        note = "no case passed: no histogram drawn"
    elif optional_dependencies.available("matplotlib"):
        png_path = os.path.join(folder, "intensity_histograms.png")
        _plot(histograms, f"{manifest.get('name')} {manifest.get('version')}: prepared intensities", png_path)
    else:
        note = f"matplotlib is not installed, so no histogram figure was drawn ({optional_dependencies.DEMO_EXTRA_HINT}); the counts are in {json_path}"
    return {"summary": qc_summary(manifest), "histograms_json": json_path, "histograms_png": png_path, "note": note}
