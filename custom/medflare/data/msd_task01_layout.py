"""The Medical Segmentation Decathlon's Task01_BrainTumour layout.

``Task01_BrainTumour/dataset.json`` lists the subjects; each has one 4-D NIfTI
``imagesTr/BRATS_001.nii.gz`` of shape ``(x, y, z, 4)`` and a label ``labelsTr/BRATS_001.nii.gz``.
Nothing is assumed: the channel order comes from the file's ``"modality"`` map (published as
``{"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}``) and the label convention from its
``"labels"`` map (published as 1 edema, 2 non-enhancing tumour, 3 enhancing tumour: the
``msd_task01`` convention of :mod:`medflare.data.tumour_label_conventions`). Every path in
``dataset.json`` must stay inside the task folder
(:func:`~medflare.data.data_root_paths.path_in_data_root`).

Reference: Antonelli et al., "The Medical Segmentation Decathlon", Nat. Commun. 13, 4128 (2022).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from medflare.data.brats_layout import BratsSubject, read_json_object
from medflare.data.data_errors import DataListError
from medflare.data.data_root_paths import path_in_data_root
from medflare.data.modality_names import channel_order
from medflare.data.tumour_label_conventions import convention_from_labels_map

__all__ = ["DATASET_FILE", "MsdTask", "read_msd_task01"]

DATASET_FILE = "dataset.json"


@dataclass(frozen=True)
class MsdTask:
    """What a task folder's ``dataset.json`` says: its subjects (each with one 4-D image path;
    test subjects have no label), the ``"modality"`` and ``"labels"`` maps, and the convention."""

    folder: str
    subjects: tuple
    modality: dict
    labels: dict
    label_convention: str
    channel_order: tuple


def read_msd_task01(folder: str) -> MsdTask:
    """Read ``folder/dataset.json`` and check that every file it names exists inside ``folder``.

    Raises:
        DataListError: naming ``dataset.json`` and what is wrong: a missing or non-object file, a
            ``"modality"`` map that does not name the four modalities, a ``"labels"`` map of no
            known convention, an empty or malformed ``"training"`` list, a path leaving the
            folder, a missing file, or two entries with one subject id.
    """
    path = os.path.join(folder, DATASET_FILE)
    content = read_json_object(path, "MSD dataset.json")
    where = f"MSD dataset.json {path}"
    for key in ("modality", "labels", "training"):
        if key not in content:
            raise DataListError(f"{where} has no {key!r}; an MSD task lists 'modality', 'labels', 'training' (and 'test')")
    order = channel_order(content["modality"], where)
    convention = convention_from_labels_map(content["labels"], where)
    training = content["training"]
    if not isinstance(training, list) or not training:
        raise DataListError(f"{where}: 'training' must be a non-empty list, got {training!r}")
    test = content.get("test", [])
    if not isinstance(test, list):
        raise DataListError(f"{where}: 'test' must be a list of image paths, got {test!r}")

    subjects = {}
    for n, item in enumerate(training):
        if not isinstance(item, dict) or not isinstance(item.get("image"), str) or not isinstance(item.get("label"), str):
            raise DataListError(f"{where}: training[{n}] must be {{'image': path, 'label': path}}, got {item!r}")
        image = _existing(folder, item["image"], f"{where}: training[{n}] image")
        label = _existing(folder, item["label"], f"{where}: training[{n}] label")
        _add(subjects, BratsSubject(_subject_id(image), (image,), label), where, f"training[{n}]")
    for n, item in enumerate(test):
        if isinstance(item, dict):
            item = item.get("image")
        if not isinstance(item, str):
            raise DataListError(f"{where}: test[{n}] must be an image path, got {item!r}")
        image = _existing(folder, item, f"{where}: test[{n}]")
        _add(subjects, BratsSubject(_subject_id(image), (image,), None), where, f"test[{n}]")
    return MsdTask(
        folder,
        tuple(sorted(subjects.values(), key=lambda s: s.subject_id)),
        {str(k): v for k, v in content["modality"].items()},
        {str(k): v for k, v in content["labels"].items()},
        convention,
        order,
    )


def _existing(folder: str, path: str, where: str) -> str:
    resolved = path_in_data_root(folder, path, where)
    if not os.path.isfile(resolved):
        raise DataListError(f"{where} names a missing file: {resolved}")
    return resolved


def _subject_id(image: str) -> str:
    name = os.path.basename(image)
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _add(subjects: dict, subject: BratsSubject, where: str, entry: str) -> None:
    if subject.subject_id in subjects:
        raise DataListError(f"{where}: {entry} names subject {subject.subject_id!r} a second time ({subject.images[0]})")
    subjects[subject.subject_id] = subject
