"""What a BraTS subject's volumes must hold before a site trains on them.

MONAI's transforms train on whatever loads: a label volume with a 3 or a 0.5 in it, a label on
another voxel grid or a NaN voxel in one modality all produce an update (or fail rounds later
as "training diverged", or with a message naming a transform instead of the file). These checks
run once, when the trainer loads its data and when ``medflare site install`` is run, and refuse
a subject with a :class:`VolumeCheckError` naming the subject, the modality, the file, what was
found and what is allowed:

* every file loads with nibabel (a truncated ``.nii.gz`` is named, not a MONAI transform);
* every volume is 3-D with no zero-length axis (a 4-D ``(x, y, z, 4)`` image, MSD Task01, in
  place of the four modality files);
* the four modalities and the label share one shape and one affine (within
  :data:`AFFINE_TOLERANCE`, in mm and direction cosines);
* every image voxel is finite;
* the label is integer-valued (an integer-valued float volume is accepted) and within the
  values of the entry's ``"label_convention"`` (:data:`BRATS_LABELS` for ``brats2021``, the
  default; 0-3 for ``brats2023`` and ``msd_task01``).

Headers are compared before any voxel is read, so a mismatched grid costs no voxel read. Each
file's voxels are read once per process: a file that passed is remembered by its resolved path,
size and modification time, so a second trainer on the same data (the site-only model) or a
rebuilt trainer does not read it again, and a file changed since is checked again.
"""

from __future__ import annotations

import os
import threading
from typing import Mapping, Sequence

import numpy as np

from medflare.data.data_errors import DataListError
from medflare.data.modality_names import MODALITIES
from medflare.data.tumour_label_conventions import DEFAULT_CONVENTION, LabelConvention, get_convention

__all__ = [
    "AFFINE_TOLERANCE",
    "BRATS_LABELS",
    "VolumeCheckError",
    "check_brats_subject",
    "check_brats_subjects",
    "forget_checked_files",
]

#: Label values of the BraTS 2018-2021 challenges: background, necrotic core, oedema, enhancing tumour.
BRATS_LABELS = (0, 1, 2, 4)

#: Largest difference allowed between two volumes' affine entries (mm for the translation).
AFFINE_TOLERANCE = 1e-3

_TITLES = {"brats2021": "BraTS", "brats2023": "BraTS 2023", "msd_task01": "MSD Task01"}

_checked: dict[tuple, tuple] = {}  # (role, realpath, size, mtime_ns) -> (shape, affine) of a file that passed
_checked_lock = threading.Lock()


class VolumeCheckError(DataListError):
    """A subject's image or label volume is unreadable, of the wrong shape or grid, or holds
    values it must not."""


def forget_checked_files() -> None:
    """Drop the record of files that passed, so the next check reads them again."""
    with _checked_lock:
        _checked.clear()


def check_brats_subjects(entries: Sequence[Mapping]) -> None:
    """:func:`check_brats_subject` on every entry of a loaded datalist, in order.

    Raises:
        VolumeCheckError: for the first subject that fails.
    """
    for entry in entries:
        check_brats_subject(entry)


def check_brats_subject(entry: Mapping) -> None:
    """Check one subject ``{"image": [t1, t1ce, t2, flair], "label": seg}`` (absolute paths, as
    :func:`~medflare.data.brats_layout.load_datalist` returns them; ``"subject"`` optional).

    ``"image"`` may instead be one 4-D path ``(x, y, z, 4)`` (MSD Task01). The label values
    allowed are those of the entry's ``"label_convention"``
    (:mod:`medflare.data.tumour_label_conventions`; ``brats2021`` when absent).

    Raises:
        VolumeCheckError: naming the subject, the modality or label, the file, what was found
            and what is allowed.
    """
    subject = entry.get("subject") or os.path.basename(os.path.dirname(entry["label"])) or entry["label"]
    try:
        convention = get_convention(entry.get("label_convention", DEFAULT_CONVENTION))
    except ValueError as e:
        raise VolumeCheckError(f"subject {subject}: {e}") from None
    images = entry["image"]
    if isinstance(images, str):
        files = [(f"4-D image ({len(MODALITIES)} channels)", images, 4)]
    elif len(images) != len(MODALITIES):
        raise VolumeCheckError(
            f"subject {subject}: {len(images)} image(s) {list(images)}; one per modality "
            f"{list(MODALITIES)} (or one 4-D image) is expected"
        )
    else:
        files = [(f"modality {m} image", path, 3) for m, path in zip(MODALITIES, images)]
    files.append(("label", entry["label"], 3))

    pending = []  # (role, path, nibabel image, cache key) of files not checked before
    grids = []
    for role, path, ndim in files:
        key = _cache_key(role, path, ndim, convention.values)
        with _checked_lock:
            known = _checked.get(key) if key is not None else None
        if known is not None:
            grids.append((role, path, ndim) + known)
            continue
        image = _load(role, path, subject)
        grids.append((role, path, ndim, tuple(image.shape), np.asarray(image.affine, dtype=np.float64)))
        pending.append((role, path, image, key))

    for role, path, ndim, shape, affine in grids:
        _check_header(role, path, subject, shape, affine, ndim)
    ref_role, ref_path, _, ref_shape, ref_affine = grids[0]
    for role, path, _, shape, affine in grids[1:]:
        _check_same_grid(subject, (role, path, shape, affine), (ref_role, ref_path, ref_shape, ref_affine))

    for role, path, image, key in pending:
        voxels = _voxels(role, path, subject, image)
        if role == "label":
            _check_label_values(path, subject, voxels, convention)
        else:
            _check_finite(role, path, subject, voxels)
        if key is not None:
            with _checked_lock:
                _checked[key] = (tuple(image.shape), np.asarray(image.affine, dtype=np.float64))


