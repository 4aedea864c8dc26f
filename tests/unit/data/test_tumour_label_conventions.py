"""Label conventions: hand-checked TC/WT/ET masks for each numbering, labels maps named by their
convention (spelling-tolerant), and everything else refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medflare.data.data_errors import DataListError
from medflare.data.modality_names import channel_order, modality_of
from medflare.data.tumour_label_conventions import (
    CONVENTIONS,
    convention_from_labels_map,
    get_convention,
    tumour_regions,
    values_outside,
)

# one voxel per value 0..4 along a line; the expected masks per region are read off the tables
LINE = np.array([[[0, 1, 2, 3, 4]]], dtype=np.uint8)  # shape (1, 1, 5)

EXPECTED = {
    #               tc               wt               et
    "brats2021": ([0, 1, 0, 0, 1], [0, 1, 1, 0, 1], [0, 0, 0, 0, 1]),
    "brats2023": ([0, 1, 0, 1, 0], [0, 1, 1, 1, 0], [0, 0, 0, 1, 0]),
    "msd_task01": ([0, 0, 1, 1, 0], [0, 1, 1, 1, 0], [0, 0, 0, 1, 0]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_regions_of_each_convention_are_the_documented_unions(name):
    masks = tumour_regions(LINE, get_convention(name))
    assert masks.shape == (3, 1, 1, 5) and masks.dtype == bool
    assert [m.ravel().astype(int).tolist() for m in masks] == [list(e) for e in EXPECTED[name]]


def test_regions_of_a_torch_tensor_with_a_channel_axis():
    label = torch.as_tensor(LINE)[None]  # (1, 1, 1, 5)
    masks = tumour_regions(label, CONVENTIONS["msd_task01"])
    assert isinstance(masks, torch.Tensor) and tuple(masks.shape) == (3, 1, 1, 5)
    assert masks[0].flatten().tolist() == [False, False, True, True, False]


@pytest.mark.parametrize(
    "labels, name",
    [
        ({"0": "background", "1": "necrotic core", "2": "oedema", "4": "enhancing tumour"}, "brats2021"),
        ({"0": "Background", "1": "NCR/NET", "2": "ED", "4": "ET"}, "brats2021"),
        ({"0": "background", "1": "NCR", "2": "SNFH", "3": "ET"}, "brats2023"),
        ({"0": "background", "1": "Necrotic Tumor Core", "2": "Peritumoral Edema", "3": "GD-enhancing tumor"}, "brats2023"),
        ({"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}, "msd_task01"),
        ({"0": "BACKGROUND", "1": "Edema", "2": "NonEnhancing Tumour", "3": "Enhancing_Tumor"}, "msd_task01"),
    ],
)
def test_a_labels_map_names_its_convention(labels, name):
    assert convention_from_labels_map(labels, "datalist d.json") == name


@pytest.mark.parametrize(
    "labels, message",
    [
        ({"0": "background", "1": "edema", "2": "necrotic core", "3": "enhancing tumour"}, "matches no known tumour label convention"),
        ({"0": "background", "1": "necrotic core", "2": "oedema", "3": "enhancing tumour", "4": "cavity"}, "matches no known"),
        ({"0": "background"}, "matches no known"),
        ({}, "'labels' must be a non-empty map"),
        ([["0", "background"]], "'labels' must be a non-empty map"),
        (None, "'labels' must be a non-empty map"),
        ({"1.5": "edema"}, "must map integer values to names"),
        ({"-1": "edema"}, "must map integer values to names"),
        ({"1": 3}, "must map integer values to names"),
    ],
)
def test_an_unknown_labels_map_is_refused_naming_the_file_and_what_was_found(labels, message):
    with pytest.raises(DataListError, match=message) as err:
        convention_from_labels_map(labels, "datalist /d/list.json")
    assert str(err.value).startswith("datalist /d/list.json: ")


@pytest.mark.parametrize("name", [None, 1, True, "BRATS2021", "brats2020", ""])
def test_an_unknown_convention_name_is_refused_with_the_allowed_ones(name):
    with pytest.raises(ValueError, match=rf"label_convention must be one of \['brats2021', 'brats2023', 'msd_task01'\], got {name!r}"):
        get_convention(name)


def test_values_outside_a_convention():
    assert values_outside([0, 1, 2, 3], CONVENTIONS["brats2021"]) == [3]
    assert values_outside(np.array([0.0, 4.0, 2.5]), CONVENTIONS["brats2023"]) == [2.5, 4]
    assert values_outside([0, 1, 2, 3], CONVENTIONS["msd_task01"]) == []


def test_msd_modality_map_gives_the_channel_of_each_modality():
    assert channel_order({"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}, "x") == (1, 2, 3, 0)
    assert channel_order({"0": "T1", "1": "T1CE", "2": "T2", "3": "FLAIR"}, "x") == (0, 1, 2, 3)
    assert [modality_of(n) for n in ("t1n", "T1C", "t2w", "T2-FLAIR", "dwi", None)] == ["t1", "t1ce", "t2", "flair", None, None]


@pytest.mark.parametrize(
    "modality, message",
    [
        ({"0": "FLAIR", "1": "T1w", "2": "t1gd"}, r"must name 4 channels"),
        ({"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w", "4": "DWI"}, r"must name 4 channels"),
        ({"1": "FLAIR", "2": "T1w", "3": "t1gd", "4": "T2w"}, r"must name 4 channels"),
        ({"0": "FLAIR", "1": "FLAIR", "2": "t1gd", "3": "T2w"}, r"must name each of .* once"),
        ({"0": "FLAIR", "1": 7, "2": "t1gd", "3": "T2w"}, r"not recognised: \[7\]"),
        ("FLAIR,T1w,t1gd,T2w", r"'modality' must be a map"),
        (None, r"'modality' must be a map"),
    ],
)
def test_a_bad_modality_map_is_refused(modality, message):
    with pytest.raises(DataListError, match=message):
        channel_order(modality, "datalist d.json")
