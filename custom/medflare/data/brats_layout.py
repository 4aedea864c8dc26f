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
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from medflare.data.data_errors import DataListError
from medflare.data.data_root_paths import path_in_data_root

__all__ = [
    "MODALITIES",
    "BratsSubject",
    "DataListError",
    "find_brats_subjects",
    "make_datalist",
    "load_datalist",
    "write_data_config",
]

#: Channel order of the image, as in the BraTS challenge and MONAI's BraTS tutorials.
MODALITIES = ("t1", "t1ce", "t2", "flair")

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
    subjects: list[BratsSubject], base_dir: str, val_fraction: float = 0.2, seed: int = 0
) -> dict:
    """A MONAI decathlon-style datalist with a seeded training/validation split.

    Paths are written relative to ``base_dir``, so the data folder can move. Subjects without
    a label are left out (they cannot be trained or scored on).

    Returns:
        ``{"training": [{"image": [t1, t1ce, t2, flair], "label": seg}, ...], "validation": [...]}``
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    labelled = [s for s in subjects if s.label]
    if len(labelled) < 2:
        raise DataListError(f"need at least 2 labelled subjects below {base_dir}, found {len(labelled)}")
    order = np.random.default_rng(seed).permutation(len(labelled))
    n_val = min(max(1, int(round(val_fraction * len(labelled)))), len(labelled) - 1)

    def entry(s: BratsSubject) -> dict:
        return {
            "subject": s.subject_id,
            "image": [os.path.relpath(p, base_dir) for p in s.images],
            "label": os.path.relpath(s.label, base_dir),
        }

    val = sorted(order[:n_val].tolist())
    train = sorted(order[n_val:].tolist())
    return {
        "name": "BraTS",
        "modality": {str(i): m.upper() for i, m in enumerate(MODALITIES)},
        "labels": {"0": "background", "1": "necrotic core", "2": "oedema", "4": "enhancing tumour"},
        "training": [entry(labelled[i]) for i in train],
        "validation": [entry(labelled[i]) for i in val],
    }


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
        ``(training, validation)`` lists of ``{"image": [4 paths], "label": path}`` with absolute paths.

    Raises:
        DataListError: naming the file that is missing, unreadable or malformed.
        DataPathError: (a DataListError) naming the entry whose path leaves ``data_root``.
    """
    content = read_json_object(datalist_path, "datalist")
    lists = []
    for key in ("training", "validation"):
        items = content.get(key)
        if not isinstance(items, list) or not items:
            raise DataListError(f"datalist {datalist_path} needs a non-empty list under {key!r}")
        resolved = []
        for n, item in enumerate(items):
            images = item.get("image") if isinstance(item, dict) else None
            label = item.get("label") if isinstance(item, dict) else None
            if not isinstance(images, list) or len(images) != len(MODALITIES) or not isinstance(label, str):
                raise DataListError(
                    f"datalist {datalist_path}: {key}[{n}] must have 'image' (a list of {len(MODALITIES)} "
                    f"paths in the order {list(MODALITIES)}) and 'label' (a path), got {item!r}"
                )
            where = f"datalist {datalist_path}: {key}[{n}]"
            entry = {
                "image": [path_in_data_root(data_root, p, f"{where} image {m}") for m, p in zip(MODALITIES, images)],
                "label": path_in_data_root(data_root, label, f"{where} label"),
            }
            if check_files:
                for path in entry["image"] + [entry["label"]]:
                    if not os.path.isfile(path):
                        raise DataListError(f"{where} names a missing file: {path}")
            resolved.append(entry)
        lists.append(resolved)
    return lists[0], lists[1]


def write_data_config(site_dir: str, data_root: str, datalist: str) -> str:
    """Write ``data_config.json`` (see :mod:`medflare.data.site_data_config`) into ``site_dir``."""
    path = os.path.join(site_dir, "data_config.json")
    with open(path, "w") as f:
        json.dump({"data_root": data_root, "datalist": datalist}, f, indent=2)
    return path