def _cache_key(role: str, path: str, ndim: int, label_values: tuple):
    try:
        stat = os.stat(path)
    except OSError:
        return None  # _load names the file
    # a label passes for the values of one convention: a pass under another is no pass
    kind = ("label", label_values) if role == "label" else ("image", ndim)
    return (kind, os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


def _load(role: str, path: str, subject: str):
    import nibabel as nib

    try:
        return nib.load(path)
    except Exception as e:  # noqa: BLE001 - any reason a file does not load is the file's fault
        raise VolumeCheckError(f"subject {subject}: cannot read {role} {path}: {type(e).__name__}: {e}") from None


def _voxels(role: str, path: str, subject: str, image) -> np.ndarray:
    try:
        # dataobj applies the header's scaling without get_fdata's cast of every volume to float64
        return np.asanyarray(image.dataobj)
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file fails here, not at load
        raise VolumeCheckError(f"subject {subject}: cannot read the voxels of {role} {path}: {type(e).__name__}: {e}") from None


def _check_header(role: str, path: str, subject: str, shape: tuple, affine: np.ndarray, ndim: int = 3) -> None:
    if ndim == 4:
        if len(shape) != 4 or shape[3] != len(MODALITIES):
            raise VolumeCheckError(
                f"subject {subject}: {role} {path} has shape {shape}; a 4-D image (x, y, z, {len(MODALITIES)}) "
                f"with one channel per modality {list(MODALITIES)} is expected"
            )
    elif len(shape) != 3:
        raise VolumeCheckError(
            f"subject {subject}: {role} {path} has shape {shape} ({len(shape)}-D); a 3-D volume is expected"
        )
    if min(shape) < 1:
        raise VolumeCheckError(f"subject {subject}: {role} {path} has shape {shape}, an empty volume; every axis needs >= 1 voxel")
    if not np.all(np.isfinite(affine)):
        raise VolumeCheckError(f"subject {subject}: {role} {path} has a non-finite affine {affine.tolist()}")


def _check_same_grid(subject: str, this: tuple, ref: tuple) -> None:
    role, path, shape, affine = this
    ref_role, ref_path, ref_shape, ref_affine = ref
    if shape[:3] != ref_shape[:3]:
        raise VolumeCheckError(
            f"subject {subject}: {role} {path} has shape {shape}, but {ref_role} {ref_path} has {ref_shape}; "
            "the four modalities and the label must share one voxel grid"
        )
    difference = float(np.max(np.abs(affine - ref_affine)))
    if difference > AFFINE_TOLERANCE:
        raise VolumeCheckError(
            f"subject {subject}: {role} {path} has affine {np.round(affine, 4).tolist()}, but {ref_role} {ref_path} "
            f"has {np.round(ref_affine, 4).tolist()} (largest difference {difference:.4g}, allowed {AFFINE_TOLERANCE}); "
            "the four modalities and the label must be co-registered on one grid"
        )


def _check_finite(role: str, path: str, subject: str, voxels: np.ndarray) -> None:
    if voxels.dtype.kind in "iub":
        return  # integers are always finite
    if voxels.dtype.kind != "f":
        raise VolumeCheckError(f"subject {subject}: {role} {path} has voxel type {voxels.dtype}; real numbers are expected")
    finite = np.isfinite(voxels)
    if not finite.all():
        raise VolumeCheckError(
            f"subject {subject}: {role} {path} has {_non_finite_summary(voxels, finite)}; every image voxel must be finite"
        )


def _check_label_values(path: str, subject: str, voxels: np.ndarray, convention: LabelConvention) -> None:
    allowed = list(convention.values)
    kind = voxels.dtype.kind
    if kind not in "iubf":
        raise VolumeCheckError(f"subject {subject}: label {path} has voxel type {voxels.dtype}; integer labels {allowed} are expected")
    if kind == "f":
        finite = np.isfinite(voxels)
        if not finite.all():
            raise VolumeCheckError(
                f"subject {subject}: label {path} has {_non_finite_summary(voxels, finite)}; labels must be integers in {allowed}"
            )
        fractional = voxels != np.round(voxels)
        if fractional.any():
            examples = np.unique(voxels[fractional])[:5].tolist()
            raise VolumeCheckError(
                f"subject {subject}: label {path} ({voxels.dtype}) has {int(fractional.sum())} non-integer voxel(s), "
                f"values such as {examples}; labels must be integers in {allowed} (an integer-valued float volume is accepted)"
            )
    low, high = voxels.min(), voxels.max()
    outside = low < allowed[0] or high > allowed[-1]
    if not outside:
        # the gaps between allowed values (3, for BraTS 2021): one comparison each, no sort of the volume
        outside = any((voxels == v).any() for v in range(int(low), int(high) + 1) if v not in allowed)
    if outside:
        bad = ~np.isin(voxels, allowed)
        found = [int(v) if float(v).is_integer() else float(v) for v in np.unique(voxels[bad])]
        raise VolumeCheckError(
            f"subject {subject}: label {path} has value(s) {found[:10]}{' ...' if len(found) > 10 else ''} in "
            f"{int(bad.sum())} voxel(s), outside the {_TITLES.get(convention.name, convention.name)} labels {allowed} "
            f"(label_convention {convention.name!r})"
        )


def _non_finite_summary(voxels: np.ndarray, finite: np.ndarray) -> str:
    nan = int(np.isnan(voxels).sum())
    inf = int((~finite).sum()) - nan
    first = tuple(int(i) for i in np.argwhere(~finite)[0])
    return f"{nan} NaN and {inf} infinite voxel(s), the first at voxel {first}"
