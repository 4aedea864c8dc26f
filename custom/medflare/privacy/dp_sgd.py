"""Patient-level DP-SGD: settings, Poisson sampling, per-patient clipping, noise and accounting.

The pure parts of DP-SGD (Abadi et al. 2016 [1]) that the trainers in :mod:`medflare.training`
use at every local step, and the accounting the site's ledger charges. Nothing here knows of
NVFlare or of a network: functions take tensors of per-sample gradients and return tensors.

Notes:
    **One step.** Each of the site's :math:`N` training patients is included independently with
    probability :math:`q = m / N` (Poisson sampling, :math:`m` = ``expected_patients_per_step``;
    a step may hold no patient). Patient :math:`p` contributes crops :math:`s \\in S_p` (BraTS:
    several random crops of the patient's volume; a table: one row). With per-crop gradients
    :math:`g_s`, the patient's gradient is summed first and then clipped,

    .. math::
        \\bar g_p = \\Big(\\sum_{s \\in S_p} g_s\\Big) \\cdot
        \\min\\Big(1, \\frac{C}{\\lVert \\sum_{s \\in S_p} g_s \\rVert_2 + 10^{-6}}\\Big),

    so one patient moves the step by at most :math:`C` (``max_grad_norm``) whatever its number
    of crops, and the gradient the optimizer applies is

    .. math::
        \\tilde g = \\frac{1}{qN}\\Big(\\sum_{p \\in B} \\bar g_p + \\mathcal N(0, z^2 C^2 I)\\Big)

    with :math:`z` the ``noise_multiplier``. The optimizer (Adam or SGD) only post-processes
    :math:`\\tilde g`, which costs no privacy.

    **A target instead of a noise multiplier** (:class:`DPSGDTarget`). One :math:`z` spends a
    different epsilon at each site, since :math:`q = m / N` differs: with :math:`T` planned
    steps at rate :math:`q`, the site solves
    :math:`z = \\min\\{z' : \\varepsilon_{RDP}(z', q, T, \\delta) \\le \\varepsilon_{target}\\}`
    (:func:`settings_for_target`, to Opacus's tolerance of 0.01 in epsilon) and keeps that
    :math:`z` for all :math:`T` steps, so every site's patients spend about the target. The
    guarantee holds for at most :math:`T` steps; more steps spend more. The calibration uses
    the RDP accountant, the site ledger's default; RDP's epsilon bounds the history's from
    above, and the PRV accountant estimates the same history more tightly.

    **Neighbouring relation:** add/remove one patient, with all of their images, crops and
    rows. Each step is the Poisson-subsampled Gaussian mechanism of sensitivity :math:`C`;
    :math:`T` steps compose. Its Rényi DP is computed numerically (Mironov, Talwar, Zhang 2019
    [2], Sec. 3.3) and converted to :math:`(\\varepsilon, \\delta)` by Opacus's RDP accountant,
    or the PRV accountant (Gopi et al. 2021 [3]) composes the privacy-loss distributions.

    **What voids the guarantee:** crops of one patient counted as several "patients" (the
    per-patient sum is what bounds the sensitivity); sampling that is not Poisson (shuffled
    fixed-size batches are not what the accountant assumes); a loss that couples samples
    (BatchNorm in training mode, a Dice computed over the whole batch), so that one patient's
    gradient depends on another's data; model state that is not a noised gradient leaving the
    site (BatchNorm running statistics, counters); predictable noise or sampling (a seeded
    generator lets an observer subtract the noise: for tests only); releasing data-dependent
    side information (the training loss, the number of cases) unprivatised.

    References:
        [1] M. Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
        [2] I. Mironov, K. Talwar, L. Zhang, "Rényi Differential Privacy of the Sampled Gaussian
            Mechanism", arXiv:1908.10530, 2019.
        [3] S. Gopi, Y. T. Lee, L. Wutschitz, "Numerical Composition of Differential Privacy",
            NeurIPS 2021.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping, Optional, Union

import torch

from medflare.privacy.accounting import check_accountant, epsilon_of_history
from medflare.privacy.argument_checks import check_int, check_real

__all__ = [
    "planned_steps",
    "DPSGDSettings",
    "DPSGDRequirement",
    "DPSGDTarget",
    "MECHANISM",
    "NEIGHBOURING_RELATION",
    "parse_dp_sgd_settings",
    "parse_dp_sgd_requirement",
    "effective_settings",
    "settings_for_target",
    "poisson_sample",
    "patient_sample_rate",
    "steps_per_epoch",
    "clip_patient_gradients",
    "noisy_gradient",
    "dp_sgd_record",
    "combined_record",
    "dp_sgd_epsilon",
    "noise_multiplier_for_patient_epsilon",
]

MECHANISM = "dp_sgd"
NEIGHBOURING_RELATION = "add/remove one patient"
_SETTINGS_FIELDS = ("noise_multiplier", "max_grad_norm", "expected_patients_per_step", "secure_noise")
_TARGET_FIELDS = ("target_epsilon", "target_delta", "max_grad_norm", "expected_patients_per_step", "secure_noise")
_TARGET_REQUIRED = ("target_epsilon", "max_grad_norm", "expected_patients_per_step")
_REQUIRED_FIELDS = ("noise_multiplier", "max_grad_norm")
#: Opacus's guard against dividing by a zero norm
_NORM_EPS = 1e-6


@dataclass(frozen=True)
class DPSGDSettings:
    """How a trainer runs DP-SGD.

    Attributes:
        noise_multiplier: :math:`z`, noise standard deviation over the clipping norm, > 0.
        max_grad_norm: :math:`C`, bound on one patient's summed gradient per step, > 0.
        expected_patients_per_step: :math:`m`; the Poisson rate is :math:`q = m / N`, an int >= 1.
        secure_noise: True (default) draws the noise and the patient sampling from the operating
            system's CSPRNG (``os.urandom``; see :mod:`medflare.privacy.noise_sources`); False
            uses ``torch.Generator`` seeded from the trainer's seed: reproducible, **not secure**,
            for tests and experiments only.

    Raises:
        TypeError, ValueError: naming the field, its value and the allowed range.
    """

    noise_multiplier: float
    max_grad_norm: float
    expected_patients_per_step: int
    secure_noise: bool = True

    def __post_init__(self):
        check_real("noise_multiplier", self.noise_multiplier, 0.0, None, low_open=True)
        check_real("max_grad_norm", self.max_grad_norm, 0.0, None, low_open=True)
        check_int("expected_patients_per_step", self.expected_patients_per_step, 1)
        if not isinstance(self.secure_noise, bool):
            raise TypeError(f"secure_noise must be true or false, got {self.secure_noise!r}")


@dataclass(frozen=True)
class DPSGDTarget:
    """DP-SGD asked for as a per-patient budget: the executor solves the noise multiplier for its
    site's sample rate and the run's planned steps (:func:`settings_for_target`).

    Attributes:
        target_epsilon: per-patient epsilon over the whole run at this site, in (0, inf).
        target_delta: its delta, in (0, 1); default 1e-5.
        max_grad_norm, expected_patients_per_step, secure_noise: as in :class:`DPSGDSettings`.

    Raises:
        TypeError, ValueError: naming the field, its value and the allowed range.
    """

    target_epsilon: float
    max_grad_norm: float
    expected_patients_per_step: int
    target_delta: float = 1e-5
    secure_noise: bool = True

    def __post_init__(self):
        check_real("target_epsilon", self.target_epsilon, 0.0, None, low_open=True)
        check_real("target_delta", self.target_delta, 0.0, 1.0, low_open=True, high_open=True)
        check_real("max_grad_norm", self.max_grad_norm, 0.0, None, low_open=True)
        check_int("expected_patients_per_step", self.expected_patients_per_step, 1)
        if not isinstance(self.secure_noise, bool):
            raise TypeError(f"secure_noise must be true or false, got {self.secure_noise!r}")


@dataclass(frozen=True)
class DPSGDRequirement:
    """The DP-SGD a site requires of every training task: at least ``noise_multiplier`` and at
    most ``max_grad_norm`` (both > 0)."""

    noise_multiplier: float
    max_grad_norm: float

    def __post_init__(self):
        check_real("noise_multiplier", self.noise_multiplier, 0.0, None, low_open=True)
        check_real("max_grad_norm", self.max_grad_norm, 0.0, None, low_open=True)


def _check_fields(value, argument: str, allowed: tuple, required: tuple) -> None:
    import difflib

    if not isinstance(value, Mapping):
        raise TypeError(f"{argument} must be null or a mapping with {list(required)}, got {value!r:.200}")
    for key in value:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{argument} has the unknown field {key!r}{hint}; allowed are {list(allowed)}")
    missing = [k for k in required if k not in value]
    if missing:
        raise ValueError(f"{argument} lacks {missing}; it needs {list(required)}")


def _named(argument: str, error: Exception) -> Exception:
    return type(error)(f"{argument}.{error}")


def _form_of(value, argument: str, allow_target: bool) -> type:
    """Which form a ``dp_sgd`` mapping takes: exactly one of ``noise_multiplier``
    (:class:`DPSGDSettings`) and ``target_epsilon`` (:class:`DPSGDTarget`, where allowed)."""
    if not isinstance(value, Mapping):
        return DPSGDSettings  # refused by _check_fields with the expected shape
    if not allow_target:
        if "target_epsilon" in value:
            raise ValueError(
                f"{argument} gives target_epsilon {value['target_epsilon']!r}, which only an executor resolves "
                "(it knows the run's planned steps); a trainer needs a noise_multiplier z > 0"
            )
        return DPSGDSettings
    _check_fields(value, argument, _SETTINGS_FIELDS + _TARGET_FIELDS[:2], ())  # a typo gets its hint first
    if "noise_multiplier" in value and "target_epsilon" in value:
        raise ValueError(
            f"{argument} gives both noise_multiplier {value['noise_multiplier']!r} and target_epsilon "
            f"{value['target_epsilon']!r}; give exactly one: noise_multiplier z > 0 (the same noise at every "
            "site) or target_epsilon > 0 (each site solves z for its sample rate and the run's planned steps)"
        )
    if "target_epsilon" in value:
        return DPSGDTarget
    if "target_delta" in value:
        raise ValueError(
            f"{argument} gives target_delta {value['target_delta']!r} without target_epsilon; it belongs to "
            "target_epsilon (with a noise_multiplier, the site's filter states delta)"
        )
    if "noise_multiplier" not in value:
        raise ValueError(
            f"{argument} lacks the noise: give exactly one of noise_multiplier z > 0 "
            "or target_epsilon > 0 (per patient, over the run)"
        )
    return DPSGDSettings


def parse_dp_sgd_settings(
    value, argument: str = "dp_sgd", allow_target: bool = False
) -> Union[DPSGDSettings, DPSGDTarget, None]:
    """A job's ``dp_sgd`` argument as settings, or None for null.

    The argument is null, a fixed noise ``{"noise_multiplier", "max_grad_norm",
    "expected_patients_per_step"[, "secure_noise"]}``, or, where ``allow_target`` (an executor,
    which knows the run's planned steps), a per-patient budget ``{"target_epsilon",
    "max_grad_norm", "expected_patients_per_step"[, "target_delta", "secure_noise"]}`` as a
    :class:`DPSGDTarget`: exactly one of ``noise_multiplier`` and ``target_epsilon``.

    Raises:
        TypeError, ValueError: naming ``argument``, the field and the allowed range.
    """
    if value is None:
        return None
    if isinstance(value, DPSGDSettings) or (allow_target and isinstance(value, DPSGDTarget)):
        return value
    form = _form_of(value, argument, allow_target)
    if form is DPSGDTarget:
        _check_fields(value, argument, _TARGET_FIELDS, _TARGET_REQUIRED)
    else:
        _check_fields(value, argument, _SETTINGS_FIELDS, _SETTINGS_FIELDS[:3])
    try:
        return form(**dict(value))
    except (TypeError, ValueError) as e:
        raise _named(argument, e) from None


def parse_dp_sgd_requirement(value, argument: str = "DP-SGD requirement") -> Optional[DPSGDRequirement]:
    """The site's requirement header (``{"noise_multiplier": z_min, "max_grad_norm": C_max}``),
    or None when absent (None).

    Raises:
        TypeError, ValueError: a malformed requirement; the task must then be refused.
    """
    if value is None:
        return None
    _check_fields(value, argument, _REQUIRED_FIELDS, _REQUIRED_FIELDS)
    try:
        return DPSGDRequirement(**dict(value))
    except (TypeError, ValueError) as e:
        raise _named(argument, e) from None


def effective_settings(
    job: Optional[DPSGDSettings], required: Optional[DPSGDRequirement], expected_patients_per_step: int
) -> Optional[DPSGDSettings]:
    """At least what the site requires: :math:`z = \\max(z_{job}, z_{site})`,
    :math:`C = \\min(C_{job}, C_{site})`.

    With no job settings and a site requirement, the site's values are used with
    ``expected_patients_per_step`` (the job's batch size) and secure noise. None when neither
    asks for DP-SGD.
    """
    if required is None:
        return job
    if job is None:
        return DPSGDSettings(required.noise_multiplier, required.max_grad_norm, expected_patients_per_step, True)
    return replace(
        job,
        noise_multiplier=max(float(job.noise_multiplier), float(required.noise_multiplier)),
        max_grad_norm=min(float(job.max_grad_norm), float(required.max_grad_norm)),
    )


def settings_for_target(target: DPSGDTarget, sample_rate: float, planned_steps: int) -> DPSGDSettings:
    """The settings that keep ``planned_steps`` steps at rate ``sample_rate`` within the target.

    Notes:
        :math:`z` = :func:`noise_multiplier_for_patient_epsilon` ``(target_epsilon,
        target_delta, q, T)`` (RDP): the per-patient epsilon of the :math:`T` steps is at most
        ``target_epsilon`` and within 0.01 of it. Neighbouring relation: add/remove one patient
        of this site. The guarantee covers at most :math:`T` steps at this :math:`z` (or a
        larger one, which only spends less); the caller keeps :math:`z` fixed and stops at
        :math:`T`.

    Raises:
        TypeError, ValueError: ``sample_rate`` not in (0, 1], ``planned_steps`` < 1.
    """
    if not isinstance(target, DPSGDTarget):
        raise TypeError(f"target must be a DPSGDTarget, got {target!r}")
    z = noise_multiplier_for_patient_epsilon(target.target_epsilon, target.target_delta, sample_rate, planned_steps)
    return DPSGDSettings(z, target.max_grad_norm, target.expected_patients_per_step, target.secure_noise)


# --- one step ---------------------------------------------------------------------------------


def patient_sample_rate(expected_patients_per_step: int, num_patients: int) -> float:
    """:math:`q = \\min(1, m / N)`; a site with fewer patients than ``m`` takes all of them each step.

    Raises:
        ValueError: ``num_patients`` < 1.
    """
    check_int("expected_patients_per_step", expected_patients_per_step, 1)
    check_int("num_patients", num_patients, 1)
    return min(1.0, expected_patients_per_step / num_patients)


def steps_per_epoch(sample_rate: float) -> int:
    """:math:`\\lceil 1 / q \\rceil`: steps that see each patient once in expectation."""
    check_real("sample_rate", sample_rate, 0.0, 1.0, low_open=True)
    return max(1, math.ceil(1.0 / sample_rate - 1e-9))


def planned_steps(epochs: int, sample_rate: float, steps: Optional[int] = None, max_steps: Optional[int] = None) -> int:
    """DP-SGD steps of one local round: ``steps`` when given, else ``epochs * ceil(1 / q)``, at
    most ``max_steps``. The trainers take this many (unless aborted), and ``medflare job check``
    plans a site's epsilon with it."""
    planned = steps if steps is not None else epochs * steps_per_epoch(sample_rate)
    return planned if max_steps is None else min(planned, max_steps)


def poisson_sample(num_patients: int, sample_rate: float, generator: Optional[torch.Generator] = None, uniform=None) -> torch.Tensor:
    """Indices of the patients in one step: each included independently with probability ``q``.

    Args:
        num_patients: N.
        sample_rate: q in (0, 1].
        generator: the source of the uniforms (seeded: reproducible, not secure).
        uniform: alternatively N uniforms in [0, 1) (e.g. from the OS's CSPRNG).

    Returns:
        a sorted ``int64`` tensor, possibly empty.
    """
    check_int("num_patients", num_patients, 0)
    check_real("sample_rate", sample_rate, 0.0, 1.0, low_open=True)
    u = torch.rand(num_patients, generator=generator) if uniform is None else torch.as_tensor(uniform)
    return torch.nonzero(u < sample_rate).flatten()


def clip_patient_gradients(
    per_sample: Mapping[str, torch.Tensor], patient_of_sample: torch.Tensor, num_patients: int, max_grad_norm: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Sum each patient's per-sample gradients, clip each patient's total to ``max_grad_norm``, sum over patients.

    Args:
        per_sample: ``{name: (S, *shape)}`` gradients of S samples (crops).
        patient_of_sample: ``(S,)`` patient of each sample, in ``[0, num_patients)``.
        num_patients: P, patients in the step.
        max_grad_norm: C.

    Returns:
        ``({name: shape} sum of clipped patient gradients, (P,) norms before clipping)``.
    """
    check_real("max_grad_norm", max_grad_norm, 0.0, None, low_open=True)
    per_patient = {}
    for name, g in per_sample.items():
        total = torch.zeros((num_patients,) + tuple(g.shape[1:]), dtype=g.dtype, device=g.device)
        per_patient[name] = total.index_add_(0, patient_of_sample.to(g.device), g)
    squares = [p.reshape(num_patients, -1).pow(2).sum(dim=1) for p in per_patient.values()]
    norms = torch.stack(squares, dim=1).sum(dim=1).sqrt()
    factor = (max_grad_norm / (norms + _NORM_EPS)).clamp(max=1.0)
    clipped = {name: torch.einsum("p,p...->...", factor.to(p.dtype), p) for name, p in per_patient.items()}
    return clipped, norms


def noisy_gradient(
    clipped_sum: Mapping[str, torch.Tensor],
    noise: Mapping[str, torch.Tensor],
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
) -> dict[str, torch.Tensor]:
    """:math:`(\\sum_p \\bar g_p + z C \\xi) / (qN)` for standard normal ``noise`` :math:`\\xi` of the same shapes."""
    std = float(noise_multiplier) * float(max_grad_norm)
    return {k: (clipped_sum[k] + std * noise[k].to(clipped_sum[k])) / expected_batch_size for k in clipped_sum}


# --- records and accounting -------------------------------------------------------------------


def dp_sgd_record(settings: DPSGDSettings, sample_rate: float, steps: int) -> dict:
    """The executor's part of the wire contract's DP-SGD record (``wire_contract.DP_SGD_RECORD``)."""
    return {
        "mechanism": MECHANISM,
        "neighbouring_relation": NEIGHBOURING_RELATION,
        "noise_multiplier": float(settings.noise_multiplier),
        "max_grad_norm": float(settings.max_grad_norm),
        "sample_rate": float(sample_rate),
        "steps": int(steps),
        "secure_noise": bool(settings.secure_noise),
    }


def combined_record(records) -> Optional[dict]:
    """One record that bounds several runs' composition from above (the site-only model's rounds).

    Records with the same (z, q) compose exactly by adding steps. Otherwise the record carries the
    smallest noise multiplier, the largest sample rate and clipping norm and all steps: since the
    epsilon of the subsampled Gaussian grows as z falls and as q rises, the epsilon of the
    combined record is at least that of the actual history.
    """
    records = [r for r in records if r]
    if not records:
        return None
    return {
        "mechanism": MECHANISM,
        "neighbouring_relation": NEIGHBOURING_RELATION,
        "noise_multiplier": min(float(r["noise_multiplier"]) for r in records),
        "max_grad_norm": max(float(r["max_grad_norm"]) for r in records),
        "sample_rate": max(float(r["sample_rate"]) for r in records),
        "steps": sum(int(r["steps"]) for r in records),
        "secure_noise": all(r.get("secure_noise") is True for r in records),
    }


def dp_sgd_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Per-patient epsilon after ``steps`` DP-SGD steps at Poisson rate ``sample_rate``.

    Notes:
        The history :math:`(z, q, T)` of the Poisson-subsampled Gaussian mechanism, composed by
        :func:`medflare.privacy.accounting.epsilon_of_history`: equal to Opacus's
        ``RDPAccountant`` / ``PRVAccountant`` for the same history. See the module notes for the
        neighbouring relation (add/remove one patient) and what voids the guarantee.

    Raises:
        TypeError, ValueError: z not in (0, inf), q not in (0, 1], steps < 0, delta not in (0, 1).
    """
    check_int("steps", steps, 0)
    return epsilon_of_history([(noise_multiplier, sample_rate, steps)], delta, accountant)


def noise_multiplier_for_patient_epsilon(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The noise multiplier (to Opacus's tolerance, 0.01 in epsilon) that keeps ``steps`` steps at
    rate ``sample_rate`` within ``(target_epsilon, delta)`` per patient
    (``opacus.accountants.utils.get_noise_multiplier``)."""
    from opacus.accountants.utils import get_noise_multiplier

    check_real("target_epsilon", target_epsilon, 0.0, None, low_open=True)
    check_real("delta", delta, 0.0, 1.0, low_open=True, high_open=True)
    check_real("sample_rate", sample_rate, 0.0, 1.0, low_open=True)
    check_int("steps", steps, 1)
    check_accountant(accountant)
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant
        )
    )
