"""``medflare prepare``: prepare a site's data the same way every site does, and report on it.

    medflare prepare segmentation --datalist D --data-root R --out OUT [--spacing X Y Z]
        [--normalise zscore|none] [--crop-pad X Y Z] [--spacing-range LO HI] [--max-anisotropy A]
        [--allow-negative-intensity]
    medflare prepare xray --table T --data-root R --out OUT [--size 256|keep]
        [--scaling percentile|minmax] [--percentiles LO HI] [--bit-depth 8|16] [--image-column image]
    medflare prepare report OUT        (or: medflare prepare --report OUT)

Every case that fails QC is printed with its reasons and listed in ``OUT/medflare_preparation.json``.
"""

from __future__ import annotations

import argparse
import re
import sys

__all__ = ["add_prepare_parser", "run_prepare_command"]

# the recipe's parameter each option sets, to name the option when a value is refused
_OPTION_OF = {
    "target_spacing": "--spacing",
    "crop_pad": "--crop-pad",
    "normalise": "--normalise",
    "spacing_range": "--spacing-range",
    "max_anisotropy": "--max-anisotropy",
    "size": "--size",
    "scaling": "--scaling",
    "percentiles": "--percentiles",
    "bit_depth": "--bit-depth",
    "image_column": "--image-column",
}


