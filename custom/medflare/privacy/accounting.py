"""(epsilon, delta) accounting for repeated Gaussian releases, by Opacus.

Notes:
    A site that releases its clipped update with Gaussian noise of standard deviation
    :math:`\\sigma = z C` every round takes part with sampling rate :math:`q = 1` (no
    subsampling amplification). After :math:`T` releases the Rényi-DP of order
    :math:`\\alpha` is :math:`T \\alpha / (2 z^2)` (Mironov 2017 [1], Prop. 7 and Prop. 1), and
    Opacus's RDP accountant converts it to :math:`(\\varepsilon, \\delta)` with the bound of
    Balle et al. 2020 [2]. The PRV accountant (Gopi et al. 2021 [3]) computes a tighter
    :math:`\\varepsilon` numerically. Releases with different :math:`z` compose by adding RDP
    curves (RDP) or privacy-loss distributions (PRV).

    A history mixes both kinds of release a site makes: a site-level Gaussian release is
    :math:`(z, q = 1, T = 1)`; a patient-level DP-SGD run is :math:`(z, q, T)` with Poisson
    sampling rate :math:`q` and :math:`T` steps, whose RDP is that of the subsampled Gaussian
    mechanism (Mironov, Talwar, Zhang 2019 [4], Sec. 3.3). Composition adds RDP curves
    (:math:`\varepsilon_\alpha = \sum_i T_i \, \varepsilon_\alpha(z_i, q_i)`), so
    entries with the same :math:`(z, q)` may be merged by adding their steps and the order of
    entries does not matter. The neighbouring relation is that of each entry: one site for a
    Gaussian release, one patient for DP-SGD; composing both bounds the patient-level
    guarantee, since a patient's record lies in their site's data.

    References:
        [1] I. Mironov, "Rényi Differential Privacy", CSF 2017.
        [2] B. Balle et al., "Hypothesis Testing Interpretations and Renyi Differential Privacy", AISTATS 2020.
        [3] S. Gopi, Y. T. Lee, L. Wutschitz, "Numerical Composition of Differential Privacy", NeurIPS 2021.
        [4] I. Mironov, K. Talwar, L. Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019.
"""

from __future__ import annotations

from typing import Iterable

from medflare.privacy.argument_checks import check_int, check_real

__all__ = ["ACCOUNTANTS", "epsilon_spent", "epsilon_of_history", "merge_history", "noise_multiplier_for", "check_accountant"]

#: Accountants medflare supports, by Opacus name.
ACCOUNTANTS = ("rdp", "prv")


def check_accountant(accountant) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return accountant


def _opacus_accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if name == "rdp" else PRVAccountant()


def epsilon_spent(releases: Iterable[tuple[float, int]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon after the given Gaussian releases at sampling rate 1.

    Args:
        releases: ``(noise_multiplier, count)`` pairs.
        delta: target delta, in (0, 1).
        accountant: ``"rdp"`` or ``"prv"``.

    Returns:
        epsilon (0.0 when there were no releases).
    """
    check_accountant(accountant)
    check_real("delta", delta, 0.0, 1.0, low_open=True, high_open=True)
    history = []
    for z, count in releases:
        check_real("noise_multiplier", z, 0.0, None, low_open=True)
        check_int("count", count, 0)
        if count:
            history.append((float(z), 1.0, int(count)))
    return _compose(history, delta, accountant)


def merge_history(history: Iterable[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """``(noise_multiplier, sample_rate, steps)`` entries with equal ``(z, q)`` merged by adding
    their steps, sorted, entries of 0 steps dropped; each entry checked.

    Raises:
        TypeError, ValueError: an entry out of range (z in (0, inf), q in (0, 1], steps >= 0).
    """
    steps_of: dict[tuple[float, float], int] = {}
    for n, entry in enumerate(history):
        if not isinstance(entry, (tuple, list)) or len(entry) != 3:
            raise ValueError(f"history[{n}] must be (noise_multiplier, sample_rate, steps), got {entry!r}")
        z = check_real(f"history[{n}] noise_multiplier", entry[0], 0.0, None, low_open=True)
        q = check_real(f"history[{n}] sample_rate", entry[1], 0.0, 1.0, low_open=True)
        steps = check_int(f"history[{n}] steps", entry[2], 0)
        if steps:
            steps_of[(z, q)] = steps_of.get((z, q), 0) + steps
    return [(z, q, steps) for (z, q), steps in sorted(steps_of.items())]


def epsilon_of_history(history: Iterable[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of a composed history of Gaussian releases, subsampled or not.

    Args:
        history: ``(noise_multiplier, sample_rate, steps)`` entries in any order, as in
            Opacus's ``accountant.history``: ``(z, 1.0, 1)`` for one site-level Gaussian
            release, ``(z, q, T)`` for a DP-SGD run of ``T`` steps at Poisson rate ``q``.
        delta: target delta, in (0, 1).
        accountant: ``"rdp"`` or ``"prv"``.

    Returns:
        epsilon (0.0 for an empty history), equal to Opacus's accountant given the merged
        history (see :func:`merge_history` and the module notes).
    """
    check_accountant(accountant)
    check_real("delta", delta, 0.0, 1.0, low_open=True, high_open=True)
    return _compose(merge_history(history), delta, accountant)


def _compose(history: list, delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    acc = _opacus_accountant(accountant)
    acc.history = history
    return float(acc.get_epsilon(delta=delta))


def noise_multiplier_for(target_epsilon: float, target_delta: float, num_releases: int, accountant: str = "rdp") -> float:
    """The smallest noise multiplier (to Opacus's tolerance) whose ``num_releases`` releases stay
    within ``(target_epsilon, target_delta)``."""
    from opacus.accountants.utils import get_noise_multiplier

    check_real("target_epsilon", target_epsilon, 0.0, None, low_open=True)
    check_real("target_delta", target_delta, 0.0, 1.0, low_open=True, high_open=True)
    check_int("num_releases", num_releases, 1)
    check_accountant(accountant)
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=1.0,
            steps=num_releases,
            accountant=accountant,
        )
    )
