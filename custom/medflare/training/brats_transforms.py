"""MONAI transform chains for BraTS: four modalities in, TC / WT / ET channels out.

The label is turned into the three overlapping BraTS evaluation regions with MONAI's
``ConvertToMultiChannelBasedOnBratsClassesd``: tumour core (labels 1 and 4), whole tumour
(1, 2 and 4) and enhancing tumour (4). Intensities are z-normalised per channel over the
brain (non-zero voxels), which also removes sites' different scanner units.
"""

from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["REGIONS", "train_transforms", "val_transforms"]

#: Output channels, in order.
REGIONS = ("tc", "wt", "et")


def _load_chain(pixdim: Optional[Sequence[float]]) -> list:
    from monai import transforms as T

    chain = [
        T.LoadImaged(keys=["image", "label"], image_only=False),
        T.EnsureChannelFirstd(keys="image"),
        T.EnsureTyped(keys=["image", "label"]),
        T.ConvertToMultiChannelBasedOnBratsClassesd(keys="label"),
        T.CastToTyped(keys="label", dtype="float32"),
        T.Orientationd(keys=["image", "label"], axcodes="RAS"),
    ]
    if pixdim is not None:
        chain.append(T.Spacingd(keys=["image", "label"], pixdim=tuple(pixdim), mode=("bilinear", "nearest")))
    chain.append(T.NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True))
    return chain


def train_transforms(roi_size: Sequence[int], pixdim: Optional[Sequence[float]] = None, num_samples: int = 1):
    """Loading, normalisation (cacheable), then ``num_samples`` random crops of each subject, flips
    and intensity jitter (a subject's item is a list of ``num_samples`` crops)."""
    from monai import transforms as T

    return T.Compose(
        _load_chain(pixdim)
        + [
            T.SpatialPadd(keys=["image", "label"], spatial_size=tuple(roi_size)),
            # half the crops centred on tumour, half anywhere in the head: small tumours are still seen
            T.RandCropByPosNegLabeld(
                keys=["image", "label"], label_key="label", spatial_size=tuple(roi_size), pos=1, neg=1, num_samples=num_samples
            ),
            T.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
            T.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
            T.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2),
            T.RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
            T.RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
        ]
    )


def val_transforms(pixdim: Optional[Sequence[float]] = None):
    """Loading and normalisation only; the whole volume is scored by sliding windows."""
    from monai import transforms as T

    return T.Compose(_load_chain(pixdim))