def add_prepare_parser(sub) -> None:
    prepare = sub.add_parser("prepare", help="prepare a site's data with medflare's versioned steps (QC, normalisation, resampling) and a manifest")
    prepare.add_argument("--report", default=None, metavar="OUT", help="print the QC summary of a prepared folder and draw its histograms")
    kinds = prepare.add_subparsers(dest="kind")
    seg = kinds.add_parser("segmentation", help="a BraTS-like datalist: four MR modalities and a label per case")
    seg.add_argument("--datalist", required=True, help="the site's decathlon-style datalist (JSON)")
    seg.add_argument("--data-root", required=True, help="folder the datalist's paths are relative to")
    seg.add_argument("--out", required=True, help="new or empty folder for the prepared data (the site's new data_root)")
    seg.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"), help="resample to this voxel size in mm (default: keep)")
    seg.add_argument("--normalise", default="zscore", help="zscore (per modality over the brain) or none (default zscore)")
    seg.add_argument("--crop-pad", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"), help="centre crop / zero pad to this shape (default: keep)")
    seg.add_argument("--spacing-range", type=float, nargs=2, default=(0.2, 8.0), metavar=("LO", "HI"), help="QC: voxel edges allowed, mm (default 0.2 8)")
    seg.add_argument("--max-anisotropy", type=float, default=4.0, help="QC: largest longest/shortest voxel edge (default 4)")
    seg.add_argument("--allow-negative-intensity", action="store_true", help="QC: accept negative MR voxels (data normalised elsewhere)")
    xray = kinds.add_parser("xray", help="an outcome table's chest radiographs (PNG, JPEG, DICOM)")
    xray.add_argument("--table", required=True, help="the site's outcome table (CSV with case_id, split, image)")
    xray.add_argument("--data-root", required=True, help="folder the table's image paths are relative to")
    xray.add_argument("--out", required=True, help="new or empty folder for the prepared data (the site's new data_root)")
    xray.add_argument("--size", default="256", help="output edge in pixels, or keep (default 256)")
    xray.add_argument("--scaling", default="percentile", help="percentile (clip to --percentiles) or minmax (default percentile)")
    xray.add_argument("--percentiles", type=float, nargs=2, default=(0.5, 99.5), metavar=("LO", "HI"), help="default 0.5 99.5")
    xray.add_argument("--bit-depth", type=int, default=16, help="8 or 16 (default 16)")
    xray.add_argument("--image-column", default="image", help="the table's column of image paths (default image)")
    report = kinds.add_parser("report", help="print the QC summary of a prepared folder and draw its histograms")
    report.add_argument("out", help="a folder medflare prepare wrote")


def _recipe(build, **arguments):
    try:
        return build(**arguments)
    except (TypeError, ValueError) as e:
        text = str(e)
        parameter = re.match(r"([a-z_]+)", text)
        option = _OPTION_OF.get(parameter.group(1)) if parameter else None
        raise ValueError(f"{option}: {text}" if option else text) from None


def _size(text: str):
    if text.strip().lower() == "keep":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--size must be an int in [8, 4096] or 'keep', got {text!r}") from None


def _print_result(result) -> int:
    manifest = result.manifest
    counts = manifest["counts"]
    print(
        f"prepared {counts['passed']} of {counts['cases']} case(s) into {result.out} ({manifest['name']} {manifest['version']}, "
        f"parameters hash {manifest['parameters_hash'][:12]})"
    )
    for case in manifest["cases"]:
        for reason in case["reasons"]:
            print(f"  FAIL {case['case_id']} ({case['split']}): {reason['code']}: {reason['message']}")
        for warning in case["warnings"]:
            print(f"  WARN {case['case_id']} ({case['split']}): {warning['code']}: {warning['message']}")
    print(f"datalist: {result.datalist}\ndata config: {result.data_config}\nmanifest: {result.manifest_path}")
    empty = sorted({c["split"] for c in manifest["cases"]} - {c["split"] for c in manifest["cases"] if c["verdict"] == "pass"})
    if empty:
        print(f"medflare prepare: error: no case of split(s) {empty} passed QC; the prepared data cannot be trained on", file=sys.stderr)
        return 2
    return 0


def _print_report(out: str) -> int:
    from medflare.preparation.qc_report import write_qc_report

    report = write_qc_report(out)
    summary = report["summary"]
    counts = summary["counts"]
    print(f"{summary['name']} {summary['version']} (parameters hash {str(summary['parameters_hash'])[:12]}): {out}")
    print(f"cases {counts['cases']}: {counts['passed']} passed, {counts['failed']} failed, {counts['warned']} with warnings")
    for code, n in counts["failed_by_reason"].items():
        print(f"  fail {code}: {n}")
    for code, n in counts["warnings_by_reason"].items():
        print(f"  warning {code}: {n}")
    for case in summary["failed"]:
        print(f"  failed case {case['case_id']}: {', '.join(case['codes'])}")
    for key in ("shape_range", "spacing_range", "output_shape_range", "output_spacing_range"):
        if summary[key]:
            print(f"{key.replace('_', ' ')}: " + " x ".join(f"{lo:g}-{hi:g}" for lo, hi in summary[key]))
    print(f"histogram counts: {report['histograms_json']}")
    if report["histograms_png"]:
        print(f"histograms: {report['histograms_png']}")
    if report["note"]:
        print(f"note: {report['note']}")
    return 0


def run_prepare_command(args: argparse.Namespace) -> int:
    if args.report is not None and args.kind is not None:
        raise ValueError(f"give --report OUT or a subcommand ({args.kind!r}), not both")
    if args.report is not None:
        return _print_report(args.report)
    if args.kind == "report":
        return _print_report(args.out)
    if args.kind == "segmentation":
        from medflare.preparation.prepare_segmentation import prepare_segmentation
        from medflare.preparation.recipe import SegmentationPreparation

        recipe = _recipe(
            SegmentationPreparation,
            target_spacing=args.spacing,
            normalise=args.normalise,
            crop_pad=args.crop_pad,
            spacing_range=tuple(args.spacing_range),
            max_anisotropy=args.max_anisotropy,
            allow_negative_intensity=args.allow_negative_intensity,
        )
        return _print_result(prepare_segmentation(args.datalist, args.data_root, args.out, recipe))
    if args.kind == "xray":
        from medflare.preparation.prepare_xray import prepare_xray
        from medflare.preparation.recipe import XrayPreparation

        recipe = _recipe(
            XrayPreparation,
            size=_size(args.size),
            scaling=args.scaling,
            percentiles=tuple(args.percentiles),
            bit_depth=args.bit_depth,
            image_column=args.image_column,
        )
        return _print_result(prepare_xray(args.table, args.data_root, args.out, recipe))
    raise ValueError("give a subcommand (segmentation, xray, report) or --report OUT")
