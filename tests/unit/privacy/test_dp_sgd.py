"""DP-SGD's pure math: settings, Poisson sampling, per-patient clipping, noise, records and epsilon."""

from __future__ import annotations

import math

import pytest
import torch

from medflare.privacy.dp_sgd import (
    DPSGDRequirement,
    DPSGDSettings,
    DPSGDTarget,
    clip_patient_gradients,
    combined_record,
    dp_sgd_epsilon,
    dp_sgd_record,
    effective_settings,
    noise_multiplier_for_patient_epsilon,
    noisy_gradient,
    parse_dp_sgd_requirement,
    parse_dp_sgd_settings,
    patient_sample_rate,
    poisson_sample,
    settings_for_target,
    steps_per_epoch,
)
from medflare.wire_contract import DP_SGD_RECORD


# --- settings and the site's requirement ----------------------------------------------------

GOOD = {"noise_multiplier": 1.1, "max_grad_norm": 1.0, "expected_patients_per_step": 4}


@pytest.mark.parametrize(
    "value, error, message",
    [
        ("strong", TypeError, "dp_sgd must be null or a mapping"),
        ({**GOOD, "noise_multiplyer": 1.0}, ValueError, "did you mean 'noise_multiplier'"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 1.0}, ValueError, "lacks ['expected_patients_per_step']"),
        ({**GOOD, "noise_multiplier": 0.0}, ValueError, "dp_sgd.noise_multiplier must be in (0.0, inf)"),
        ({**GOOD, "noise_multiplier": -1}, ValueError, "dp_sgd.noise_multiplier"),
        ({**GOOD, "noise_multiplier": math.nan}, ValueError, "finite"),
        ({**GOOD, "noise_multiplier": math.inf}, ValueError, "finite"),
        ({**GOOD, "noise_multiplier": True}, TypeError, "got True"),
        ({**GOOD, "max_grad_norm": 0}, ValueError, "dp_sgd.max_grad_norm must be in (0.0, inf)"),
        ({**GOOD, "max_grad_norm": "1"}, TypeError, "dp_sgd.max_grad_norm"),
        ({**GOOD, "expected_patients_per_step": 0}, ValueError, "dp_sgd.expected_patients_per_step must be an int in [1, inf]"),
        ({**GOOD, "expected_patients_per_step": 2.0}, TypeError, "expected_patients_per_step"),
        ({**GOOD, "secure_noise": "yes"}, TypeError, "secure_noise must be true or false"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(value, error, message):
    with pytest.raises(error) as raised:
        parse_dp_sgd_settings(value)
    assert message in str(raised.value)


def test_settings_parse_and_default_to_secure_noise():
    assert parse_dp_sgd_settings(None) is None
    settings = parse_dp_sgd_settings(GOOD)
    assert settings == DPSGDSettings(1.1, 1.0, 4, True)
    assert parse_dp_sgd_settings({**GOOD, "secure_noise": False}).secure_noise is False


TARGET = {"target_epsilon": 1.0, "max_grad_norm": 1.0, "expected_patients_per_step": 4}


def test_a_target_parses_where_allowed_with_delta_and_secure_noise_defaults():
    assert parse_dp_sgd_settings(TARGET, allow_target=True) == DPSGDTarget(1.0, 1.0, 4, 1e-5, True)
    given = parse_dp_sgd_settings({**TARGET, "target_delta": 1e-6, "secure_noise": False}, allow_target=True)
    assert (given.target_delta, given.secure_noise) == (1e-6, False)
    # the fixed form still parses where a target is allowed
    assert parse_dp_sgd_settings(GOOD, allow_target=True) == DPSGDSettings(1.1, 1.0, 4, True)


@pytest.mark.parametrize(
    "value, error, message",
    [
        ({**TARGET, "noise_multiplier": 1.0}, ValueError, "dp_sgd gives both noise_multiplier 1.0 and target_epsilon 1.0; give exactly one"),
        ({"max_grad_norm": 1.0, "expected_patients_per_step": 4}, ValueError, "dp_sgd lacks the noise: give exactly one of noise_multiplier"),
        ({**GOOD, "target_delta": 1e-5}, ValueError, "dp_sgd gives target_delta 1e-05 without target_epsilon"),
        ({"target_epsilom": 1.0, "max_grad_norm": 1.0, "expected_patients_per_step": 4}, ValueError, "did you mean 'target_epsilon'"),
        ({"target_epsilon": 1.0, "max_grad_norm": 1.0}, ValueError, "dp_sgd lacks ['expected_patients_per_step']"),
        ({**TARGET, "target_epsilon": 0.0}, ValueError, "dp_sgd.target_epsilon must be in (0.0, inf), got 0.0"),
        ({**TARGET, "target_epsilon": math.inf}, ValueError, "dp_sgd.target_epsilon must be a finite"),
        ({**TARGET, "target_epsilon": True}, TypeError, "dp_sgd.target_epsilon must be a real number"),
        ({**TARGET, "target_delta": 1.0}, ValueError, "dp_sgd.target_delta must be in (0.0, 1.0), got 1.0"),
        ({**TARGET, "max_grad_norm": 0}, ValueError, "dp_sgd.max_grad_norm must be in (0.0, inf)"),
        ({**TARGET, "steps": 10}, ValueError, "dp_sgd has the unknown field 'steps'"),
    ],
)
def test_bad_targets_and_combinations_are_refused_naming_the_field(value, error, message):
    with pytest.raises(error) as raised:
        parse_dp_sgd_settings(value, allow_target=True)
    assert message in str(raised.value)


def test_a_trainer_refuses_a_target_it_cannot_resolve():
    with pytest.raises(ValueError, match="only an executor resolves"):
        parse_dp_sgd_settings(TARGET)


def test_settings_for_target_spend_the_target_at_sites_of_different_sizes():
    """The heart benchmark's largest and smallest hospitals, 15 rounds of 10 steps: one z would
    spend 0.15 at Cleveland where Switzerland spends 1; solved per site, both spend ~1."""
    target = DPSGDTarget(1.0, 1.0, 4)
    solved = {}
    for patients in (199, 30):
        q = patient_sample_rate(4, patients)
        settings = settings_for_target(target, q, 150)
        assert (settings.max_grad_norm, settings.expected_patients_per_step, settings.secure_noise) == (1.0, 4, True)
        spent = dp_sgd_epsilon(settings.noise_multiplier, q, 150, 1e-5)
        assert 0.99 <= spent <= 1.0  # within Opacus's tolerance of 0.01, never above
        solved[patients] = settings.noise_multiplier
    assert solved[199] < solved[30]
    assert dp_sgd_epsilon(solved[30], patient_sample_rate(4, 199), 150, 1e-5) < 0.2  # the single-z waste


def test_settings_for_target_refuse_a_plan_without_steps():
    with pytest.raises(ValueError, match="steps"):
        settings_for_target(DPSGDTarget(1.0, 1.0, 4), 0.1, 0)
    with pytest.raises(TypeError, match="DPSGDTarget"):
        settings_for_target(TARGET, 0.1, 10)


@pytest.mark.parametrize(
    "header, message",
    [
        ([1.0, 1.0], "must be null or a mapping"),
        ({"noise_multiplier": 1.0}, "lacks ['max_grad_norm']"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 1.0, "steps": 3}, "unknown field 'steps'"),
        ({"noise_multiplier": 0, "max_grad_norm": 1.0}, "noise_multiplier must be in (0.0, inf)"),
        ({"noise_multiplier": 1.0, "max_grad_norm": math.nan}, "max_grad_norm must be a finite"),
        ({"noise_multiplier": "1", "max_grad_norm": 1.0}, "noise_multiplier must be a real number"),
    ],
)
def test_malformed_requirements_are_refused(header, message):
    with pytest.raises((TypeError, ValueError)) as raised:
        parse_dp_sgd_requirement(header)
    assert message in str(raised.value)


def test_effective_settings_take_at_least_what_the_site_requires():
    job = DPSGDSettings(0.8, 2.0, 4, False)
    assert effective_settings(job, None, 9) is job
    assert effective_settings(None, None, 9) is None
    stronger = effective_settings(job, DPSGDRequirement(1.5, 1.0), 9)
    assert (stronger.noise_multiplier, stronger.max_grad_norm, stronger.expected_patients_per_step) == (1.5, 1.0, 4)
    assert stronger.secure_noise is False  # the job's choice is kept
    weaker_site = effective_settings(job, DPSGDRequirement(0.5, 3.0), 9)
    assert (weaker_site.noise_multiplier, weaker_site.max_grad_norm) == (0.8, 2.0)
    site_only = effective_settings(None, DPSGDRequirement(1.2, 0.5), 9)
    assert site_only == DPSGDSettings(1.2, 0.5, 9, True)


# --- sampling ---------------------------------------------------------------------------------


def test_poisson_sampling_includes_each_patient_at_rate_q_and_allows_empty_steps():
    generator = torch.Generator().manual_seed(0)
    n, q, trials = 50, 0.1, 4000
    counts = torch.zeros(n)
    sizes = []
    for _ in range(trials):
        chosen = poisson_sample(n, q, generator)
        counts[chosen] += 1
        sizes.append(len(chosen))
    # each patient's inclusion rate within 5 binomial standard deviations of q
    assert torch.all((counts / trials - q).abs() < 5 * math.sqrt(q * (1 - q) / trials))
    mean = sum(sizes) / trials
    assert abs(mean - q * n) < 0.1
    # P(empty) = (1 - q)^n = 0.5%: seen over 4000 steps, and batch sizes vary (not fixed-size batches)
    assert 0 in sizes and len(set(sizes)) > 5


def test_sample_rate_and_steps_per_epoch():
    assert patient_sample_rate(4, 40) == 0.1
    assert patient_sample_rate(8, 5) == 1.0  # a site smaller than the batch takes everyone
    assert steps_per_epoch(0.1) == 10 and steps_per_epoch(0.3) == 4 and steps_per_epoch(1.0) == 1
    with pytest.raises(ValueError, match="num_patients must be an int in \\[1, inf\\]"):
        patient_sample_rate(4, 0)


# --- clipping and noise ----------------------------------------------------------------------


@pytest.mark.parametrize("crops", [1, 2, 6])
def test_a_patient_contributes_at_most_max_grad_norm_whatever_its_number_of_crops(crops):
    generator = torch.Generator().manual_seed(crops)
    c = 0.5
    # patient 0 has `crops` crops with large gradients, patient 1 one small crop
    per_sample = {
        "w": torch.cat([3.0 * torch.randn(crops, 4, 3, generator=generator), 0.01 * torch.randn(1, 4, 3, generator=generator)]),
        "b": torch.cat([3.0 * torch.randn(crops, 3, generator=generator), 0.01 * torch.randn(1, 3, generator=generator)]),
    }
    owner = torch.tensor([0] * crops + [1])
    patient_total = {k: v[:crops].sum(0) for k, v in per_sample.items()}
    total_norm = math.sqrt(sum(float(v.pow(2).sum()) for v in patient_total.values()))

    clipped, norms = clip_patient_gradients(per_sample, owner, 2, c)

    assert norms[0] == pytest.approx(total_norm, rel=1e-5)  # summed first, then measured
    # patient 0's share of the clipped sum: its total scaled to norm C; patient 1 untouched
    scale = c / (total_norm + 1e-6)
    for k in per_sample:
        torch.testing.assert_close(clipped[k], scale * patient_total[k] + per_sample[k][crops])
    alone, _ = clip_patient_gradients({k: v[:crops] for k, v in per_sample.items()}, owner[:crops], 1, c)
    assert math.sqrt(sum(float(v.pow(2).sum()) for v in alone.values())) <= c * (1 + 1e-6)


def test_per_crop_clipping_would_not_bound_the_patient():
    """Clipping each crop instead of the patient's sum lets 6 crops move the step by 6 C."""
    per_sample = {"w": torch.ones(6, 2)}
    as_one_patient, _ = clip_patient_gradients(per_sample, torch.zeros(6, dtype=torch.int64), 1, 1.0)
    as_six, _ = clip_patient_gradients(per_sample, torch.arange(6), 6, 1.0)
    assert float(as_one_patient["w"].norm()) == pytest.approx(1.0, rel=1e-5)
    assert float(as_six["w"].norm()) == pytest.approx(6.0, rel=1e-5)


def test_noise_has_the_stated_scale_and_a_step_without_patients_is_pure_noise():
    generator = torch.Generator().manual_seed(1)
    zeros = {"w": torch.zeros(200_000)}
    noise = {"w": torch.randn(200_000, generator=generator)}
    z, c, expected = 1.3, 0.7, 5.0
    out = noisy_gradient(zeros, noise, z, c, expected)
    assert float(out["w"].std()) == pytest.approx(z * c / expected, rel=0.01)
    assert float(out["w"].abs().sum()) > 0
    clipped = {"w": torch.full((3,), 2.0)}
    torch.testing.assert_close(noisy_gradient(clipped, {"w": torch.zeros(3)}, z, c, 4.0)["w"], torch.full((3,), 0.5))


# --- records and accounting -------------------------------------------------------------------


def test_record_has_exactly_the_executor_fields_of_the_wire_contract():
    record = dp_sgd_record(DPSGDSettings(1.1, 0.9, 4, False), 0.25, 12)
    assert record == {
        "mechanism": "dp_sgd",
        "neighbouring_relation": "add/remove one patient",
        "noise_multiplier": 1.1,
        "max_grad_norm": 0.9,
        "sample_rate": 0.25,
        "steps": 12,
        "secure_noise": False,
    }
    assert DP_SGD_RECORD("record", record) == record


def test_combined_record_adds_steps_and_bounds_epsilon_from_above():
    a = dp_sgd_record(DPSGDSettings(1.0, 1.0, 4, False), 0.1, 10)
    b = dp_sgd_record(DPSGDSettings(1.5, 0.5, 4, False), 0.2, 5)
    combined = combined_record([a, None, b])
    assert (combined["noise_multiplier"], combined["sample_rate"], combined["max_grad_norm"], combined["steps"]) == (1.0, 0.2, 1.0, 15)
    from medflare.privacy.accounting import epsilon_of_history

    actual = epsilon_of_history([(1.0, 0.1, 10), (1.5, 0.2, 5)], 1e-5)
    assert dp_sgd_epsilon(1.0, 0.2, 15, 1e-5) >= actual
    assert combined_record([a, a])["steps"] == 20 and combined_record([]) is None


@pytest.mark.parametrize("z, q, steps", [(1.0, 0.01, 1000), (0.8, 0.1, 50), (2.0, 0.25, 400), (1.1, 1.0, 3)])
def test_epsilon_equals_opacus_rdp_accountant(z, q, steps):
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=z, sample_rate=q)
    assert dp_sgd_epsilon(z, q, steps, 1e-5, "rdp") == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


