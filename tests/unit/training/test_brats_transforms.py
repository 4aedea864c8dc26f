"""The transform chain converts labels with the entry's own convention and puts a 4-D MSD
image's channels in t1, t1ce, t2, flair order; the keys it reads never reach collation."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai import transforms as T

from medflare.training.brats_transforms import (
    ConvertToTumourRegionsd,
    ReorderChannelsd,
    _load_chain,
    train_transforms,
    val_transforms,
)

SHAPE = (8, 8, 8)
AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])


def _label():
    """Values 1..4 in four distinct voxels (each convention picks its own)."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    for v in (1, 2, 3, 4):
        label[v, v, v] = v
    return label


def _expected(voxels_per_region):
    masks = np.zeros((3,) + SHAPE, dtype=bool)
    for c, values in enumerate(voxels_per_region):
        for v in values:
            masks[c, v, v, v] = True
    return masks


@pytest.mark.parametrize(
    "convention, regions",
    [
        ("brats2021", ((1, 4), (1, 2, 4), (4,))),
        ("brats2023", ((1, 3), (1, 2, 3), (3,))),
        ("msd_task01", ((2, 3), (1, 2, 3), (3,))),
        (None, ((1, 4), (1, 2, 4), (4,))),  # no key: brats2021, as every older datalist
    ],
)
def test_label_becomes_the_conventions_tc_wt_et(convention, regions):
    item = {"label": torch.as_tensor(_label())}
    if convention:
        item["label_convention"] = convention
    out = ConvertToTumourRegionsd(keys="label")(item)
    assert "label_convention" not in out and ("label_convention" in item) == bool(convention)  # input untouched
    assert np.array_equal(np.asarray(out["label"]), _expected(regions))


@pytest.mark.parametrize("bad", ["brats2022", 4, None, True])
def test_an_unknown_convention_in_an_item_is_refused(bad):
    with pytest.raises(ValueError, match="label_convention must be one of"):
        ConvertToTumourRegionsd(keys="label")({"label": torch.zeros(SHAPE), "label_convention": bad})


def test_reorder_channels_permutes_and_drops_its_key():
    image = torch.stack([torch.full(SHAPE, float(c)) for c in range(4)])
    out = ReorderChannelsd(keys="image")({"image": image, "channel_order": [1, 2, 3, 0]})
    assert [float(out["image"][c, 0, 0, 0]) for c in range(4)] == [1.0, 2.0, 3.0, 0.0] and set(out) == {"image"}
    same = ReorderChannelsd(keys="image")({"image": image})
    assert same["image"] is image


@pytest.mark.parametrize("order", [[0, 1, 2], [0, 0, 1, 2], [1, 2, 3, 4], [True, False, 2, 3], "0123", 3])
def test_a_bad_channel_order_is_refused(order):
    image = torch.zeros((4,) + SHAPE)
    with pytest.raises(ValueError, match=r"channel_order must be a permutation of the 4 channels"):
        ReorderChannelsd(keys="image")({"image": image, "channel_order": order})


def test_a_three_channel_image_is_refused_even_with_a_valid_looking_order():
    with pytest.raises(ValueError, match=r"shape \(3, 8, 8, 8\)"):
        ReorderChannelsd(keys="image")({"image": torch.zeros((3,) + SHAPE), "channel_order": [0, 1, 2]})


def _msd_subject(tmp_path):
    """File channels FLAIR, T1w, t1gd, T2w holding the constants 40, 10, 20, 30 (t1=10 ... flair=40)."""
    image = np.zeros(SHAPE + (4,), dtype=np.float32)
    for c, value in enumerate((40.0, 10.0, 20.0, 30.0)):
        image[..., c] = value
    nib.save(nib.Nifti1Image(image, AFFINE), str(tmp_path / "img.nii.gz"))
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[1, 1, 1], label[2, 2, 2], label[3, 3, 3] = 1, 2, 3
    nib.save(nib.Nifti1Image(label, AFFINE), str(tmp_path / "seg.nii.gz"))
    return {
        "image": str(tmp_path / "img.nii.gz"),
        "label": str(tmp_path / "seg.nii.gz"),
        "label_convention": "msd_task01",
        "channel_order": [1, 2, 3, 0],
    }


def test_the_chain_loads_an_msd_subject_with_channels_in_t1_t1ce_t2_flair_order(tmp_path):
    entry = _msd_subject(tmp_path)
    chain = T.Compose([t for t in _load_chain(None) if not isinstance(t, T.NormalizeIntensityd)])
    out = chain(entry)
    image = out["image"]
    assert tuple(image.shape) == (4,) + SHAPE
    assert [float(image[c].min()) for c in range(4)] == [10.0, 20.0, 30.0, 40.0]
    assert [float(image[c].max()) for c in range(4)] == [10.0, 20.0, 30.0, 40.0]
    label = np.asarray(out["label"])
    assert label.shape == (3,) + SHAPE and label.dtype == np.float32
    # msd_task01: TC = non-enhancing (2) + enhancing (3); WT = 1, 2, 3; ET = 3
    assert [int(label[c].sum()) for c in range(3)] == [2, 3, 1]
    assert label[0, 2, 2, 2] == 1 and label[0, 1, 1, 1] == 0 and label[2, 3, 3, 3] == 1
    assert "label_convention" not in out and "channel_order" not in out
    assert entry["channel_order"] == [1, 2, 3, 0]  # the datalist entry is not consumed


def test_four_path_subjects_still_load_and_collate_with_only_image_and_label(tmp_path):
    from monai.data import DataLoader, Dataset

    paths = []
    for c in range(4):
        image = np.zeros(SHAPE, dtype=np.float32)
        image[2:6, 2:6, 2:6] = np.arange(64, dtype=np.float32).reshape(4, 4, 4) + c
        nib.save(nib.Nifti1Image(image, AFFINE), str(tmp_path / f"m{c}.nii.gz"))
        paths.append(str(tmp_path / f"m{c}.nii.gz"))
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[3, 3, 3], label[4, 4, 4] = 1, 3
    nib.save(nib.Nifti1Image(label, AFFINE), str(tmp_path / "seg.nii.gz"))
    entry = {"image": paths, "label": str(tmp_path / "seg.nii.gz"), "label_convention": "brats2023"}
    loader = DataLoader(Dataset([entry, dict(entry)], train_transforms((8, 8, 8))), batch_size=2)
    batch = next(iter(loader))
    assert {k for k in batch if not k.endswith("_meta_dict")} == {"image", "label"}
    assert tuple(batch["image"].shape) == (2, 4, 8, 8, 8) and tuple(batch["label"].shape) == (2, 3, 8, 8, 8)
    # brats2023: the 3 is enhancing tumour, so ET holds one voxel and TC two
    assert [int(batch["label"][0, c].sum()) for c in range(3)] == [2, 2, 1]
    val = val_transforms()(entry)
    assert [int(val["label"][c].sum()) for c in range(3)] == [2, 2, 1]
    assert os.path.exists(entry["label"])
