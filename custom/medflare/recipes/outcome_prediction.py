"""The EXAM-style outcome study: oxygen need at 24 h and 72 h from a chest X-ray and eight
clinical values (Dayan et al. 2021, Nature Medicine 27, EXAM).

One function, :func:`outcome_prediction`, builds every ``cxr_emr_*`` job from its options; the
shipped folders are its output (:mod:`medflare.recipes.shipped_jobs`). Each site also keeps a
model trained on its own data alone (``local_model="site_only"``), so cross-site evaluation
gives EXAM's table: the global model and every single-site model, scored at every site.
"""

from __future__ import annotations

from typing import Mapping, Optional

from medflare.data.cxr_synthetic import CLINICAL_COLUMNS, LABEL_COLUMNS
from medflare.recipes import app_parts as parts
from medflare.recipes.job_definition import JobDefinition
from medflare.recipes.study_options import check_choice, check_int, check_optional_int, check_real

__all__ = ["PRIVACY", "outcome_prediction"]

#: what the job itself does to an update before it leaves a site: nothing (the site's own
#: scope alone) or patient-level DP-SGD
PRIVACY = ("none", "dpsgd")

_OUTCOME_NET = "medflare.training.outcome_networks.OutcomeNet"
_IMAGE_NETWORK = {
    "path": "monai.networks.nets.ResNet",
    "args": {
        "block": "basic",
        "layers": [1, 1, 1, 1],
        "block_inplanes": [16, 32, 64, 128],
        "spatial_dims": 2,
        "n_input_channels": 1,
        "num_classes": 32,
    },
    "config_type": "dict",
}
_KEY_METRIC = "auc"
#: 100x the demo's largest NUM_STEPS (2 epochs x ceil(cases / batch 8) = 18)
_MAX_WEIGHT = 1800
#: admits the shipped site profiles' envelopes (Gaussian DP 1360) under both privacy modes
_MAX_UPDATE_NORM = 1400.0

#: the local training each privacy mode ships with; DP-SGD trains a GroupNorm network (no
#: running statistics to leak) with plain SGD for a fixed number of Poisson-sampled steps
_TRAINING = {
    "none": {"local_epochs": 2, "local_steps": None, "learning_rate": 0.001, "optimizer": "adam"},
    "dpsgd": {"local_epochs": 1, "local_steps": 5, "learning_rate": 0.2, "optimizer": "sgd"},
}
_DP_SGD = {"noise_multiplier": 1.7, "max_grad_norm": 1.0}
_DP_SGD_FILTER = {"target_delta": 1e-05, "accountant": "rdp"}

_BOUNDS = {
    "none": (
        "d = 313,922 float parameters (BatchNorm running statistics included). Plain update (2 epochs, "
        "Adam): norm 13-16 in round 0, 6-9 in round 1. Envelopes: partial sharing (10%, +-0.1) <= "
        "17.7; Gaussian DP (C=1, z=2.4) <= C + zC (sqrt(d) + 6) = 1360. max_update_norm 1400 admits "
        "all of them. max_weight 1800 = 100x the demo's largest NUM_STEPS (2 epochs x ceil(cases / "
        "batch 8) = 18). See docs/aggregation.md."
    ),
    "dpsgd": (
        "d = 312,482 float parameters (GroupNorm: no running statistics). DP-SGD update (5 plain SGD "
        "steps per round at lr 0.2, per-patient clipping C=1, z=1.7, 8 patients per step expected; the "
        "noise included): norm 53.0-53.3 in every round at every site (the noise sets it: lr z C "
        "sqrt(d) sqrt(5) / 8 = 53.2). Envelopes of the shipped site profiles: partial sharing (10%, "
        "+-0.1) <= 17.7; Gaussian DP (C=1, z=2.4) <= C + zC (sqrt(d) + 6) = 1357. The job names no "
        "scope, so a site may still run it under its Gaussian DP scope: max_update_norm 1400 admits "
        "all of them (26x a DP-SGD update). Weights are withheld under DP-SGD (equal weights); "
        "max_weight 1800 as cxr_emr_fedavg. See docs/aggregation.md."
    ),
}


