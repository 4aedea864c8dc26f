"""The Fed-Heart-Disease study (FLamby, Ogier du Terrail et al. 2022): logistic regression on
13 clinical inputs at the four UCI hospitals, weighted by each hospital's training cases.

One function, :func:`heart_disease`, builds every ``heart_disease_*`` job from its options; the
shipped folders are its output (:mod:`medflare.recipes.shipped_jobs`). Cross-site evaluation
scores the global model and every hospital's own model at every hospital.
"""

from __future__ import annotations

from typing import Optional

from medflare.data.heart_disease import HOSPITALS, INPUTS
from medflare.recipes import app_parts as parts
from medflare.recipes.job_definition import JobDefinition
from medflare.recipes.study_options import check_choice, check_int, check_optional_int, check_real
from medflare.wire_contract import NUM_TRAIN_CASES

__all__ = ["AGGREGATIONS", "PRIVACY", "heart_disease"]

#: how the server turns the round's mean update into the next global model
AGGREGATIONS = ("fedavg", "fedyogi")
#: what the job itself does to an update before it leaves a site: nothing (the site's own
#: scope alone), patient-level DP-SGD, or CKKS secure aggregation (by the sites'
#: ``secure_aggregation`` scope)
PRIVACY = ("none", "dpsgd", "he")

_OUTCOME_NET = "medflare.training.outcome_networks.OutcomeNet"
_LABEL_COLUMNS = ("label",)
_KEY_METRIC = "accuracy"
#: 100x the demo's largest num_train_cases (Cleveland, 199)
_MAX_WEIGHT = 20000
#: admits the shipped site profiles' envelopes (Gaussian DP 24.4) on the 14-parameter model
_MAX_UPDATE_NORM = 25.0
_YOGI = {"lr": 0.01, "betas": (0.9, 0.999), "tau": 1e-08}

_LOCAL_STEPS = 100
_LEARNING_RATE = 0.001
#: the local learning rate the FedYogi job ships with (10^-2.5, rounded)
_FEDYOGI_LEARNING_RATE = 0.003162
_DP_SGD_LOCAL_STEPS = 10
_DP_SGD_LEARNING_RATE = 0.05
_DP_SGD = {"noise_multiplier": 1.8, "max_grad_norm": 1.0}
_DP_SGD_FILTER = {"target_delta": 1e-05, "accountant": "rdp"}

_FEDAVG_BOUNDS = (
    "d = 14 (logistic regression on 13 inputs). Plain update (100 SGD steps, lr 0.001): norm "
    "0.04-0.063. Envelopes: partial sharing (10%, +-0.1) <= 0.1; Gaussian DP (C=1, z=2.4) <= C + "
    "zC (sqrt(d) + 6) = 24.4. max_update_norm 25 admits all of them (400x a plain update, because "
    "of the DP profile). max_weight 20000 = 100x the demo's largest num_train_cases (Cleveland, "
    "199). See docs/aggregation.md."
)
_FEDYOGI_BOUNDS = (
    "d = 14 (logistic regression on 13 inputs). Plain update (100 SGD steps, lr 0.003162): norm "
    "0.12-0.19. Envelopes: partial sharing (10%, +-0.1) <= 0.1; Gaussian DP (C=1, z=2.4) <= C + zC "
    "(sqrt(d) + 6) = 24.4. max_update_norm 25 admits all of them. max_weight 20000 = 100x the "
    "demo's largest num_train_cases (Cleveland, 199). See docs/aggregation.md."
)
_DP_SGD_BOUNDS = (
    "d = 14 (logistic regression on 13 inputs). DP-SGD update (10 steps per round, lr 0.05, "
    "per-patient clipping C=1, z=1.8, 4 patients per step expected; the noise included): norm "
    "0.20-0.34 in round 0, 0.21-0.40 in round 1, 0.16-0.43 over 15 rounds (two runs of the demo). "
    "Envelopes of the shipped site profiles: partial sharing (10%, +-0.1) <= 0.1; Gaussian DP "
    "(C=1, z=2.4) <= C + zC (sqrt(d) + 6) = 24.4. The job names no scope, so a site may still run "
    "it under its Gaussian DP scope: max_update_norm 25 admits all of them (60x a DP-SGD update). "
    "Weights are withheld under DP-SGD (equal weights); max_weight 20000 as heart_disease_fedavg. "
    "See docs/aggregation.md."
)
_HE_BOUNDS = parts.he_aggregator_bounds("FLamby's weighting", _MAX_WEIGHT)


