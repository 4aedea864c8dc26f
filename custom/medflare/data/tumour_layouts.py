"""Which brain-tumour data layout a folder holds, and the datalist for it.

:func:`detect_tumour_layout` looks at a site's data folder once and says which of the layouts
medflare reads it holds, with its label convention (:mod:`medflare.data.tumour_label_conventions`):

==================  ==================================================================  ==============
kind                files                                                               convention
==================  ==================================================================  ==============
``brats2018-2021``  ``<id>/<id>_{t1,t1ce,t2,flair,seg}.nii[.gz]`` (:mod:`~.brats_layout`)  ``brats2021``
``brats2023``       ``BraTS-GLI-…/…-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (:mod:`~.brats2023_layout`)  ``brats2023``
``msd_task01``      ``dataset.json`` + 4-D images (:mod:`~.msd_task01_layout`)           from its labels
==================  ==================================================================  ==============

A folder holding none is refused with what was seen (how many folders hold NIfTI files, how
their names end, which modality suffix no folder has); a folder holding two is refused naming
both. :func:`write_tumour_datalist` then checks every file's header (a 4-D image with 3
channels is refused) and that the label volumes hold only the convention's values (a BraTS 2018-2021 folder whose labels hold 3 is refused naming the file)
and writes the datalist and ``data_config.json``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from medflare.data.brats2023_layout import COHORTS, MODALITY_SUFFIXES, brats2023_cohort, find_brats2023_subjects
from medflare.data.brats_layout import find_brats_subjects, make_datalist, write_data_config
from medflare.data.data_errors import DataListError
from medflare.data.modality_names import MODALITIES
from medflare.data.msd_task01_layout import DATASET_FILE, read_msd_task01
from medflare.data.tumour_label_conventions import CONVENTIONS, get_convention, values_outside

__all__ = ["LAYOUT_KINDS", "LayoutReport", "check_image_headers", "check_label_values_present", "detect_tumour_layout", "write_tumour_datalist"]

#: The layouts :func:`detect_tumour_layout` tells apart.
LAYOUT_KINDS = ("brats2018-2021", "brats2023", "msd_task01")

_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_SUFFIX = re.compile(r"(?P<suffix>[_-][A-Za-z0-9]+)\.nii(\.gz)?$")


@dataclass(frozen=True)
class LayoutReport:
    """What :func:`detect_tumour_layout` found below ``root``.

    Attributes:
        kind: one of :data:`LAYOUT_KINDS`.
        label_convention: a name of :data:`~medflare.data.tumour_label_conventions.CONVENTIONS`.
        subjects: every complete subject (labelled or not), sorted by id.
        incomplete: folders holding some of a subject's modality files but not all (not listed).
        seen: one line on the files looked at.
        modality: the channel names of a 4-D image (MSD), else None.
        cohorts: subjects per BraTS 2023 cohort code (empty for other kinds).
    """

    root: str
    kind: str
    label_convention: str
    subjects: tuple
    incomplete: tuple = ()
    seen: str = ""
    modality: Optional[dict] = None
    cohorts: dict = field(default_factory=dict)

    @property
    def subject_count(self) -> int:
        return len(self.subjects)

    @property
    def unlabelled_count(self) -> int:
        return sum(1 for s in self.subjects if not s.label)

    def summary(self) -> list:
        """Lines for a site admin: the layout, convention, counts and what was left out."""
        lines = [
            f"{self.root}: {self.kind} layout, label convention {self.label_convention} "
            f"({CONVENTIONS[self.label_convention].labels_map()})",
            f"{self.subject_count} subjects, {self.subject_count - self.unlabelled_count} labelled, "
            f"{self.unlabelled_count} without a label (left out of the datalist)",
        ]
        if self.cohorts:
            lines.append("cohorts: " + ", ".join(f"{c} {n}" for c, n in sorted(self.cohorts.items())))
        if self.modality:
            lines.append(f"4-D image channels {self.modality}, reordered to {list(MODALITIES)}")
        if self.incomplete:
            shown = ", ".join(self.incomplete[:5]) + (" ..." if len(self.incomplete) > 5 else "")
            lines.append(f"warning: {len(self.incomplete)} folder(s) miss a modality and are left out: {shown}")
        lines.append(f"seen: {self.seen}")
        return lines


def detect_tumour_layout(root: str) -> LayoutReport:
    """The one layout of :data:`LAYOUT_KINDS` that ``root`` holds.

    MSD Task01 is recognised by a ``dataset.json`` in ``root`` or in one of its sub-folders;
    the BraTS layouts by their file names anywhere below ``root``.

    Raises:
        DataListError: ``root`` is not a folder; it holds no known layout (the message names the
            folder and what it found); it holds two layouts or two ``dataset.json`` (naming both);
            or the layout's own reader refuses a file.
    """
    if not os.path.isdir(root):
        raise DataListError(f"tumour data folder not found: {root}")
    root = os.path.abspath(root)
    scan = _scan(root)
    found = {}
    legacy = find_brats_subjects(root)
    if legacy:
        found["brats2018-2021"] = (legacy, f"{len(legacy)} subject folders such as {os.path.dirname(legacy[0].images[0])}")
    b23 = find_brats2023_subjects(root)
    if b23:
        found["brats2023"] = (b23, f"{len(b23)} subject folders such as {os.path.dirname(b23[0].images[0])}")
    if scan["dataset_json"]:
        found["msd_task01"] = (None, f"{', '.join(scan['dataset_json'])}")
    if len(found) > 1:
        raise DataListError(
            f"{root} holds more than one tumour data layout: "
            + "; ".join(f"{kind}: {what}" for kind, (_, what) in found.items())
            + ". Point the datalist at one of them (a folder holding one layout)"
        )
    if not found:
        raise DataListError(f"no brain-tumour data layout found in {root}: {scan['seen']}{scan['hints']}. {_EXPECTED}")
    kind, (subjects, _) = next(iter(found.items()))
    if kind == "msd_task01":
        if len(scan["dataset_json"]) > 1:
            raise DataListError(f"{root} holds several MSD tasks {scan['dataset_json']}; point at one task folder")
        task = read_msd_task01(os.path.dirname(scan["dataset_json"][0]))
        return LayoutReport(root, kind, task.label_convention, task.subjects, (), scan["seen"], task.modality)
    if kind == "brats2023":
        cohorts = dict(Counter(brats2023_cohort(s.subject_id) for s in subjects))
        return LayoutReport(root, kind, "brats2023", tuple(subjects), scan["incomplete_2023"], scan["seen"], None, cohorts)
    return LayoutReport(root, kind, "brats2021", tuple(subjects), scan["incomplete_legacy"], scan["seen"])


_EXPECTED = (
    "Expected one of: BraTS 2018-2021 (<id>/<id>_t1, _t1ce, _t2, _flair[, _seg].nii[.gz]); BraTS 2023 "
    f"(BraTS-<{'|'.join(COHORTS)}>-NNNNN-NNN/...-{{{','.join(MODALITY_SUFFIXES)}}}[,-seg].nii.gz); MSD Task01 "
    "(Task01_BrainTumour/dataset.json with imagesTr/, labelsTr/)"
)


def _scan(root: str) -> dict:
    """One walk: the dataset.json files, how NIfTI names end, folders with some modalities only."""
    folders_with_nifti = 0
    other_files = 0
    suffixes: Counter = Counter()  # suffix -> folders holding a file ending in it
    incomplete_legacy, incomplete_2023, dataset_json = [], [], []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        depth = 0 if folder == root else os.path.relpath(folder, root).count(os.sep) + 1
        if DATASET_FILE in files and depth <= 1:
            dataset_json.append(os.path.join(folder, DATASET_FILE))
        nifti = [f for f in files if _NIFTI.search(f)]
        other_files += len(files) - len(nifti)
        if not nifti:
            continue
        folders_with_nifti += 1
        here = {m.group("suffix").lower() for f in nifti for m in [_SUFFIX.search(f)] if m}
        suffixes.update(here)
        legacy_here = {m for m in MODALITIES if any(re.search(rf"_{m}\.nii(\.gz)?$", f, re.IGNORECASE) for f in nifti)}
        if legacy_here and legacy_here != set(MODALITIES):
            incomplete_legacy.append(folder)
        b23_here = {m for m in MODALITY_SUFFIXES if any(re.search(rf"^BraTS-.+-{m}\.nii(\.gz)?$", f, re.IGNORECASE) for f in nifti)}
        if b23_here and b23_here != set(MODALITY_SUFFIXES):
            incomplete_2023.append(folder)
    if not folders_with_nifti:
        seen = f"found no .nii/.nii.gz files ({other_files} other file(s))"
    else:
        common = ", ".join(f"*{s} ({n})" for s, n in suffixes.most_common(8))
        seen = f"found {folders_with_nifti} folder(s) with .nii/.nii.gz files, names ending in {common or 'no _/- suffix'}"
    hints = ""  # why neither BraTS layout matched, for the refusal only
    for label, names in (("BraTS 2018-2021", [f"_{m}" for m in MODALITIES]), ("BraTS 2023", [f"-{m}" for m in MODALITY_SUFFIXES])):
        missing = [n for n in names if n not in suffixes]
        present = [n for n in names if n in suffixes]
        if present and missing:
            hints += f"; {label}: no folder has *{', *'.join(missing)}"
        elif present:
            hints += f"; {label}: no folder has all of *{', *'.join(names)}"
    if dataset_json:
        seen += f"; {len(dataset_json)} dataset.json"
    return {
        "seen": seen,
        "hints": hints,
        "dataset_json": dataset_json,
        "incomplete_legacy": tuple(incomplete_legacy),
        "incomplete_2023": tuple(incomplete_2023),
    }


def check_image_headers(report: LayoutReport) -> None:
    """Read the headers (no voxels) of every subject's files: a 4-D image must be
    ``(x, y, z, 4)``, a modality file 3-D, and each on the label's voxel grid shape.

    Raises:
        DataListError: naming the subject, the file, its shape and what is expected.
    """
    import nibabel as nib

    for subject in report.subjects:
        shapes = []
        for path in list(subject.images) + ([subject.label] if subject.label else []):
            try:
                shapes.append((path, tuple(nib.load(path).shape)))
            except Exception as e:  # noqa: BLE001 - any reason a header does not load is the file's fault
                raise DataListError(f"subject {subject.subject_id}: cannot read {path}: {type(e).__name__}: {e}") from None
        for n, (path, shape) in enumerate(shapes):
            is_4d_image = len(subject.images) == 1 and n == 0
            if is_4d_image and (len(shape) != 4 or shape[3] != len(MODALITIES)):
                raise DataListError(
                    f"subject {subject.subject_id}: 4-D image {path} has shape {shape}; (x, y, z, {len(MODALITIES)}) "
                    f"with one channel per modality {report.modality} is expected"
                )
            if not is_4d_image and len(shape) != 3:
                raise DataListError(f"subject {subject.subject_id}: {path} has shape {shape}; a 3-D volume is expected")
            if shape[:3] != shapes[0][1][:3]:
                raise DataListError(
                    f"subject {subject.subject_id}: {path} has shape {shape}, but {shapes[0][0]} has {shapes[0][1]}; "
                    "a subject's files must share one voxel grid"
                )


def check_label_values_present(report: LayoutReport, log: Callable[[str], None] = lambda line: None) -> dict:
    """Read every label volume of ``report`` and refuse one holding a value outside its convention.

    Returns:
        ``{value: number of label volumes holding it}``.

    Raises:
        DataListError: naming the file, the values found outside the convention, the convention,
            and the conventions those values would fit.
    """
    import nibabel as nib

    convention = get_convention(report.label_convention)
    present: Counter = Counter()
    labelled = [s for s in report.subjects if s.label]
    for n, subject in enumerate(labelled):
        try:
            voxels = np.asanyarray(nib.load(subject.label).dataobj)
            values = np.unique(voxels)
        except Exception as e:  # noqa: BLE001 - any reason a label does not load is the file's fault
            raise DataListError(f"subject {subject.subject_id}: cannot read label {subject.label}: {type(e).__name__}: {e}") from None
        if not np.all(np.isfinite(values)):
            raise DataListError(f"subject {subject.subject_id}: label {subject.label} holds NaN or infinite values")
        bad = values_outside(values, convention)
        if bad:
            fits = [c.name for c in CONVENTIONS.values() if not values_outside(values, c)]
            raise DataListError(
                f"subject {subject.subject_id}: label {subject.label} holds value(s) {bad[:10]} outside the "
                f"{convention.name} labels {list(convention.values)} of this {report.kind} layout"
                + (f" (its values {[int(v) for v in values]} fit {fits})" if fits else "")
                + "; the data are not numbered as the layout says"
            )
        present.update(int(v) for v in values)
        if (n + 1) % 50 == 0:
            log(f"labels checked: {n + 1}/{len(labelled)}")
    return dict(sorted(present.items()))


def write_tumour_datalist(
    root: str,
    out: Optional[str] = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    force: bool = False,
    check_labels: bool = True,
    log: Callable[[str], None] = lambda line: None,
) -> tuple:
    """Detect the layout of ``root``, check its labels and write its datalist and ``data_config.json``.

    Args:
        root: the site's data folder (becomes the datalist's data root).
        out: the datalist file (default ``<root>/datalist.json``); ``data_config.json`` is
            written beside it.
        val_fraction: share of labelled subjects held out for validation, in (0, 1).
        seed: seed of the split, an int >= 0.
        force: overwrite an existing datalist or ``data_config.json``.
        check_labels: read every label volume (:func:`check_label_values_present`).
        log: receives :meth:`LayoutReport.summary` as soon as the layout is known, then progress lines.

    Returns:
        ``(report, datalist path, data_config path)``.

    Raises:
        ValueError: ``val_fraction`` or ``seed`` out of range, or ``out`` exists and ``force`` is False.
        DataListError: see :func:`detect_tumour_layout` and :func:`check_label_values_present`.
    """
    report = detect_tumour_layout(root)
    for line in report.summary():
        log(line)
    root = report.root
    out = os.path.abspath(out) if out else os.path.join(root, "datalist.json")
    out_dir = os.path.dirname(out)
    config = os.path.join(out_dir, "data_config.json")
    for path in (out, config):
        if os.path.isdir(path):
            raise ValueError(f"out must be a file path, got the folder {path!r}")
        if os.path.exists(path) and not force:
            raise ValueError(f"{path} exists; pass force=True (--force) to overwrite it")
    datalist = make_datalist(
        list(report.subjects), base_dir=root, val_fraction=val_fraction, seed=seed,
        label_convention=report.label_convention, modality=report.modality,
    )
    check_image_headers(report)
    if check_labels:
        present = check_label_values_present(report, log)
        log(f"label values present: {present} (value: volumes)")
    datalist["layout"] = report.kind
    os.makedirs(out_dir, exist_ok=True)
    with open(out, "w") as f:
        json.dump(datalist, f, indent=2)
    data_root = "." if out_dir == root else root
    return report, out, write_data_config(out_dir, data_root=data_root, datalist=os.path.basename(out))
