"""Preparation recipes: validated parameters, their JSON form and hash."""

import hashlib
import json

import pytest

from medflare.preparation.recipe import PREPARATION_VERSION, SegmentationPreparation, XrayPreparation, parameters_hash


def test_the_hash_is_sha256_of_the_canonical_json():
    recipe = SegmentationPreparation(target_spacing=[1, 1, 1])
    parameters = recipe.parameters()
    assert parameters["target_spacing"] == [1.0, 1.0, 1.0] and parameters["crop_pad"] is None
    text = json.dumps(parameters, sort_keys=True, separators=(",", ":"))
    assert recipe.parameters_hash() == hashlib.sha256(text.encode()).hexdigest() == parameters_hash(dict(reversed(parameters.items())))
    assert SegmentationPreparation(target_spacing=(1.0, 1.0, 1.0)).parameters_hash() == recipe.parameters_hash()
    assert SegmentationPreparation().parameters_hash() != recipe.parameters_hash()
    assert recipe.name == "medflare-brats-prep" and recipe.version == PREPARATION_VERSION
    assert XrayPreparation().parameters()["output"] == "png-16bit"
    assert XrayPreparation(scaling="minmax").parameters()["percentiles"] is None


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"target_spacing": [1, 1]}, "target_spacing must be null or three floats, got [1, 1]"),
        ({"target_spacing": [1, 1, float("nan")]}, "target_spacing[2] must be a finite real number in [0.05, 20.0], got nan"),
        ({"target_spacing": [1, True, 1]}, "target_spacing[1] must be a real number in [0.05, 20.0], got True"),
        ({"target_spacing": [0, 1, 1]}, "target_spacing[0] must be in [0.05, 20.0], got 0.0"),
        ({"crop_pad": [8, 8, 8.5]}, "crop_pad[2] must be an int in [1, 4096], got 8.5"),
        ({"crop_pad": "96"}, "crop_pad must be null or three ints, got '96'"),
        ({"normalise": "z-score"}, "normalise must be one of ['zscore', 'none'], got 'z-score'"),
        ({"spacing_range": (5, 1)}, "spacing_range must have low < high, got (5, 1)"),
        ({"max_anisotropy": 0.5}, "max_anisotropy must be in [1.0, 1000.0], got 0.5"),
        ({"allow_negative_intensity": 1}, "allow_negative_intensity must be true or false, got 1"),
    ],
)
def test_bad_arguments_are_refused_naming_them(arguments, message):
    with pytest.raises((TypeError, ValueError)) as refused:
        SegmentationPreparation(**arguments)
    assert message in str(refused.value)
