import pytest
import torch

from medflare.training.device import select_device, use_amp
from medflare.training.model_spec import DEFAULT_SEGRESNET, build_model


def test_default_spec_builds_a_brats_segresnet():
    model = build_model(DEFAULT_SEGRESNET)
    out = model(torch.zeros(1, 4, 32, 32, 32))
    assert out.shape == (1, 3, 32, 32, 32)


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ({"args": {}}, ValueError, "path"),
        ({"path": "monai.networks.nets.NoSuchNet"}, ValueError, "cannot be imported"),
        ({"path": "collections.OrderedDict"}, ValueError, "not a torch.nn.Module"),
        ({"path": "monai.networks.nets.SegResNet", "args": [1]}, ValueError, "args must be a JSON object"),
        ({"path": "monai.networks.nets.SegResNet", "args": {"bogus": 1}}, TypeError, "bogus"),
    ],
)
def test_bad_specs_are_refused(spec, error, message):
    with pytest.raises(error, match=message):
        build_model(spec)


def test_device_choice_follows_the_hardware():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    assert select_device("cpu").type == "cpu"
    assert use_amp(torch.device("cpu"), True) is False
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            select_device("cuda")
    with pytest.raises(ValueError, match="device must be one of"):
        select_device("gpu")
