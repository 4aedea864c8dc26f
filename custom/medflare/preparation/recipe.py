"""What a preparation is: a name, the version of medflare's preparation code, and its parameters.

Two sites ran "the same preparation" when the three agree. :data:`PREPARATION_VERSION` is
bumped whenever a step changes the bytes it writes for the same input and parameters (a
different interpolation, rounding, file layout), so a job can require a version range
(:mod:`medflare.preparation.verification`). The parameters are hashed over their canonical
JSON (keys sorted, no whitespace): :math:`h = \\mathrm{sha256}(\\mathrm{json}(p))`, so a
job can pin them exactly without restating them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Optional, Sequence

from medflare.privacy.argument_checks import check_int, check_real

__all__ = [
    "BIT_DEPTHS",
    "NORMALISATIONS",
    "PREPARATION_VERSION",
    "SEGMENTATION_PREPARATION",
    "SegmentationPreparation",
    "XRAY_PREPARATION",
    "XRAY_SCALINGS",
    "XrayPreparation",
    "parameters_hash",
]

#: semantic version of medflare's preparation steps; bumped whenever they change their output
PREPARATION_VERSION = "1.0.0"

SEGMENTATION_PREPARATION = "medflare-brats-prep"
XRAY_PREPARATION = "medflare-xray-prep"

NORMALISATIONS = ("zscore", "none")
XRAY_SCALINGS = ("percentile", "minmax")
BIT_DEPTHS = (8, 16)


def parameters_hash(parameters: dict) -> str:
    """sha256 (hex) of the canonical JSON of ``parameters`` (keys sorted, no whitespace)."""
    text = json.dumps(parameters, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _triple(name: str, value, kind: str) -> Optional[tuple]:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"{name} must be null or three {kind}s, got {value!r}")
    if kind == "int":
        return tuple(check_int(f"{name}[{i}]", v, 1, 4096) for i, v in enumerate(value))
    return tuple(check_real(f"{name}[{i}]", v, 0.05, 20.0) for i, v in enumerate(value))


@dataclass(frozen=True)
class SegmentationPreparation:
    """Preparation of BraTS-like multi-modal MR volumes (four modalities and a label).

    Args:
        target_spacing: voxel size in mm to resample to (images bilinear, label nearest), each in
            [0.05, 20]; None keeps each case's grid.
        normalise: ``"zscore"`` (per modality over the brain, the voxels where any modality is
            non-zero; background stays 0) or ``"none"``.
        crop_pad: output shape in voxels (centre crop / zero pad after resampling), each in
            [1, 4096]; None keeps the shape.
        spacing_range: ``(low, high)`` mm every input voxel edge must lie in (QC).
        max_anisotropy: largest ratio of the longest to the shortest voxel edge (QC), >= 1.
        allow_negative_intensity: MR magnitude images are non-negative; a negative voxel fails
            QC unless this is true (data already normalised elsewhere).
    """

    target_spacing: Optional[Sequence[float]] = None
    normalise: str = "zscore"
    crop_pad: Optional[Sequence[int]] = None
    spacing_range: Sequence[float] = (0.2, 8.0)
    max_anisotropy: float = 4.0
    allow_negative_intensity: bool = False

    name = SEGMENTATION_PREPARATION
    version = PREPARATION_VERSION

    def __post_init__(self):
        object.__setattr__(self, "target_spacing", _triple("target_spacing", self.target_spacing, "float"))
        object.__setattr__(self, "crop_pad", _triple("crop_pad", self.crop_pad, "int"))
        if self.normalise not in NORMALISATIONS:
            raise ValueError(f"normalise must be one of {list(NORMALISATIONS)}, got {self.normalise!r}")
        spacing = self.spacing_range
        if not isinstance(spacing, (list, tuple)) or len(spacing) != 2:
            raise ValueError(f"spacing_range must be [low, high] in mm, got {spacing!r}")
        low = check_real("spacing_range[0]", spacing[0], 0.0, 100.0, low_open=True)
        high = check_real("spacing_range[1]", spacing[1], 0.0, 100.0, low_open=True)
        if low >= high:
            raise ValueError(f"spacing_range must have low < high, got {spacing!r}")
        object.__setattr__(self, "spacing_range", (low, high))
        object.__setattr__(self, "max_anisotropy", check_real("max_anisotropy", self.max_anisotropy, 1.0, 1000.0))
        if not isinstance(self.allow_negative_intensity, bool):
            raise TypeError(f"allow_negative_intensity must be true or false, got {self.allow_negative_intensity!r}")

    def parameters(self) -> dict:
        """The JSON form recorded in the manifest and hashed."""
        return {
            "target_spacing": None if self.target_spacing is None else list(self.target_spacing),
            "normalise": self.normalise,
            "crop_pad": None if self.crop_pad is None else list(self.crop_pad),
            "spacing_range": list(self.spacing_range),
            "max_anisotropy": self.max_anisotropy,
            "allow_negative_intensity": self.allow_negative_intensity,
            "output": "nifti-float32-gz",
        }

    def parameters_hash(self) -> str:
        return parameters_hash(self.parameters())


@dataclass(frozen=True)
class XrayPreparation:
    """Preparation of chest radiographs named by an outcome table.

    Args:
        size: output edge in pixels (square, bilinear with antialiasing), in [8, 4096]; None
            keeps each image's size.
        scaling: ``"percentile"`` (clip to the ``percentiles`` of the image, then scale to
            [0, 1]) or ``"minmax"`` (the image's own range to [0, 1]).
        percentiles: ``(low, high)`` with 0 <= low < high <= 100, used by ``"percentile"``.
        bit_depth: 8 or 16 (greyscale PNG written).
        min_input_size: smallest input edge in pixels accepted by QC, >= 8.
        image_column: the table's column of image paths.
    """

    size: Optional[int] = 256
    scaling: str = "percentile"
    percentiles: Sequence[float] = (0.5, 99.5)
    bit_depth: int = 16
    min_input_size: int = 16
    image_column: str = "image"

    name = XRAY_PREPARATION
    version = PREPARATION_VERSION

    def __post_init__(self):
        if self.size is not None:
            check_int("size", self.size, 8, 4096)
        if self.scaling not in XRAY_SCALINGS:
            raise ValueError(f"scaling must be one of {list(XRAY_SCALINGS)}, got {self.scaling!r}")
        p = self.percentiles
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise ValueError(f"percentiles must be [low, high] in [0, 100], got {p!r}")
        low, high = check_real("percentiles[0]", p[0], 0.0, 100.0), check_real("percentiles[1]", p[1], 0.0, 100.0)
        if low >= high:
            raise ValueError(f"percentiles must have low < high, got {p!r}")
        object.__setattr__(self, "percentiles", (low, high))
        if isinstance(self.bit_depth, bool) or self.bit_depth not in BIT_DEPTHS:
            raise ValueError(f"bit_depth must be one of {list(BIT_DEPTHS)}, got {self.bit_depth!r}")
        check_int("min_input_size", self.min_input_size, 8, 4096)
        if not isinstance(self.image_column, str) or not self.image_column or self.image_column in ("case_id", "split"):
            raise ValueError(f"image_column must be a column name other than case_id and split, got {self.image_column!r}")

    def parameters(self) -> dict:
        return {
            "size": self.size,
            "scaling": self.scaling,
            "percentiles": list(self.percentiles) if self.scaling == "percentile" else None,
            "bit_depth": self.bit_depth,
            "min_input_size": self.min_input_size,
            "image_column": self.image_column,
            "output": f"png-{self.bit_depth}bit",
        }

    def parameters_hash(self) -> str:
        return parameters_hash(self.parameters())