def heart_disease(
    name: str,
    *,
    aggregation: str = "fedavg",
    privacy: str = "none",
    num_rounds: int = 15,
    min_clients: int = len(HOSPITALS),
    local_steps: Optional[int] = None,
    learning_rate: Optional[float] = None,
    batch_size: int = 4,
) -> JobDefinition:
    """A Fed-Heart-Disease job (weights: ``num_train_cases``; cross-site evaluation).

    Args:
        name: the job's name (its folder's name).
        aggregation: the server step, one of :data:`AGGREGATIONS`: ``"fedavg"`` (the mean
            update added) or ``"fedyogi"`` (Yogi on the mean update, lr 0.01, betas
            (0.9, 0.999), tau 1e-8).
        privacy: what the job does to an update at the site, one of :data:`PRIVACY`:
            ``"none"`` (the site's own scope alone), ``"dpsgd"`` (patient-level DP-SGD, z 1.8,
            C 1; its filters cover ``train`` and ``submit_model``) or ``"he"`` (the sites'
            ``secure_aggregation`` scope encrypts; the server sums ciphertexts).
        num_rounds: training rounds, an int >= 1.
        min_clients: hospitals that must take part, an int in [1, 4].
        local_steps: SGD steps a round (FLamby's ``num_updates``), an int >= 1; ``None``: 100,
            or 10 with ``privacy="dpsgd"``.
        learning_rate: the hospitals' SGD learning rate, in (0, 1]; ``None``: 0.001, 0.003162
            with ``aggregation="fedyogi"``, or 0.05 with ``privacy="dpsgd"`` (DP-SGD's wins).
        batch_size: cases per step, an int >= 1; under DP-SGD also the patients expected per
            step.

    Returns:
        The job; its server config's ``aggregator_bounds`` says how the aggregator's bounds
        were derived for the shipped settings.

    Raises:
        TypeError: an option of the wrong type (bool is not an int).
        ValueError: an option out of range or not a known choice, or FedYogi with HE.
    """
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_choice("privacy", privacy, PRIVACY)
    check_int("num_rounds", num_rounds, 1)
    check_int("min_clients", min_clients, 1, len(HOSPITALS))
    dp_sgd = privacy == "dpsgd"
    local_steps = check_optional_int("local_steps", local_steps, _DP_SGD_LOCAL_STEPS if dp_sgd else _LOCAL_STEPS)
    if learning_rate is None:
        learning_rate = _default_learning_rate(aggregation, privacy)
    check_real("learning_rate", learning_rate, 0.0, 1.0, low_open=True)
    check_int("batch_size", batch_size, 1)
    if aggregation == "fedyogi" and privacy == "he":
        raise ValueError(
            "aggregation='fedyogi' cannot be combined with privacy='he': the HE server only sums "
            "ciphertexts and cannot run a server optimizer on them; use aggregation='fedavg' with "
            "privacy='he', or privacy 'none' or 'dpsgd' with 'fedyogi'"
        )
    evaluation = parts.cross_site_model_eval(encrypted=privacy == "he")
    filters = ([], [])
    if dp_sgd:
        filters = parts.patient_dp_sgd_filters(parts.releasing_tasks(evaluation), **_DP_SGD, **_DP_SGD_FILTER)
    client = parts.client_app(_executor(privacy, local_steps, learning_rate, batch_size), *filters)
    server = _server(aggregation, privacy, num_rounds, min_clients, evaluation)
    scope = parts.SECURE_AGGREGATION_SCOPE if privacy == "he" else None
    return JobDefinition(name, min_clients, parts.with_model_export(server, client), client, scope)


def _default_learning_rate(aggregation: str, privacy: str) -> float:
    if privacy == "dpsgd":
        return _DP_SGD_LEARNING_RATE
    return _FEDYOGI_LEARNING_RATE if aggregation == "fedyogi" else _LEARNING_RATE


def _network(privacy: str) -> dict:
    args = {
        "num_outputs": len(_LABEL_COLUMNS),
        "clinical_features": len(INPUTS),
        "image_network": None,
        "clinical_hidden": [],
        "dropout": 0.0,
        "seed": 0,
    }
    if privacy == "dpsgd":
        args["norm"] = "group"
    return parts.network(_OUTCOME_NET, args)


def _server(aggregation: str, privacy: str, num_rounds: int, min_clients: int, evaluation: dict) -> dict:
    encrypted = privacy == "he"
    if encrypted:
        generator = parts.he_shareable_generator()
        aggregator = parts.encrypted_aggregator(parts.HE_MAX_UPDATE_NORM, _MAX_WEIGHT, NUM_TRAIN_CASES)
        bounds = _HE_BOUNDS
    else:
        generator = (
            parts.fedyogi_shareable_generator(**_YOGI)
            if aggregation == "fedyogi"
            else parts.full_model_shareable_generator()
        )
        aggregator = parts.validated_aggregator(_MAX_UPDATE_NORM, _MAX_WEIGHT, NUM_TRAIN_CASES)
        if privacy == "dpsgd":
            bounds = _DP_SGD_BOUNDS
        else:
            bounds = _FEDYOGI_BOUNDS if aggregation == "fedyogi" else _FEDAVG_BOUNDS
    return parts.server_app(
        num_rounds=num_rounds,
        min_clients=min_clients,
        model=_network(privacy),
        model_as_component=True,
        shareable_generator=generator,
        aggregator=aggregator,
        key_metric=_KEY_METRIC,
        evaluation=evaluation,
        aggregator_bounds=bounds,
        encrypted=encrypted,
    )


def _executor(privacy: str, local_steps: int, learning_rate: float, batch_size: int) -> dict:
    args = {
        "model": _network(privacy),
        "label_columns": list(_LABEL_COLUMNS),
        "clinical_columns": list(INPUTS),
        "image_column": None,
        "local_steps": local_steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "optimizer": "sgd",
        "clinical_normalisation": "site",
        "device": "auto",
        "seed": 0,
        "local_model": "site_only",
    }
    if privacy == "dpsgd":
        args["dp_sgd"] = parts.dp_sgd_settings(expected_patients_per_step=batch_size, **_DP_SGD)
    return parts.executor("medflare.executors.outcome_executor.OutcomeExecutor", args)
