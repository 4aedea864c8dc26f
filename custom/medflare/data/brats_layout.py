"""BraTS folder layouts and MONAI decathlon-style datalists.

Reads the layouts the BraTS challenges published from 2018 to 2021, so a site with real data
points its configuration at it and changes nothing else:

- BraTS 2018/2019: ``MICCAI_BraTS_2019_Data_Training/HGG/BraTS19_2013_2_1/BraTS19_2013_2_1_t1.nii.gz``
  (HGG and LGG subfolders),
- BraTS 2020: ``MICCAI_BraTS2020_TrainingData/BraTS20_Training_001/BraTS20_Training_001_flair.nii``,
- BraTS 2021: ``BraTS2021_00000/BraTS2021_00000_t1ce.nii.gz``.

A subject is a folder holding one file per modality named ``<id>_{t1,t1ce,t2,flair}.nii[.gz]``
and, for training data, a label file ``<id>_seg.nii[.gz]`` with labels 0, 1 (necrotic core),
2 (oedema) and 4 (enhancing tumour). BraTS 2020 ships one label misnamed ``..._Segm.nii``;
it is accepted. Validation sets without labels are listed but cannot be trained on.

BraTS 2023/2024 folders are read by :mod:`medflare.data.brats2023_layout`, MSD Task01 by
:mod:`medflare.data.msd_task01_layout`, and :func:`medflare.data.tumour_layouts.detect_tumour_layout`
tells which of them a folder holds. The datalist made here records its label convention
(:mod:`medflare.data.tumour_label_conventions`); a datalist without one is ``brats2021``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

from medflare.data.data_errors import DataListError
from medflare.data.data_root_paths import path_in_data_root
from medflare.data.modality_names import MODALITIES, channel_order
from medflare.data.tumour_label_conventions import DEFAULT_CONVENTION, convention_from_labels_map, get_convention

__all__ = [
    "MODALITIES",
    "BratsSubject",
    "DataListError",
    "datalist_convention",
    "entry_files",
    "find_brats_subjects",
    "make_datalist",
    "load_datalist",
    "write_data_config",
]

_MODALITY_FILE = re.compile(r"^(?P<sid>.+)_(?P<mod>t1|t1ce|t2|flair)\.nii(\.gz)?$", re.IGNORECASE)
_LABEL_FILE = re.compile(r"^(?P<sid>.+)_(seg|segm)\.nii(\.gz)?$", re.IGNORECASE)


def read_json_object(path: str, what: str) -> dict:
    """Read a JSON file that must hold an object.

    Raises:
        DataListError: ``"<what> not found: <path>"``, ``"<what> <path> is not readable JSON: ..."``
            or ``"<what> <path> must hold a JSON object, got ..."``.
    """
    try:
        with open(path) as f:
            content = json.load(f)
    except FileNotFoundError:
        raise DataListError(f"{what} not found: {path}") from None
    except (OSError, ValueError) as e:
        raise DataListError(f"{what} {path} is not readable JSON: {e}") from None
    if not isinstance(content, dict):
        raise DataListError(f"{what} {path} must hold a JSON object, got {type(content).__name__}")
    return content


@dataclass(frozen=True)
class BratsSubject:
    """One subject: its id, one image path per modality (in ``MODALITIES`` order), its label path."""

    subject_id: str
    images: tuple
    label: Optional[str]


def find_brats_subjects(root: str) -> list[BratsSubject]:
    """Find every BraTS subject folder below ``root``, sorted by subject id.

    Raises:
        DataListError: ``root`` is not a folder.
    """
    if not os.path.isdir(root):
        raise DataListError(f"BraTS data folder not found: {root}")
    subjects = []
    for folder, _, files in os.walk(root):
        found: dict[str, str] = {}
        label = None
        sid = os.path.basename(folder)
        for name in files:
            m = _MODALITY_FILE.match(name)
            if m:
                found[m.group("mod").lower()] = os.path.join(folder, name)
                sid = m.group("sid")
            elif _LABEL_FILE.match(name):
                label = os.path.join(folder, name)
        if all(mod in found for mod in MODALITIES):
            subjects.append(BratsSubject(sid, tuple(found[mod] for mod in MODALITIES), label))
    return sorted(subjects, key=lambda s: s.subject_id)


def make_datalist(
    subjects: list[BratsSubject],
    base_dir: str,
    val_fraction: float = 0.2,
    seed: int = 0,
    label_convention: str = DEFAULT_CONVENTION,
    modality: Optional[Mapping] = None,
) -> dict:
    """A MONAI decathlon-style datalist with a seeded training/validation split.

    Paths are written relative to ``base_dir``, so the data folder can move. Subjects without
    a label are left out (they cannot be trained or scored on). The datalist records its label
    convention (:mod:`medflare.data.tumour_label_conventions`) and that convention's ``"labels"``
    map, so :func:`load_datalist` and the transforms convert labels with the right numbering.

    Args:
        subjects: as found by a layout reader; each has four image paths in :data:`MODALITIES`
            order, or one 4-D image path (MSD Task01) whose channels ``modality`` names.
        base_dir: the folder paths are written relative to (the site's data root).
        val_fraction: share of labelled subjects held out for validation, in (0, 1).
        seed: seed of the split.
        label_convention: a name of :data:`~medflare.data.tumour_label_conventions.CONVENTIONS`.
        modality: ``{"0": name, ...}`` of the channels of a 4-D image (required for one-path
            subjects); four-path subjects record ``MODALITIES``.

    Returns:
        ``{"label_convention": ..., "labels": {...}, "modality": {...},
        "training": [{"subject": id, "image": [t1, t1ce, t2, flair] or path, "label": seg}, ...],
        "validation": [...]}``

    Raises:
        ValueError: ``val_fraction``, ``seed``, ``label_convention`` or ``modality`` out of range.
        DataListError: fewer than 2 labelled subjects.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    convention = get_convention(label_convention)
    forms = {len(s.images) for s in subjects}
    if not forms <= {1, len(MODALITIES)} or len(forms) > 1:
        raise ValueError(
            f"subjects must all have {len(MODALITIES)} image paths or all one 4-D image path, got {sorted(forms)} paths"
        )
    if forms == {1}:
        if modality is None:
            raise ValueError("modality must name the channels of a 4-D image, got None")
        try:
            channel_order(modality, "make_datalist")
        except DataListError as e:
            raise ValueError(f"modality: {e}") from None
        modality = {str(k): v for k, v in modality.items()}
    else:
        modality = {str(i): m.upper() for i, m in enumerate(MODALITIES)}
    labelled = [s for s in subjects if s.label]
    if len(labelled) < 2:
        raise DataListError(f"need at least 2 labelled subjects below {base_dir}, found {len(labelled)}")
    order = np.random.default_rng(seed).permutation(len(labelled))
    n_val = min(max(1, int(round(val_fraction * len(labelled)))), len(labelled) - 1)

    def entry(s: BratsSubject) -> dict:
        images = [os.path.relpath(p, base_dir) for p in s.images]
        return {
            "subject": s.subject_id,
            "image": images[0] if len(images) == 1 else images,
            "label": os.path.relpath(s.label, base_dir),
        }

    val = sorted(order[:n_val].tolist())
    train = sorted(order[n_val:].tolist())
    return {
        "name": "BraTS",
        "label_convention": convention.name,
        "modality": modality,
        "labels": convention.labels_map(),
        "training": [entry(labelled[i]) for i in train],
        "validation": [entry(labelled[i]) for i in val],
    }


def datalist_convention(content: Mapping, where: str) -> str:
    """The label convention of a datalist: its ``"label_convention"``, checked against its
    ``"labels"`` map when it has one; else the convention its ``"labels"`` map names; else
    :data:`~medflare.data.tumour_label_conventions.DEFAULT_CONVENTION` (datalists written before
    conventions were recorded).

    Raises:
        DataListError: an unknown convention, a ``"labels"`` map no convention matches, or a
            ``"labels"`` map of another convention than the one named.
    """
    named = content.get("label_convention")
    labels = content.get("labels")
    if named is not None:
        try:
            get_convention(named)
        except ValueError as e:
            raise DataListError(f"{where}: {e}") from None
        if labels is not None:
            described = convention_from_labels_map(labels, where)
            if described != named:
                raise DataListError(
                    f"{where}: 'label_convention' is {named!r} but the 'labels' map {dict(labels)!r} is that of "
                    f"{described!r}; make them agree"
                )
        return named
    if labels is not None:
        return convention_from_labels_map(labels, where)
    return DEFAULT_CONVENTION


def load_datalist(datalist_path: str, data_root: str, check_files: bool = True) -> tuple[list, list]:
    """Read a decathlon-style datalist and resolve its paths against ``data_root``.

    Every path must resolve (``..`` and symlinks followed) inside ``data_root``; see
    :mod:`medflare.data.data_root_paths`. The volumes' content is checked by
    :func:`medflare.data.brats_volume_checks.check_brats_subjects`, which the trainer and the
    site install call on the result.

    Args:
        datalist_path: the JSON file.
        data_root: folder the datalist's relative paths are relative to.
        check_files: verify every named file exists.

    Returns:
        ``(training, validation)`` lists of ``{"image": [4 paths], "label": path,
        "label_convention": name}`` with absolute paths (see :func:`datalist_convention`). An
        entry whose ``"image"`` is one 4-D path also carries ``"channel_order"``, the file
        channel of each of :data:`MODALITIES` (from the datalist's ``"modality"`` map).

    Raises:
        DataListError: naming the file that is missing, unreadable or malformed.
        DataPathError: (a DataListError) naming the entry whose path leaves ``data_root``.
    """
    content = read_json_object(datalist_path, "datalist")
    convention = datalist_convention(content, f"datalist {datalist_path}")
    order = None
    lists = []
    for key in ("training", "validation"):
        items = content.get(key)
        if not isinstance(items, list) or not items:
            raise DataListError(f"datalist {datalist_path} needs a non-empty list under {key!r}")
        resolved = []
        for n, item in enumerate(items):
            images = item.get("image") if isinstance(item, dict) else None
            label = item.get("label") if isinstance(item, dict) else None
            one_volume = isinstance(images, str)
            if not (one_volume or (isinstance(images, list) and len(images) == len(MODALITIES))) or not isinstance(label, str):
                raise DataListError(
                    f"datalist {datalist_path}: {key}[{n}] must have 'image' (a list of {len(MODALITIES)} "
                    f"paths in the order {list(MODALITIES)}, or one 4-D image path) and 'label' (a path), got {item!r}"
                )
            where = f"datalist {datalist_path}: {key}[{n}]"
            entry = {"label_convention": convention}
            if one_volume:
                if order is None:
                    order = channel_order(content.get("modality"), f"datalist {datalist_path}")
                entry["image"] = path_in_data_root(data_root, images, f"{where} image")
                entry["channel_order"] = list(order)
            else:
                entry["image"] = [path_in_data_root(data_root, p, f"{where} image {m}") for m, p in zip(MODALITIES, images)]
            entry["label"] = path_in_data_root(data_root, label, f"{where} label")
            if check_files:
                for path in entry_files(entry):
                    if not os.path.isfile(path):
                        raise DataListError(f"{where} names a missing file: {path}")
            resolved.append(entry)
        lists.append(resolved)
    return lists[0], lists[1]


def entry_files(entry: Mapping) -> list:
    """Every file a loaded datalist entry names: its image path(s), then its label."""
    images = entry["image"]
    return ([images] if isinstance(images, str) else list(images)) + [entry["label"]]


def write_data_config(site_dir: str, data_root: str, datalist: str) -> str:
    """Write ``data_config.json`` (see :mod:`medflare.data.site_data_config`) into ``site_dir``."""
    path = os.path.join(site_dir, "data_config.json")
    with open(path, "w") as f:
        json.dump({"data_root": data_root, "datalist": datalist}, f, indent=2)
    return path
