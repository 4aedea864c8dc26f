"""The steps one BraTS-like case goes through: read, check, resample, crop/pad, normalise, write.

Input: four 3-D volumes (one per modality, in the datalist's channel order) or one 4-D volume
with the four modalities on its last axis (MSD ``Task01_BrainTumour``), and a label. Headers
are checked before voxels are read (:mod:`.case_qc` names the reasons). Output, for a case that
passes: ``<out>/<case>/<case>_{t1,t1ce,t2,flair}.nii.gz`` (float32) and ``<case>_seg.nii.gz``
(uint8), in :data:`~medflare.data.brats_layout.MODALITIES` order, the form
:func:`~medflare.data.brats_layout.load_datalist` reads.

Resampling uses MONAI's ``Spacing`` (bilinear for images, nearest for the label) on the CPU,
cropping/padding MONAI's ``ResizeWithPadOrCrop`` (centred, zeros). z-score normalisation
(:math:`x' = (x - \\mu_b) / \\sigma_b` over the brain :math:`b`, the voxels where any modality
is non-zero; 0 outside) is computed in float64 and written as float32. nibabel writes gzip
with a zero timestamp, so the same input and parameters give byte-identical files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from medflare.data.brats_layout import MODALITIES
from medflare.data.brats_volume_checks import AFFINE_TOLERANCE
from medflare.preparation.case_qc import CaseFailed, CaseVerdict
from medflare.preparation.file_hashes import sha256_file
from medflare.preparation.recipe import SegmentationPreparation

__all__ = ["SegmentationCase", "prepare_segmentation_case"]


@dataclass
class SegmentationCase:
    """One datalist entry, paths absolute and inside the data root.

    ``channel_order[i]`` is the index, in ``images`` (or the 4-D image's last axis), of
    ``MODALITIES[i]``; None when the datalist has no ``"modality"`` map (four paths are then in
    ``MODALITIES`` order, as :func:`~medflare.data.brats_layout.load_datalist` reads them; a 4-D
    image fails: the order of its channels is unknown)."""

    case_id: str
    split: str
    images: list
    label: str
    channel_order: Optional[Sequence[int]] = None
    extra: dict = field(default_factory=dict)


def _load(path: str, role: str):
    import nibabel as nib

    try:
        return nib.load(path)
    except Exception as e:  # noqa: BLE001 - any reason a file does not load is the file's fault
        raise CaseFailed("unreadable_file", f"cannot read {role} {path}: {type(e).__name__}: {e}") from None


def _voxels(image, role: str, path: str) -> np.ndarray:
    try:
        return np.asanyarray(image.dataobj)
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file fails here, not at load
        raise CaseFailed("unreadable_file", f"cannot read the voxels of {role} {path}: {type(e).__name__}: {e}") from None


def _spacing(affine: np.ndarray) -> tuple:
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))


def _headers(case: SegmentationCase) -> list:
    """``[(role, path, image, spatial shape)]`` of the images (4 roles) and the label, headers checked."""
    if len(case.images) == 1:
        if case.channel_order is None:
            raise CaseFailed(
                "malformed_entry",
                f"one 4-D image {case.images[0]} and no 'modality' map in the datalist: the order of its channels "
                "is unknown (add e.g. {\"0\": \"FLAIR\", \"1\": \"T1w\", \"2\": \"t1gd\", \"3\": \"T2w\"})",
            )
        image = _load(case.images[0], "4-D image")
        if len(image.shape) != 4 or image.shape[3] != len(MODALITIES):
            raise CaseFailed(
                "modality_count",
                f"one image {case.images[0]} of shape {tuple(image.shape)}; one path must be a 4-D volume with "
                f"{len(MODALITIES)} modalities on its last axis, else give one path per modality {list(MODALITIES)}",
            )
        headers = [("image", case.images[0], image, tuple(image.shape[:3]))]
    elif len(case.images) == len(MODALITIES):
        headers = []
        order = tuple(range(len(MODALITIES))) if case.channel_order is None else tuple(case.channel_order)
        for i, path in enumerate(case.images):
            role = f"modality {MODALITIES[order.index(i)]} image"
            image = _load(path, role)
            if len(image.shape) != 3:
                raise CaseFailed("wrong_dimensions", f"{role} {path} has shape {tuple(image.shape)}; a 3-D volume is expected")
            headers.append((role, path, image, tuple(image.shape)))
    else:
        raise CaseFailed(
            "modality_count",
            f"{len(case.images)} image path(s); one per modality {list(MODALITIES)} (or one 4-D volume) is expected",
        )
    return headers


def _check_grids(headers: list, recipe: SegmentationPreparation, verdict: CaseVerdict) -> None:
    role0, path0, image0, shape0 = headers[0]
    affine0 = np.asarray(image0.affine, dtype=np.float64)
    if min(shape0) < 1 or not np.all(np.isfinite(affine0)):
        raise CaseFailed("wrong_dimensions", f"{role0} {path0} has shape {shape0} and affine {affine0.tolist()}; an empty or non-finite grid")
    for role, path, image, shape in headers[1:]:
        code = "label_grid_mismatch" if role == "label" else "grid_mismatch"
        if shape != shape0:
            raise CaseFailed(code, f"{role} {path} has shape {shape}, but {role0} {path0} has {shape0}; one voxel grid is expected")
        difference = float(np.max(np.abs(np.asarray(image.affine, dtype=np.float64) - affine0)))
        if not difference <= AFFINE_TOLERANCE:
            raise CaseFailed(
                code, f"{role} {path} has another affine than {role0} {path0} (largest difference {difference:.4g}, allowed {AFFINE_TOLERANCE})"
            )
    spacing = _spacing(affine0)
    low, high = recipe.spacing_range
    if not all(low <= s <= high for s in spacing):
        verdict.fail("spacing_out_of_range", f"{path0}: voxel size {[round(s, 4) for s in spacing]} mm, outside [{low}, {high}] mm")
    if min(spacing) > 0 and max(spacing) / min(spacing) > recipe.max_anisotropy:
        verdict.fail(
            "anisotropy",
            f"{path0}: voxel size {[round(s, 4) for s in spacing]} mm, anisotropy {max(spacing) / min(spacing):.3g} "
            f"above max_anisotropy {recipe.max_anisotropy:g}",
        )


def _channels(headers: list, case: SegmentationCase) -> list:
    """The four modality volumes as float arrays, in MODALITIES order."""
    images = [h for h in headers if h[0] != "label"]
    order = tuple(range(len(MODALITIES))) if case.channel_order is None else tuple(case.channel_order)
    if len(images) == 1:
        role, path, image, _ = images[0]
        data = _voxels(image, role, path)
        return [(f"modality {m} image", path, data[..., order[i]]) for i, m in enumerate(MODALITIES)]
    channels = []
    for i in range(len(MODALITIES)):
        role, path, image, _ = images[order[i]]
        channels.append((role, path, _voxels(image, role, path)))
    return channels


def _check_intensities(channels: list, recipe: SegmentationPreparation, verdict: CaseVerdict) -> None:
    for role, path, data in channels:
        if data.dtype.kind not in "iubf":
            verdict.fail("unreadable_file", f"{role} {path} has voxel type {data.dtype}; real numbers are expected")
            continue
        finite = np.isfinite(data) if data.dtype.kind == "f" else None
        if finite is not None and not finite.all():
            nan = int(np.isnan(data).sum())
            verdict.fail("non_finite", f"{role} {path} has {nan} NaN and {int((~finite).sum()) - nan} infinite voxel(s)")
            continue
        low, high = data.min(), data.max()
        if low == high:
            verdict.fail("constant_image", f"{role} {path} holds one value ({float(low):g}) in every voxel")
        elif low < 0 and not recipe.allow_negative_intensity:
            verdict.fail(
                "negative_intensity",
                f"{role} {path} has {int((data < 0).sum())} negative voxel(s) (min {float(low):.4g}); MR magnitude images "
                "are non-negative (set allow_negative_intensity for data normalised elsewhere)",
            )


def _check_label(label: np.ndarray, path: str, allowed: Sequence[int], verdict: CaseVerdict) -> None:
    if label.dtype.kind not in "iubf":
        verdict.fail("label_values", f"label {path} has voxel type {label.dtype}; integer labels {list(allowed)} are expected")
        return
    if label.dtype.kind == "f" and not (np.isfinite(label).all() and np.array_equal(label, np.round(label))):
        verdict.fail("label_values", f"label {path} has non-integer or non-finite values; integer labels {list(allowed)} are expected")
        return
    values = np.unique(label)
    bad = [int(v) for v in values if v not in allowed]
    if bad:
        verdict.fail("label_values", f"label {path} has value(s) {bad[:10]} outside the convention's labels {list(allowed)}")
    elif not np.any(label != 0):
        verdict.warn("empty_tumour", f"label {path} has no tumour voxel (only background)")


def _transform(volumes: np.ndarray, label: np.ndarray, affine: np.ndarray, recipe: SegmentationPreparation):
    """Resample and crop/pad the ``(4, X, Y, Z)`` images and the label; returns them and the new affine."""
    if recipe.target_spacing is None and recipe.crop_pad is None:
        return volumes, label, affine
    import torch
    from monai.data import MetaTensor
    from monai.transforms import ResizeWithPadOrCrop, Spacing

    images = MetaTensor(torch.from_numpy(np.ascontiguousarray(volumes, dtype=np.float32)), affine=torch.from_numpy(affine))
    labels = MetaTensor(torch.from_numpy(np.ascontiguousarray(label[None], dtype=np.float32)), affine=torch.from_numpy(affine))
    if recipe.target_spacing is not None:
        images = Spacing(pixdim=recipe.target_spacing, mode="bilinear")(images)
        labels = Spacing(pixdim=recipe.target_spacing, mode="nearest")(labels)
    if recipe.crop_pad is not None:
        images = ResizeWithPadOrCrop(recipe.crop_pad)(images)
        labels = ResizeWithPadOrCrop(recipe.crop_pad)(labels)
    out_affine = np.asarray(images.affine, dtype=np.float64)
    return images.numpy(), np.rint(labels.numpy()[0]), out_affine


def _zscore(volumes: np.ndarray, verdict: CaseVerdict) -> np.ndarray:
    brain = np.any(volumes != 0, axis=0)
    out = np.zeros(volumes.shape, dtype=np.float32)
    for i, modality in enumerate(MODALITIES):
        values = volumes[i][brain].astype(np.float64)
        std = float(values.std()) if values.size else 0.0
        if not std > 0:
            verdict.fail("constant_image", f"modality {modality} is constant over the brain after resampling")
            continue
        out[i][brain] = ((values - values.mean()) / std).astype(np.float32)
    return out


def _write(array: np.ndarray, affine: np.ndarray, path: str, dtype) -> str:
    import nibabel as nib

    image = nib.Nifti1Image(np.ascontiguousarray(array, dtype=dtype), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)
    return sha256_file(path)


def prepare_segmentation_case(
    case: SegmentationCase, recipe: SegmentationPreparation, allowed_labels: Sequence[int], out_root: str
) -> tuple[CaseVerdict, dict]:
    """Check one case and, when it passes, write its prepared files under ``out_root``.

    Returns:
        ``(verdict, record)``: ``record`` holds ``shape``, ``spacing`` (of the input),
        ``output_shape``, ``output_spacing`` and ``outputs`` (``[{role, path, sha256}]``,
        paths relative to ``out_root``; empty when the case fails).
    """
    verdict = CaseVerdict(case.case_id)
    record: dict = {"shape": None, "spacing": None, "output_shape": None, "output_spacing": None, "outputs": []}
    try:
        headers = _headers(case)
        label_image = _load(case.label, "label")
        headers.append(("label", case.label, label_image, tuple(label_image.shape)))
        record["shape"], record["spacing"] = list(headers[0][3]), [round(s, 6) for s in _spacing(np.asarray(headers[0][2].affine))]
        _check_grids(headers, recipe, verdict)
        channels = _channels(headers, case)
        _check_intensities(channels, recipe, verdict)
        label = _voxels(label_image, "label", case.label)
        _check_label(label, case.label, allowed_labels, verdict)
    except CaseFailed as failed:
        verdict.failures.append(failed.finding)
    if verdict.failures:
        return verdict, record
    affine = np.asarray(headers[0][2].affine, dtype=np.float64)
    volumes = np.stack([np.asarray(c[2], dtype=np.float32) for c in channels])
    volumes, label, affine = _transform(volumes, np.asarray(label), affine, recipe)
    if recipe.normalise == "zscore":
        volumes = _zscore(volumes, verdict)
        if verdict.failures:
            return verdict, record
    record["output_shape"], record["output_spacing"] = list(volumes.shape[1:]), [round(s, 6) for s in _spacing(affine)]
    folder = os.path.join(out_root, case.case_id)
    os.makedirs(folder, exist_ok=True)
    for i, modality in enumerate(MODALITIES):
        relative = f"{case.case_id}/{case.case_id}_{modality}.nii.gz"
        record["outputs"].append({"role": modality, "path": relative, "sha256": _write(volumes[i], affine, os.path.join(out_root, relative), np.float32)})
    relative = f"{case.case_id}/{case.case_id}_seg.nii.gz"
    record["outputs"].append({"role": "label", "path": relative, "sha256": _write(label, affine, os.path.join(out_root, relative), np.uint8)})
    return verdict, record
