"""Label inference from the sign of the output layer's update, on tiny models with known labels."""

import numpy as np
import pytest
import torch
from torch import nn

from medflare.attacks.label_inference import LabelInference, infer_labels, label_accuracy, label_presence
from medflare.training.outcome_networks import OutcomeNet
from tests.unit.attacks.tiny_models import seeded, sgd_update, tiny_cnn

BCE, CE = nn.BCEWithLogitsLoss(), nn.CrossEntropyLoss()


def _one_case(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("labels", [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
@pytest.mark.parametrize("source", ["bias", "weight"])
def test_one_case_gives_away_both_sigmoid_labels_of_an_outcome_net(labels, source):
    # the outcome executor's head: two binary outcomes; the table MLP ends in a ReLU, so the
    # head's inputs are >= 0 and its weight rows carry the same sign as its bias
    model = OutcomeNet(num_outputs=2, clinical_features=5, clinical_hidden=[8], seed=0)
    clinical = _one_case((1, 5))
    y = torch.tensor([labels])
    update = sgd_update(model, lambda m: m(clinical=clinical), BCE, y, learning_rate=0.05)
    result = infer_labels(update[f"head.{source}"], "sigmoid", update_kind="weight_difference", single_sample=True)
    assert result.present.tolist() == [bool(v) for v in labels]
    assert label_accuracy(result, label_presence(y)) == 1.0


@pytest.mark.parametrize("label", [0, 1])
def test_one_case_gives_away_its_class_from_a_cnn_gradient(label):
    model = tiny_cnn(12, outputs=2, seed=1)
    image = _one_case((1, 1, 12, 12))
    loss = CE(model(image), torch.tensor([label]))
    bias_gradient = torch.autograd.grad(loss, model[-1].bias)[0]
    result = infer_labels(bias_gradient, "softmax", single_sample=True)
    assert result.present.tolist() == [label == 0, label == 1]
    # with no single-sample hint the sign rule gives the same answer for one case
    assert infer_labels(bias_gradient, "softmax").present.tolist() == [label == 0, label == 1]


@pytest.mark.parametrize("label", [0, 1, 2])
def test_one_case_gives_away_its_class_from_a_linear_models_sgd_step(label):
    model = seeded(lambda: nn.Linear(6, 3), seed=2)
    x = _one_case((1, 6))
    update = sgd_update(model, lambda m: m(x), CE, torch.tensor([label]), learning_rate=0.1)
    result = infer_labels(update["bias"], "softmax", update_kind="weight_difference", single_sample=True)
    assert np.flatnonzero(result.present).tolist() == [label]
    assert label_accuracy(result, label_presence(np.array([label]), num_classes=3)) == 1.0


def test_a_batch_never_shows_a_class_it_did_not_hold():
    model = seeded(lambda: nn.Linear(6, 4), seed=3)
    x = _one_case((5, 6), seed=4)
    y = torch.tensor([0, 2, 2, 0, 2])
    update = sgd_update(model, lambda m: m(x), CE, y, learning_rate=0.1, steps=3)
    result = infer_labels(update["bias"], "softmax", update_kind="weight_difference")
    truth = label_presence(y, num_classes=4)
    assert truth.tolist() == [True, False, True, False]
    assert not (result.present & ~truth).any()
    assert result.present[[1, 3]].tolist() == [False, False]


def test_a_withheld_entry_is_marked_unreleased_and_guessed_absent():
    result = infer_labels(torch.tensor([0.0, -0.3, 0.2]), "sigmoid")
    assert result.released.tolist() == [False, True, True]
    assert result.present.tolist() == [False, True, False]
    single = infer_labels(np.array([0.0, 0.5, 0.1]), "softmax", single_sample=True)
    assert single.present.tolist() == [False, False, True]
    assert isinstance(single, LabelInference)


@pytest.mark.parametrize(
    "value,kwargs,error,message",
    [
        (np.zeros(2), {"activation": "relu"}, ValueError, "activation must be one of"),
        (np.zeros(2), {"update_kind": "delta"}, ValueError, "update_kind must be one of"),
        (np.zeros((2, 2, 2)), {}, ValueError, r"bias \(K,\) or a weight \(K, D\)"),
        (np.array([np.nan, 1.0]), {}, ValueError, "output_update must be finite"),
        (np.array([True, False]), {}, TypeError, "real numbers"),
        (np.zeros(2), {"single_sample": 1}, TypeError, "single_sample must be a bool"),
    ],
)
def test_infer_labels_refuses(value, kwargs, error, message):
    with pytest.raises(error, match=message):
        infer_labels(value, **kwargs)


def test_label_presence_and_accuracy():
    assert label_presence(np.array([[0, 1], [0, 0]])).tolist() == [False, True]
    assert label_presence(torch.tensor([2, 0]), num_classes=3).tolist() == [True, False, True]
    assert label_accuracy(np.array([True, False, False]), np.array([True, True, False])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\]"):
        label_presence(np.array([3]), num_classes=3)
    with pytest.raises(ValueError, match="0/1"):
        label_presence(np.array([[0.5, 1.0]]))
    with pytest.raises(ValueError, match=r"both be \(K,\)"):
        label_accuracy(np.array([True]), np.array([True, False]))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_dice_trained_segresnet_does_not_move_the_output_of_a_region_its_batch_lacks(optimizer):
    """One step of the segmentation trainer's loss on a crop whose enhancing-tumour channel is
    empty: that channel's output bias stays exactly where it was, the others move."""
    import copy as copy_module

    from monai.losses import DiceLoss

    from medflare.attacks.label_inference import infer_regions_dice
    from medflare.training.model_spec import build_model
    from tests.conftest import TINY_SEGRESNET

    model = build_model(copy_module.deepcopy(TINY_SEGRESNET))
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 4, 16, 16, 16, generator=generator)
    label = torch.zeros(1, 3, 16, 16, 16)
    label[:, 0, 4:9, 4:9, 4:9] = 1  # tumour core
    label[:, 1, 3:11, 3:11, 3:11] = 1  # whole tumour; channel 2 (enhancing) empty
    site = copy_module.deepcopy(model)
    step = torch.optim.SGD(site.parameters(), lr=0.1) if optimizer == "sgd" else torch.optim.Adam(site.parameters(), lr=1e-3)
    DiceLoss(smooth_nr=0.0, smooth_dr=1e-5, squared_pred=True, sigmoid=True, batch=True)(site(image), label).backward()
    step.step()
    name = [n for n, p in model.named_parameters() if n.endswith("bias") and tuple(p.shape) == (3,)][-1]
    delta = (dict(site.named_parameters())[name] - dict(model.named_parameters())[name]).detach()
    result = infer_regions_dice(delta)
    assert result.present.tolist() == [True, True, False]
    assert float(delta[2]) == 0.0
    assert infer_regions_dice(torch.zeros(3)).present.tolist() == [False, False, False]  # withheld reads absent
    with pytest.raises(ValueError):
        infer_regions_dice(np.float32(1.0))
