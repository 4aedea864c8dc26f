"""The Yogi optimizer, for FedYogi: an adaptive server optimizer applied to the aggregated update.

Notes:
    With pseudo-gradient :math:`g_t` (NVFlare's ``PTFedOptModelShareableGenerator`` uses the
    negated aggregated weight difference), Yogi (Zaheer et al. 2018 [1]) as used by FedYogi
    (Reddi et al. 2021 [2], Algorithm 2) updates

    .. math::
        m_t = \\beta_1 m_{t-1} + (1 - \\beta_1) g_t \\\\
        v_t = v_{t-1} - (1 - \\beta_2)\\, g_t^2 \\, \\mathrm{sign}(v_{t-1} - g_t^2) \\\\
        x_t = x_{t-1} - \\eta \\, m_t / (\\sqrt{v_t} + \\tau)

    without bias correction, :math:`v_{-1} = \\tau^2`. Unlike Adam, :math:`v` changes
    additively, so it cannot grow or shrink abruptly when one round's update is large.
    FedAdam is ``torch.optim.Adam`` with the same generator.

    References:
        [1] M. Zaheer et al., "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018.
        [2] S. Reddi et al., "Adaptive Federated Optimization", ICLR 2021.
"""

from __future__ import annotations

import torch

from medflare.privacy.argument_checks import check_real

__all__ = ["Yogi"]


class Yogi(torch.optim.Optimizer):
    """Yogi with FedYogi's defaults.

    Args:
        params: parameters to optimise.
        lr: server learning rate eta, in (0, inf).
        betas: (beta1, beta2), each in [0, 1).
        tau: adaptivity (epsilon) tau, in (0, inf); also sets the initial second moment tau^2.
    """

    def __init__(self, params, lr: float = 1e-2, betas=(0.9, 0.99), tau: float = 1e-3):
        check_real("lr", lr, 0.0, None, low_open=True)
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        check_real("betas[0]", betas[0], 0.0, 1.0, high_open=True)
        check_real("betas[1]", betas[1], 0.0, 1.0, high_open=True)
        check_real("tau", tau, 0.0, None, low_open=True)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "tau": tau})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.full_like(p, group["tau"] ** 2)
                m, v = state["m"], state["v"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                g2 = g * g
                v.sub_((1 - beta2) * g2 * torch.sign(v - g2))
                p.sub_(group["lr"] * m / (v.sqrt() + group["tau"]))
        return loss
