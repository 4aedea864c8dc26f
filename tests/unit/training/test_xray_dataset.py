"""The streamed radiograph datasets: items, loading, the quality pass and unwrapped data errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medflare.data.data_errors import DataListError
from medflare.data.outcome_table import OutcomeCase
from medflare.training.xray_dataset import StreamedImages, check_xrays, collate_xrays, read_resized_xray, xray_dataset, xray_items


def cases(folder, count=3, shape=(8, 12)):
    out = []
    for i in range(count):
        pixels = np.zeros(shape, dtype=np.uint8)
        pixels[:, : shape[1] // 2] = 200  # left half bright
        path = folder / f"c{i}.png"
        Image.fromarray(pixels).save(path)
        out.append(OutcomeCase(f"c{i}", "train", str(path), (), (0,)))
    return out


def test_an_image_is_scaled_to_0_1_and_area_resized(tmp_path):
    (case,) = cases(tmp_path, 1)
    image = read_resized_xray(case.image, (4, 6))
    assert image.shape == (1, 4, 6) and image.dtype == torch.float32
    np.testing.assert_array_equal(image[0].numpy(), np.array([[1, 1, 1, 0, 0, 0]] * 4, dtype=np.float32))


def test_items_and_dataset_give_index_and_image_and_stamp_files(tmp_path):
    found = cases(tmp_path)
    items = xray_items(found, (4, 6), with_file_stamp=True)
    assert [i["index"] for i in items] == [0, 1, 2] and items[1]["case_id"] == "c1" and items[0]["size"] > 0
    dataset = xray_dataset(found, (4, 6))
    assert len(dataset) == 3 and dataset[2]["index"] == 2 and dataset[2]["image"].shape == (1, 4, 6)
    gone = OutcomeCase("gone", "train", str(tmp_path / "gone.png"), (), (0,))
    with pytest.raises(DataListError, match=r"case 'gone': cannot read image .*gone.png"):
        xray_items([gone], (4, 6), with_file_stamp=True)


def test_collate_and_streamed_images_handle_empty_batches(tmp_path):
    index, images = collate_xrays([])
    assert index.shape == (0,) and images is None
    streamed = StreamedImages(xray_dataset(cases(tmp_path), (4, 6)), (4, 6))
    assert streamed[torch.tensor([], dtype=torch.long)].shape == (0, 1, 4, 6)
    assert streamed[torch.tensor([2, 0])].shape == (2, 1, 4, 6) and len(streamed) == 3


@pytest.mark.parametrize("num_workers", [0, 1])
def test_the_quality_pass_names_the_split_case_and_file(tmp_path, num_workers):
    found = cases(tmp_path)
    assert check_xrays(found, "train", num_workers) == 3
    with open(found[1].image, "wb") as f:
        f.write(b"\x89PNG broken")
    with pytest.raises(DataListError, match=rf"train case 'c1': cannot read image {found[1].image}"):
        check_xrays(found, "train", num_workers)


def test_a_cached_dataset_refuses_a_bad_image_when_built(tmp_path):
    found = cases(tmp_path)
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(found[0].image)  # smaller than 8x8
    with pytest.raises(DataListError, match=r"case 'c0': image .*c0.png must be one 2D greyscale image of at least 8x8"):
        xray_dataset(found, (4, 6), cache_rate=1.0)
