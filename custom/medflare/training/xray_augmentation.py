"""Training-time augmentation of chest radiographs: small random affine, contrast and brightness.

:class:`XrayAugmentation` is a seeded MONAI transform of one ``(1, H, W)`` image scaled to
[0, 1] (:func:`medflare.data.outcome_table.read_xray`). :func:`parse_augmentation` turns the
job's ``augmentation`` argument (null/false, true, or a mapping of the settings below) into
:class:`AugmentationSettings`, refusing a value outside its range. The trainer applies it to
training batches only, never when scoring.

Each transform applies independently with probability ``probability``:

* **affine** (MONAI ``RandAffine``): rotation by a uniform angle in
  :math:`\\pm` ``rotation_degrees``, scaling of each axis by :math:`1 + u`,
  :math:`u \\sim U(\\pm` ``scale_fraction`` :math:`)`, translation by up to
  ``translation_fraction`` of the image size; borders are padded by repeating the edge;
* **contrast** (``RandScaleIntensityFixedMean``): :math:`v \\mapsto \\bar v + (1 + u)(v - \\bar v)`,
  :math:`u \\sim U(\\pm` ``contrast_fraction`` :math:`)` around the image mean :math:`\\bar v`;
* **brightness** (``RandShiftIntensity``): :math:`v \\mapsto v + u`, :math:`u \\sim U(\\pm` ``brightness_shift`` :math:`)`.

No horizontal flip by default: a chest radiograph is not left-right symmetric. The heart,
aortic arch and gastric bubble lie on the patient's left, and a flipped film shows
dextrocardia (situs inversus), a finding of its own; the side marker and the position of a
lesion also carry label information (e.g. a left-sided effusion). ``horizontal_flip: true``
exists for studies that decide otherwise; it flips with probability 1/2.

Defaults (rotation 10°, scale 10 %, translation 5 %, contrast 10 %, brightness 0.05) are the
small perturbations used for CheXpert-style classifiers; the ranges allowed are bounded so a
typo (``rotation_degrees: 100``) is refused rather than trained on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

__all__ = ["AugmentationSettings", "AUGMENTATION_RANGES", "XrayAugmentation", "parse_augmentation"]

#: each numeric setting's allowed closed interval
AUGMENTATION_RANGES = {
    "rotation_degrees": (0.0, 45.0),
    "scale_fraction": (0.0, 0.5),
    "translation_fraction": (0.0, 0.25),
    "contrast_fraction": (0.0, 0.5),
    "brightness_shift": (0.0, 0.5),
    "probability": (0.0, 1.0),
}


@dataclass(frozen=True)
class AugmentationSettings:
    """The augmentation of training images; see the module docstring for each setting."""

    rotation_degrees: float = 10.0
    scale_fraction: float = 0.1
    translation_fraction: float = 0.05
    contrast_fraction: float = 0.1
    brightness_shift: float = 0.05
    probability: float = 0.5
    horizontal_flip: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def _setting(key: str, value) -> float:
    low, high = AUGMENTATION_RANGES[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"augmentation.{key} must be a finite number in [{low}, {high}], got {value!r}")
    return float(value)


def parse_augmentation(augmentation) -> Optional[AugmentationSettings]:
    """The job's ``augmentation`` argument as settings, or None for no augmentation.

    Args:
        augmentation: None or False (off), True (the defaults), a mapping of some settings
            (the others default), or :class:`AugmentationSettings`.

    Raises:
        ValueError: another type, an unknown key (naming the allowed ones), a value out of range
            (bool, NaN and inf are refused), or ``horizontal_flip`` not a bool.
    """
    if augmentation is None or augmentation is False:
        return None
    if augmentation is True:
        return AugmentationSettings()
    if isinstance(augmentation, AugmentationSettings):
        augmentation = augmentation.to_json()
    if not isinstance(augmentation, Mapping):
        raise ValueError(f"augmentation must be null, a bool or a mapping of settings, got {augmentation!r}")
    allowed = [f.name for f in fields(AugmentationSettings)]
    unknown = sorted(str(k) for k in augmentation if k not in allowed)
    if unknown:
        raise ValueError(f"augmentation has unknown setting(s) {unknown}; allowed: {allowed}")
    values = {}
    for key, value in augmentation.items():
        if key == "horizontal_flip":
            if not isinstance(value, bool):
                raise ValueError(f"augmentation.horizontal_flip must be true or false, got {value!r}")
            values[key] = value
        else:
            values[key] = _setting(key, value)
    return AugmentationSettings(**values)


class XrayAugmentation:
    """A seeded random augmentation of one ``(1, H, W)`` float image (a MONAI ``Randomizable``).

    Args:
        settings: what to apply.
        image_size: ``(H, W)`` of the images (the translation is a fraction of it).
        seed: seed of the random state (:meth:`set_random_state` re-seeds; the trainer's
            data-loader workers are re-seeded from the loader's seeded generator).

    Returns (when called): a plain ``torch.Tensor`` of the same shape, dtype float32, on the
    input's device.
    """

    def __init__(self, settings: AugmentationSettings, image_size: Sequence[int], seed: int = 0):
        from monai.transforms import RandAffine, RandFlip, RandScaleIntensityFixedMean, RandShiftIntensity

        if not isinstance(settings, AugmentationSettings):
            raise ValueError(f"settings must be AugmentationSettings, got {settings!r}")
        self.settings = settings
        self.image_size = tuple(image_size)
        p = settings.probability
        height, width = self.image_size
        self._transforms = [
            RandAffine(
                prob=p,
                rotate_range=(math.radians(settings.rotation_degrees),),
                scale_range=(settings.scale_fraction, settings.scale_fraction),
                translate_range=(settings.translation_fraction * height, settings.translation_fraction * width),
                padding_mode="border",
            ),
            RandScaleIntensityFixedMean(prob=p, factors=settings.contrast_fraction, fixed_mean=True),
            RandShiftIntensity(offsets=settings.brightness_shift, prob=p),
        ]
        if settings.horizontal_flip:
            self._transforms.append(RandFlip(prob=0.5, spatial_axis=1))  # axis 1 of (H, W): left-right
        self.set_random_state(seed)

    def set_random_state(self, seed: Optional[int] = None, state=None) -> "XrayAugmentation":
        """Seed every transform from one seed (MONAI's convention, used by its worker seeding)."""
        source = np.random.RandomState(seed) if state is None else state
        for transform in self._transforms:
            transform.set_random_state(seed=int(source.randint(2**31)))
        return self

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(image) or image.ndim != 3 or tuple(image.shape[1:]) != self.image_size:
            raise ValueError(f"XrayAugmentation takes a (1, {self.image_size[0]}, {self.image_size[1]}) tensor, got "
                             f"{getattr(image, 'shape', type(image).__name__)}")
        out = image
        for transform in self._transforms:
            out = transform(out)
        if hasattr(out, "as_tensor"):  # MONAI's MetaTensor
            out = out.as_tensor()
        return out.to(dtype=torch.float32)
