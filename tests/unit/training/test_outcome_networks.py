"""OutcomeNet: image + clinical fusion, image only, table only (logistic regression)."""

import pytest
import torch

from medflare.training.outcome_networks import OutcomeNet

DENSENET = {"path": "monai.networks.nets.DenseNet121", "args": {"spatial_dims": 2, "in_channels": 1}}
RESNET = {"path": "monai.networks.nets.ResNet", "args": {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [8, 16, 32, 64], "spatial_dims": 2, "n_input_channels": 1, "num_classes": 16}}


def test_table_only_without_hidden_layers_is_logistic_regression():
    model = OutcomeNet(num_outputs=1, clinical_features=13, clinical_hidden=[], seed=0)
    assert sum(p.numel() for p in model.parameters()) == 13 + 1
    x = torch.randn(5, 13)
    expected = x @ model.head.weight.T + model.head.bias
    torch.testing.assert_close(model(clinical=x), expected)
    assert model.uses_clinical and not model.uses_image


@pytest.mark.parametrize("outputs", [1, 3])
def test_fusion_takes_both_inputs_and_gives_one_logit_per_label(outputs):
    model = OutcomeNet(num_outputs=outputs, clinical_features=6, image_network=DENSENET, image_features=16, seed=0)
    out = model(torch.randn(2, 1, 64, 64), torch.randn(2, 6))
    assert out.shape == (2, outputs)
    with pytest.raises(ValueError, match="takes clinical values"):
        model(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match="expected 6 clinical values per case, got 5"):
        model(torch.randn(2, 1, 64, 64), torch.randn(2, 5))


def test_image_only_with_a_resnet_that_names_its_own_output_width():
    model = OutcomeNet(num_outputs=1, image_network=RESNET, image_features=99)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 1)
    assert model.head.in_features == 16  # the ResNet's num_classes, not image_features
    assert model.uses_image and not model.uses_clinical


def test_the_clinical_values_change_the_fused_prediction():
    model = OutcomeNet(num_outputs=1, clinical_features=4, image_network=DENSENET, image_features=8, seed=1).eval()
    image = torch.randn(1, 1, 32, 32)
    assert not torch.allclose(model(image, torch.zeros(1, 4)), model(image, torch.ones(1, 4) * 3))


def test_a_seed_gives_the_same_initial_model_and_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = OutcomeNet(num_outputs=2, clinical_features=5, image_network=DENSENET, image_features=8, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = OutcomeNet(num_outputs=2, clinical_features=5, image_network=DENSENET, image_features=8, seed=7)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "needs an image_network, clinical_features > 0, or both"),
        (dict(clinical_features=3, num_outputs=0), "num_outputs must be an int >= 1, got 0"),
        (dict(clinical_features=-1), "clinical_features must be an int >= 0"),
        (dict(clinical_features=3, dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(clinical_features=3, clinical_hidden=[0]), "clinical_hidden must be a list of ints >= 1"),
        (dict(clinical_features=3, seed=-1), "seed must be an int >= 0 or null"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OutcomeNet(**kwargs)


@pytest.mark.parametrize(
    "spec",
    [
        {"path": "torch.nn.Linear", "args": {"in_features": 4, "out_features": 2}},
        {"args": {}},
        "monai.networks.nets.ResNet",
    ],
    ids=["not-monai-or-medflare", "no-path", "not-a-spec"],
)
def test_image_networks_come_only_from_monai_or_medflare(spec):
    # the spec is built by OutcomeNet, not by NVFlare: the site's class allow-list never sees it
    with pytest.raises(ValueError, match="image_network must be"):
        OutcomeNet(1, 0, spec)
