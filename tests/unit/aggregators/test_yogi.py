import numpy as np
import pytest
import torch

from medflare.aggregators.yogi import Yogi


def _reference(x, grads, lr, b1, b2, tau):
    m = np.zeros_like(x)
    v = np.full_like(x, tau**2)
    for g in grads:
        m = b1 * m + (1 - b1) * g
        v = v - (1 - b2) * g * g * np.sign(v - g * g)
        x = x - lr * m / (np.sqrt(v) + tau)
    return x


def test_matches_the_fedyogi_update_rule():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(50)
    grads = [rng.standard_normal(50) * 10 ** rng.uniform(-4, 0) for _ in range(6)]
    p = torch.nn.Parameter(torch.tensor(x0))
    opt = Yogi([p], lr=0.05, betas=(0.9, 0.99), tau=1e-3)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(p.detach().numpy(), _reference(x0, grads, 0.05, 0.9, 0.99, 1e-3), rtol=1e-10)


def test_second_moment_changes_additively():
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = Yogi([p], lr=1.0, betas=(0.0, 0.5), tau=1e-3)
    p.grad = torch.tensor([2.0], dtype=torch.float64)
    opt.step()
    v = opt.state[p]["v"].item()
    assert v == pytest.approx(1e-6 + 0.5 * 4.0)  # v0 = tau^2, grows by (1 - beta2) g^2


@pytest.mark.parametrize(
    "kwargs, message",
    [({"lr": 0}, "lr must be in"), ({"betas": (1.0, 0.9)}, r"betas\[0\] must be in"), ({"tau": -1}, "tau must be in"), ({"betas": 0.9}, "betas must be two")],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Yogi([torch.nn.Parameter(torch.zeros(1))], **kwargs)