def outcome_prediction(
    name: str,
    *,
    privacy: str = "none",
    num_rounds: int = 15,
    min_clients: int = 2,
    local_epochs: Optional[int] = None,
    local_steps: Optional[int] = None,
    learning_rate: Optional[float] = None,
    batch_size: int = 8,
    required_preparation: Optional[Mapping] = None,
) -> JobDefinition:
    """A chest X-ray + clinical values outcome job (FedAvg, cross-site evaluation).

    Args:
        name: the job's name (its folder's name).
        privacy: one of :data:`PRIVACY`: ``"none"`` (the site's own scope alone) or ``"dpsgd"``
            (patient-level DP-SGD, z 1.7, C 1, on the GroupNorm network with plain SGD; its
            filters cover ``train`` and ``submit_model``).
        num_rounds: training rounds, an int >= 1.
        min_clients: sites that must take part, an int >= 1.
        local_epochs: passes over a site's cases a round when ``local_steps`` is not set, an
            int >= 1; ``None``: 2, or 1 with ``privacy="dpsgd"``.
        local_steps: exactly this many steps a round instead, an int >= 1; ``None``: epochs
            only, or 5 with ``privacy="dpsgd"``.
        learning_rate: in (0, 1]; ``None``: 0.001 (Adam), or 0.2 (SGD) with ``privacy="dpsgd"``.
        batch_size: cases per step, an int >= 1; under DP-SGD also the patients expected per
            step.
        required_preparation: ``{"name", "version"[, "parameters_hash"]}`` every site's
            ``medflare prepare`` manifest must meet
            (:func:`medflare.preparation.verification.check_required_preparation`).

    Returns:
        The job; its server config's ``aggregator_bounds`` says how the aggregator's bounds
        were derived for the shipped settings.

    Raises:
        TypeError: an option of the wrong type (bool is not an int).
        ValueError: an option out of range or not a known choice.
    """
    check_choice("privacy", privacy, PRIVACY)
    check_int("num_rounds", num_rounds, 1)
    check_int("min_clients", min_clients, 1)
    training = dict(_TRAINING[privacy])
    training["local_epochs"] = check_optional_int("local_epochs", local_epochs, training["local_epochs"])
    training["local_steps"] = check_optional_int("local_steps", local_steps, training["local_steps"])
    if learning_rate is not None:
        check_real("learning_rate", learning_rate, 0.0, 1.0, low_open=True)
        training["learning_rate"] = learning_rate
    check_int("batch_size", batch_size, 1)
    training["batch_size"] = batch_size
    evaluation = parts.cross_site_model_eval()
    server = parts.server_app(
        num_rounds=num_rounds,
        min_clients=min_clients,
        model=_network(privacy),
        model_as_component=True,
        shareable_generator=parts.full_model_shareable_generator(),
        aggregator=parts.validated_aggregator(_MAX_UPDATE_NORM, _MAX_WEIGHT),
        key_metric=_KEY_METRIC,
        evaluation=evaluation,
        aggregator_bounds=_BOUNDS[privacy],
    )
    filters = ([], [])
    if privacy == "dpsgd":
        filters = parts.patient_dp_sgd_filters(parts.releasing_tasks(evaluation), **_DP_SGD, **_DP_SGD_FILTER)
    executor = _executor(privacy, training)
    if required_preparation is not None:
        from medflare.preparation.verification import check_required_preparation

        executor["args"]["required_preparation"] = check_required_preparation(required_preparation)
    client = parts.client_app(executor, *filters)
    return JobDefinition(name, min_clients, parts.with_model_export(server, client), client)


def _network(privacy: str) -> dict:
    args = {
        "num_outputs": len(LABEL_COLUMNS),
        "clinical_features": len(CLINICAL_COLUMNS),
        "image_network": _IMAGE_NETWORK,
        "image_features": 32,
        "clinical_hidden": [16],
        "dropout": 0.1,
        "seed": 0,
    }
    if privacy == "dpsgd":
        args["norm"] = "group"
    return parts.network(_OUTCOME_NET, args)


def _executor(privacy: str, training: dict) -> dict:
    args = {
        "model": _network(privacy),
        "label_columns": list(LABEL_COLUMNS),
        "clinical_columns": list(CLINICAL_COLUMNS),
        "image_column": "image",
        "image_size": [64, 64],
        "local_epochs": training["local_epochs"],
        "batch_size": training["batch_size"],
        "learning_rate": training["learning_rate"],
        "optimizer": training["optimizer"],
        "clinical_normalisation": "site",
        "local_model": "site_only",
        "device": "auto",
        "seed": 0,
    }
    if training["local_steps"] is not None:
        args["local_steps"] = training["local_steps"]
    if privacy == "dpsgd":
        args["dp_sgd"] = parts.dp_sgd_settings(expected_patients_per_step=training["batch_size"], **_DP_SGD)
    return parts.executor("medflare.executors.outcome_executor.OutcomeExecutor", args)
