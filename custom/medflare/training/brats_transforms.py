"""MONAI transform chains for brain tumours: four modalities in, TC / WT / ET channels out.

The label is turned into the three overlapping evaluation regions, tumour core, whole tumour
and enhancing tumour, by :class:`ConvertToTumourRegionsd` with the entry's own label convention
(:mod:`medflare.data.tumour_label_conventions`: ``brats2021`` TC = 1+4, WT = 1+2+4, ET = 4;
``brats2023`` ET = 3; ``msd_task01`` TC = 2+3, WT = 1+2+3, ET = 3). An entry whose image is one
4-D file (MSD Task01) has its channels put first and reordered to ``t1, t1ce, t2, flair`` by
:class:`ReorderChannelsd`. Both take their key (``"label_convention"``, ``"channel_order"``)
out of the item, so DataLoader collation sees only the image and the label. Intensities are
z-normalised per channel over the brain (non-zero voxels), which also removes sites' different
scanner units.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Optional, Sequence

from monai.transforms import MapTransform

from medflare.data.modality_names import MODALITIES
from medflare.data.tumour_label_conventions import DEFAULT_CONVENTION, REGION_NAMES, get_convention, tumour_regions

__all__ = ["CONVENTION_KEY", "CHANNEL_ORDER_KEY", "REGIONS", "ConvertToTumourRegionsd", "ReorderChannelsd", "train_transforms", "val_transforms"]

#: Output channels, in order.
REGIONS = REGION_NAMES

#: The item key naming a subject's label convention (set by ``load_datalist``).
CONVENTION_KEY = "label_convention"

#: The item key giving, for a 4-D image, the file channel of each of ``MODALITIES``.
CHANNEL_ORDER_KEY = "channel_order"


class ConvertToTumourRegionsd(MapTransform):
    """Label values to the TC, WT and ET masks of the item's label convention.

    The convention is read from ``item[convention_key]`` (``brats2021`` when the item has none,
    as every datalist written before conventions were recorded) and the key is removed.

    Raises:
        ValueError: the item names an unknown convention.
    """

    def __init__(self, keys, convention_key: str = CONVENTION_KEY, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.convention_key = convention_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        name = d.pop(self.convention_key, DEFAULT_CONVENTION)
        convention = get_convention(name)
        for key in self.key_iterator(d):
            d[key] = tumour_regions(d[key], convention)
        return d


class ReorderChannelsd(MapTransform):
    """Put a channel-first 4-channel image in ``MODALITIES`` order: ``image[order]`` with
    ``order = item[order_key]`` (removed from the item). An item without the key (four
    modality files, already in order) passes unchanged.

    Raises:
        ValueError: the order is not a permutation of the image's channels.
    """

    def __init__(self, keys, order_key: str = CHANNEL_ORDER_KEY, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.order_key = order_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        order = d.pop(self.order_key, None)
        if order is None:
            return d
        valid = isinstance(order, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in order)
        for key in self.key_iterator(d):
            channels = d[key].shape[0]
            if not valid or sorted(order) != list(range(channels)) or channels != len(MODALITIES):
                raise ValueError(
                    f"{self.order_key} must be a permutation of the {len(MODALITIES)} channels {list(range(len(MODALITIES)))} "
                    f"of {key!r} (shape {tuple(d[key].shape)}), got {order!r}"
                )
            d[key] = d[key][list(order)]
        return d


def _load_chain(pixdim: Optional[Sequence[float]]) -> list:
    from monai import transforms as T

    chain = [
        T.LoadImaged(keys=["image", "label"], image_only=False),
        T.EnsureChannelFirstd(keys="image"),
        ReorderChannelsd(keys="image"),
        T.EnsureTyped(keys=["image", "label"]),
        ConvertToTumourRegionsd(keys="label"),
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
