"""The observed update as a gradient, released masks, the cosine matching loss and TV."""

import numpy as np
import pytest
import torch

from medflare.attacks.gradient_matching import cosine_matching_loss, observed_gradient, released_masks, total_variation


def test_a_weight_difference_is_read_as_minus_update_over_learning_rate():
    update = {"w": torch.tensor([0.2, -0.4]), "b": np.array([0.1])}
    gradient = observed_gradient(update, "weight_difference", learning_rate=0.1)
    torch.testing.assert_close(gradient["w"], torch.tensor([-2.0, 4.0]))
    torch.testing.assert_close(gradient["b"], torch.tensor([-1.0], dtype=torch.float64))
    assert observed_gradient(update, "gradient")["w"] is not None


@pytest.mark.parametrize(
    "update,kind,lr,error,message",
    [
        ({"w": torch.ones(2)}, "weights", None, ValueError, "update_kind must be one of"),
        ({"w": torch.ones(2)}, "weight_difference", None, ValueError, "learning_rate must be given"),
        ({"w": torch.ones(2)}, "weight_difference", 0.0, ValueError, r"learning_rate must be in \(0.0, inf\)"),
        ({"w": torch.tensor([1.0, float("nan")])}, "gradient", None, ValueError, r"update\['w'\] must be finite"),
        ({"w": [1.0]}, "gradient", None, TypeError, r"update\['w'\] must be a torch.Tensor"),
        ({}, "gradient", None, ValueError, "non-empty mapping"),
    ],
)
def test_observed_gradient_refuses(update, kind, lr, error, message):
    with pytest.raises(error, match=message):
        observed_gradient(update, kind, lr)


def test_released_masks_mark_the_nonzero_entries_or_take_given_masks():
    gradient = {"w": torch.tensor([0.0, 1.0, -2.0])}
    assert released_masks(gradient)["w"].tolist() == [False, True, True]
    assert released_masks(gradient, "all")["w"].tolist() == [True, True, True]
    assert released_masks(gradient, {"w": np.array([True, False, False])})["w"].tolist() == [True, False, False]
    with pytest.raises(ValueError, match=r"released\['w'\] has shape \(2,\)"):
        released_masks(gradient, {"w": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="no mask for update tensor 'w'"):
        released_masks(gradient, {"v": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="released must be 'nonzero', 'all'"):
        released_masks(gradient, "some")


def test_cosine_loss_is_zero_for_the_same_direction_two_for_the_opposite():
    g = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    masks = [torch.ones(2, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool)]
    assert float(cosine_matching_loss([5 * t for t in g], g, masks)) == pytest.approx(0.0, abs=1e-7)
    assert float(cosine_matching_loss([-t for t in g], g, masks)) == pytest.approx(2.0)
    # orthogonal over the concatenation of all tensors: <(1,0,0),(0,1,0)> = 0
    trial = [torch.tensor([1.0, 0.0]), torch.tensor([[0.0]])]
    target = [torch.tensor([0.0, 1.0]), torch.tensor([[0.0]])]
    assert float(cosine_matching_loss(trial, target, masks)) == pytest.approx(1.0)


def test_cosine_loss_ignores_withheld_entries():
    trial = [torch.tensor([1.0, 2.0, 3.0])]
    mask = [torch.tensor([True, True, False])]
    a = cosine_matching_loss(trial, [torch.tensor([1.0, 2.0, 0.0])], mask)
    b = cosine_matching_loss(trial, [torch.tensor([1.0, 2.0, -99.0])], mask)
    assert float(a) == pytest.approx(0.0, abs=1e-7) and float(b) == float(a)
    # the same target with the withheld zero taken as released is a worse match
    assert float(cosine_matching_loss(trial, [torch.tensor([1.0, 2.0, 0.0])], [torch.ones(3, dtype=torch.bool)])) > 0.2


def test_total_variation_of_a_step_edge():
    x = torch.zeros(1, 1, 4, 4)
    x[..., 2:] = 1.0  # one vertical edge: 4 of the 12 horizontal differences are 1
    assert float(total_variation(x)) == pytest.approx(4 / 12)
    assert float(total_variation(torch.ones(2, 3, 5, 5))) == 0.0
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        total_variation(torch.zeros(4, 4))