@pytest.mark.parametrize("z, q, steps", [(1.0, 0.01, 1000), (0.9, 0.1, 50)])
def test_epsilon_equals_opacus_prv_accountant(z, q, steps):
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = [(z, q, steps)]  # what step() would build after `steps` calls
    assert dp_sgd_epsilon(z, q, steps, 1e-5, "prv") == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-6)


def test_known_epsilon_and_the_noise_for_a_target():
    # Abadi et al.'s MNIST regime: q = 0.01, z = 1.1, 100 epochs -> a single-digit epsilon
    eps = dp_sgd_epsilon(1.1, 0.01, 10_000, 1e-5)
    assert 5 < eps < 10
    assert dp_sgd_epsilon(1.1, 0.01, 0, 1e-5) == 0.0
    z = noise_multiplier_for_patient_epsilon(3.0, 1e-5, 0.05, 200)
    assert dp_sgd_epsilon(z, 0.05, 200, 1e-5) <= 3.0
    assert dp_sgd_epsilon(z * 0.95, 0.05, 200, 1e-5) > dp_sgd_epsilon(z, 0.05, 200, 1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(noise_multiplier=0.0, sample_rate=0.1, steps=1, delta=1e-5), "noise_multiplier"),
        (dict(noise_multiplier=1.0, sample_rate=1.5, steps=1, delta=1e-5), "sample_rate"),
        (dict(noise_multiplier=1.0, sample_rate=0.1, steps=-1, delta=1e-5), "steps"),
        (dict(noise_multiplier=1.0, sample_rate=0.1, steps=1, delta=1.0), "delta"),
        (dict(noise_multiplier=1.0, sample_rate=0.1, steps=1, delta=1e-5, accountant="gdp"), "accountant"),
    ],
)
def test_accounting_refuses_out_of_range_arguments(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        dp_sgd_epsilon(**kwargs)


@pytest.mark.parametrize(
    "epochs, q, steps, max_steps, expected",
    [(1, 0.1, None, None, 10), (2, 0.3, None, None, 8), (1, 1.0, None, None, 1), (3, 0.1, 5, None, 5), (1, 0.1, None, 4, 4), (1, 0.5, None, 9, 2)],
)
def test_planned_steps_is_what_the_trainers_take_per_round(epochs, q, steps, max_steps, expected):
    from medflare.privacy.dp_sgd import planned_steps

    assert planned_steps(epochs, q, steps, max_steps) == expected
