import numpy as np
import pytest
import torch

from medflare.training.model_weights import WeightMismatchError, get_weights, set_weights, weight_diff


def test_diff_of_a_batchnorm_network_is_arrays_in_each_entry_dtype():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    before = get_weights(model)
    model(torch.rand(4, 1, 8, 8))  # training mode: running stats and num_batches_tracked move
    after = get_weights(model)
    diff = weight_diff(after, before)
    counter = diff["1.num_batches_tracked"]
    # a 0-d ndarray, not a numpy scalar: the aggregator refuses anything but arrays
    assert isinstance(counter, np.ndarray) and counter.shape == () and counter.dtype == np.int64 and counter == 1
    for key, value in diff.items():
        assert isinstance(value, np.ndarray) and value.dtype == after[key].dtype, key
    assert np.abs(diff["1.running_mean"]).sum() > 0


def test_set_weights_refuses_what_does_not_fit_and_leaves_the_model():
    model = torch.nn.Linear(3, 1)
    original = get_weights(model)
    with pytest.raises(WeightMismatchError, match="missing \\['bias'\\]"):
        set_weights(model, {"weight": np.zeros((1, 3))})
    with pytest.raises(WeightMismatchError, match="shape \\(1, 2\\)"):
        set_weights(model, {"weight": np.zeros((1, 2)), "bias": np.zeros(1)})
    assert all(np.array_equal(original[k], v) for k, v in get_weights(model).items())
