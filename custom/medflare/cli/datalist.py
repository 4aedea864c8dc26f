"""``medflare data datalist ROOT``: the datalist of a site's real brain-tumour data.

Detects which layout ROOT holds (BraTS 2018-2021, BraTS 2023/2024, MSD Task01;
:func:`medflare.data.tumour_layouts.detect_tumour_layout`), prints what it found (layout, label
convention, subjects, those without a label, folders left out), checks every label volume
against the convention, and writes the datalist (default ``ROOT/datalist.json``) and
``data_config.json`` beside it, ready for ``medflare site install --data``.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["add_datalist_parser", "run_datalist_command"]


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--val-fraction must be a number in (0, 1), got {text!r}") from None
    if not math.isfinite(value) or not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"--val-fraction must be a number in (0, 1), got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed must be an int >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"--seed must be an int >= 0, got {text!r}")
    return value


def add_datalist_parser(data_sub) -> None:
    """Add ``datalist`` to the ``medflare data`` sub-commands (``data_sub``, an argparse
    sub-parsers object)."""
    parser = data_sub.add_parser(
        "datalist",
        help="detect the brain-tumour layout of a data folder (BraTS 2018-2021, BraTS 2023, MSD Task01) "
        "and write its datalist and data_config.json",
    )
    parser.add_argument("root", metavar="ROOT", help="the site's data folder (becomes the data root)")
    parser.add_argument("--out", default=None, help="datalist file to write (default ROOT/datalist.json); data_config.json goes beside it")
    parser.add_argument("--val-fraction", type=_fraction, default=0.2, help="share of labelled subjects for validation, in (0, 1) (default 0.2)")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the training/validation split (default 0)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing datalist or data_config.json")


def run_datalist_command(args, log=print) -> int:
    """Run ``medflare data datalist`` with parsed ``args``; returns the exit status (0).

    Raises:
        DataListError: the folder holds no layout, two layouts, or a label outside the convention.
        ValueError: the datalist or ``data_config.json`` exists and ``--force`` is not given.
    """
    from medflare.data.tumour_layouts import write_tumour_datalist

    report, datalist, config = write_tumour_datalist(  # logs what it found first
        args.root, out=args.out, val_fraction=args.val_fraction, seed=args.seed, force=args.force, log=log
    )
    log(f"datalist: {datalist} ({report.subject_count - report.unlabelled_count} labelled subjects)")
    log(f"data config: {config}")
    return 0
