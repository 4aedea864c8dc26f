"""XrayAugmentation and its settings: what each transform does, seeding, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medflare.training.xray_augmentation import AugmentationSettings, XrayAugmentation, parse_augmentation

NOTHING = dict(rotation_degrees=0.0, scale_fraction=0.0, translation_fraction=0.0, contrast_fraction=0.0, brightness_shift=0.0, probability=1.0)


def image(seed=0, size=(12, 12)):
    return torch.from_numpy(np.random.default_rng(seed).random((1, *size), dtype=np.float32))


def augment(seed=0, **settings):
    return XrayAugmentation(parse_augmentation({**NOTHING, **settings}), (12, 12), seed)


def test_off_true_and_mappings_parse_to_settings():
    assert parse_augmentation(None) is None and parse_augmentation(False) is None
    assert parse_augmentation(True) == AugmentationSettings()
    assert AugmentationSettings().horizontal_flip is False  # the heart is on the left
    assert AugmentationSettings().rotation_degrees == 10.0 and AugmentationSettings().scale_fraction == 0.1
    settings = parse_augmentation({"rotation_degrees": 5, "horizontal_flip": True})
    assert settings.rotation_degrees == 5.0 and settings.horizontal_flip and settings.scale_fraction == 0.1
    assert parse_augmentation(settings) == settings


def test_zero_ranges_change_nothing_and_no_flip_happens_unless_asked():
    x = image()
    for seed in range(5):
        np.testing.assert_allclose(augment(seed)(x).numpy(), x.numpy(), atol=1e-5)
    flipped = [torch.allclose(augment(seed, horizontal_flip=True)(x), torch.flip(x, dims=[2]), atol=1e-5) for seed in range(12)]
    assert any(flipped) and not all(flipped)  # left-right, with probability 1/2


def test_brightness_shifts_every_pixel_by_one_offset_within_its_range():
    x = image(1)
    for seed in range(5):
        shift = (augment(seed, brightness_shift=0.2)(x) - x).numpy()
        assert np.ptp(shift) < 1e-5 and abs(shift.mean()) <= 0.2 and abs(shift.mean()) > 0


def test_contrast_keeps_the_mean_and_scales_around_it():
    x = image(2)
    out = augment(3, contrast_fraction=0.3)(x)
    assert float(out.mean()) == pytest.approx(float(x.mean()), abs=1e-5)
    factor = float(((out - out.mean()) / (x - x.mean())).median())
    assert 0.7 <= factor <= 1.3 and factor != pytest.approx(1.0)


def test_the_affine_moves_pixels_and_keeps_shape_dtype_and_type():
    x = image(3)
    out = augment(4, rotation_degrees=10.0, scale_fraction=0.1, translation_fraction=0.05)(x)
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == x.shape
    assert float((out - x).abs().max()) > 0.05


def test_the_same_seed_gives_the_same_images_and_reseeding_repeats_them():
    x = image(4)
    a, b = XrayAugmentation(AugmentationSettings(probability=1.0), (12, 12), 7), XrayAugmentation(AugmentationSettings(probability=1.0), (12, 12), 7)
    first = [a(x) for _ in range(3)]
    assert all(torch.equal(f, b(x)) for f in first)
    assert not torch.equal(first[0], first[1])
    a.set_random_state(7)
    assert torch.equal(a(x), first[0])


@pytest.mark.parametrize(
    "value, message",
    [
        ("yes", "augmentation must be null, a bool or a mapping of settings, got 'yes'"),
        (0, "augmentation must be null, a bool or a mapping"),
        ([1], "augmentation must be null, a bool or a mapping"),
        ({"rotation": 5}, r"unknown setting\(s\) \['rotation'\]"),
        ({"rotation_degrees": 46}, r"augmentation.rotation_degrees must be a finite number in \[0.0, 45.0\], got 46"),
        ({"rotation_degrees": "5"}, "augmentation.rotation_degrees .* got '5'"),
        ({"scale_fraction": 0.6}, r"augmentation.scale_fraction .*\[0.0, 0.5\], got 0.6"),
        ({"translation_fraction": float("inf")}, "augmentation.translation_fraction .* got inf"),
        ({"contrast_fraction": float("nan")}, "augmentation.contrast_fraction .* got nan"),
        ({"probability": 1.01}, r"augmentation.probability .*\[0.0, 1.0\], got 1.01"),
        ({"probability": False}, "augmentation.probability .* got False"),
        ({"horizontal_flip": "no"}, "augmentation.horizontal_flip must be true or false, got 'no'"),
    ],
)
def test_bad_augmentation_is_refused(value, message):
    with pytest.raises(ValueError, match=message):
        parse_augmentation(value)


def test_an_image_of_another_shape_is_refused():
    with pytest.raises(ValueError, match=r"takes a \(1, 12, 12\) tensor, got torch.Size\(\[1, 8, 8\]\)"):
        augment()(torch.zeros(1, 8, 8))
