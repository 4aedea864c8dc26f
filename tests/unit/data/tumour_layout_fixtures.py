"""Tiny brain-tumour data folders of each layout, written with nibabel into a test's tmp_path.

Volumes are 12 x 12 x 12 (SHAPE); every labelled subject's label holds each of its
convention's tumour values in a few voxels, so the regions are hand-checkable.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np

SHAPE = (12, 12, 12)
AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])
LEGACY_MODALITIES = ("t1", "t1ce", "t2", "flair")
BRATS2023_SUFFIXES = ("t1n", "t1c", "t2w", "t2f")
MSD_MODALITY = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
MSD_LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}


def save(path, array, affine=AFFINE) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), path)
    return path


def label_volume(values) -> np.ndarray:
    """Background, then a 2x2x2 block of each value along the diagonal."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    for n, v in enumerate(values):
        label[2 + 2 * n : 4 + 2 * n, 2 + 2 * n : 4 + 2 * n, 2 + 2 * n : 4 + 2 * n] = v
    return label


def image_volume(channel: int) -> np.ndarray:
    """A brain-like volume whose intensity names its modality: 10 * (channel + 1) inside a box."""
    image = np.zeros(SHAPE, dtype=np.float32)
    image[1:11, 1:11, 1:11] = 10.0 * (channel + 1)
    return image


def legacy_subject(root, sid, label_values=(1, 2, 4), with_label=True, modalities=LEGACY_MODALITIES, ext=".nii.gz"):
    folder = os.path.join(str(root), sid)
    for n, m in enumerate(modalities):
        save(os.path.join(folder, f"{sid}_{m}{ext}"), image_volume(LEGACY_MODALITIES.index(m)))
    if with_label:
        save(os.path.join(folder, f"{sid}_seg{ext}"), label_volume(label_values))
    return folder


def brats2023_subject(root, sid, label_values=(1, 2, 3), with_label=True, suffixes=BRATS2023_SUFFIXES):
    folder = os.path.join(str(root), sid)
    for s in suffixes:
        save(os.path.join(folder, f"{sid}-{s}.nii.gz"), image_volume(BRATS2023_SUFFIXES.index(s)))
    if with_label:
        save(os.path.join(folder, f"{sid}-seg.nii.gz"), label_volume(label_values))
    return folder


def msd_image(modality=MSD_MODALITY, channels=4) -> np.ndarray:
    """(x, y, z, channels): channel c holds the constant of the modality it is named as."""
    order = {"flair": 3, "t1w": 0, "t1gd": 1, "t2w": 2}
    image = np.zeros(SHAPE + (channels,), dtype=np.float32)
    for c in range(channels):
        image[..., c] = image_volume(order.get(str(modality.get(str(c), "")).lower(), c))
    return image


def msd_task(root, n_train=3, n_test=2, channels=4, label_values=(1, 2, 3), **overrides):
    """``root/Task01_BrainTumour`` with ``n_train`` labelled and ``n_test`` test subjects, images
    in the published channel order :data:`MSD_MODALITY`; ``overrides`` replace top-level keys of
    dataset.json (``None`` deletes one)."""
    modality, labels = MSD_MODALITY, MSD_LABELS
    task = os.path.join(str(root), "Task01_BrainTumour")
    training, test = [], []
    for i in range(1, n_train + n_test + 1):
        sid = f"BRATS_{i:03d}"
        if i <= n_train:
            save(os.path.join(task, "imagesTr", f"{sid}.nii.gz"), msd_image(modality, channels))
            save(os.path.join(task, "labelsTr", f"{sid}.nii.gz"), label_volume(label_values))
            training.append({"image": f"./imagesTr/{sid}.nii.gz", "label": f"./labelsTr/{sid}.nii.gz"})
        else:
            save(os.path.join(task, "imagesTs", f"{sid}.nii.gz"), msd_image(modality, channels))
            test.append(f"./imagesTs/{sid}.nii.gz")
    content = {
        "name": "BRATS",
        "tensorImageSize": "4D",
        "modality": modality,
        "labels": labels,
        "numTraining": n_train,
        "numTest": n_test,
        "training": training,
        "test": test,
    }
    for key, value in overrides.items():
        if value is None:
            content.pop(key, None)
        else:
            content[key] = value
    with open(os.path.join(task, "dataset.json"), "w") as f:
        json.dump(content, f)
    return task
