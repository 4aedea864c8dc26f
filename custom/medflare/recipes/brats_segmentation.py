"""The BraTS segmentation study: a seeded SegResNet trained on four-channel MRI crops.

One function, :func:`brats_segmentation`, builds every BraTS job from its options; the shipped
``jobs/brats_*`` folders are its output (:mod:`medflare.recipes.shipped_jobs`). The global
model is scored by every site at the end (``GlobalModelEval``); no site model leaves a site.
"""

from __future__ import annotations

from typing import Mapping, Optional

from medflare.training.model_spec import DEFAULT_SEGRESNET
from medflare.recipes import app_parts as parts
from medflare.recipes.job_definition import JobDefinition
from medflare.recipes.study_options import check_choice, check_int, check_optional_int, check_real
from medflare.wire_contract import NUM_TRAIN_CASES

__all__ = ["AGGREGATIONS", "PRIVACY", "brats_segmentation"]

#: how the server turns the round's mean update into the next global model
AGGREGATIONS = ("fedavg", "fedyogi")
#: what the job itself does to an update before it leaves a site: nothing, percentile sharing,
#: a clipped Gaussian release, patient-level DP-SGD, or CKKS secure aggregation (by the sites'
#: ``secure_aggregation`` scope)
PRIVACY = ("none", "percentile", "gaussian", "dpsgd", "he")

_SEGRESNET = "medflare.training.seeded_networks.SeededSegResNet"
#: the DP-SGD-compatible variant (same state dict as SeededSegResNet)
_DP_SEGRESNET = "medflare.training.seeded_networks.SeededDPSegResNet"
#: medflare's CPU-sized SegResNet, seeded
_NETWORK_ARGS = {**DEFAULT_SEGRESNET["args"], "seed": 0}
_KEY_METRIC = "dice_mean"
#: 100x the demo's largest NUM_STEPS (4 epochs x ceil(12 cases / batch 2) = 24)
_MAX_WEIGHT = 2400
_YOGI = {"lr": 0.01, "betas": (0.9, 0.99), "tau": 0.001}
_LOCAL_EPOCHS = {"dpsgd": 1}
_DEFAULT_LOCAL_EPOCHS = 4

_PERCENTILE = {"fraction_shared": 0.1, "gamma": 0.1, "sparse_transport": True}
_GAUSSIAN = {
    "clipping_norm": 1.0,
    "target_epsilon": 10.0,
    "target_delta": 1e-05,
    "max_epsilon": 12.0,
    "accountant": "rdp",
}
#: the rounds the Gaussian job's max_update_norm was derived for: more rounds at the same epsilon
#: solve a larger z, whose envelope C + zC (sqrt(d) + 6) passes 1900 from 11 rounds on
_GAUSSIAN_MAX_ROUNDS = 10
_DP_SGD = {"noise_multiplier": 1.5, "max_grad_norm": 1.0}
_DP_SGD_FILTER = {"target_delta": 1e-05, "accountant": "rdp"}
_DP_SGD_STEPS_PER_ROUND = 4
_DP_SGD_CROPS_PER_PATIENT = 2

#: max_update_norm by privacy: the envelope every result of that job can reach (see the notes)
_MAX_UPDATE_NORM = {
    "none": 2700.0,
    "percentile": 40.0,
    "gaussian": 1900.0,
    "dpsgd": 2700.0,
    "he": parts.HE_MAX_UPDATE_NORM,
}

_FEDAVG_BOUNDS = (
    "d = 1,176,843 float parameters. Plain update (4 epochs, 2 rounds of the demo): norm 27-30 in "
    "round 0, 10-12 in round 1. Envelopes of the shipped site profiles: partial sharing (10%, "
    "+-0.1) <= 0.1*sqrt(0.1 d) = 34.3; Gaussian DP (C=1, z=2.4) <= C + zC (sqrt(d) + 6) = 2619. "
    "max_update_norm 2700 admits all of them; it is 90x a plain update because a clinical (DP) "
    "site's honest update is that large. max_weight 2400 = 100x the demo's largest NUM_STEPS (4 "
    "epochs x ceil(12 cases / batch 2) = 24). See docs/aggregation.md."
)
_FEDYOGI_BOUNDS = (
    "As brats_fedavg (same network and local training): d = 1,176,843; plain update norm 27-30 "
    "(round 0), 10-12 (round 1); partial-sharing envelope 34.3; Gaussian DP (C=1, z=2.4) envelope "
    "2619. max_update_norm 2700 admits every shipped site profile. max_weight 2400 = 100x the "
    "demo's largest NUM_STEPS (24). See docs/aggregation.md."
)
#: the aggregator_bounds note of a job with the job's own privacy, by privacy
_PRIVACY_BOUNDS = {
    "percentile": (
        "The job's own percentile-sharing filter (10% shared, clipped to +-0.1) runs after any site "
        "filter, so every result has norm <= 0.1 sqrt(round(0.1 d)) = 34.3 with d = 1,176,843 (the "
        "plain update, 27-30, and a DP site's 2619 are cut to it). max_update_norm 40. max_weight 2400 "
        "= 100x the demo's largest NUM_STEPS (24). See docs/aggregation.md."
    ),
    "gaussian": (
        "The job's own Gaussian filter (C=1, z=1.675 solved for epsilon 10 over 10 rounds) runs after "
        "any site filter, so every result is clipped to 1 and noised: norm <= C + zC (sqrt(d) + 6) = "
        "1828 with d = 1,176,843 (the plain update, 27-30, and the site profiles' envelopes are "
        "replaced by it). max_update_norm 1900. max_weight 2400 = 100x the demo's largest NUM_STEPS "
        "(24). See docs/aggregation.md."
    ),
    "dpsgd": (
        "d = 1,176,843 float parameters (SeededDPSegResNet has SegResNet's state dict). DP-SGD update "
        "(4 Adam steps per round at lr 0.005, per-patient clipping C=1, z=1.5, 2 patients per step "
        "expected, 2 crops each; the noise included): norm 12.5 in round 0, 8.0 in round 1, 4.7-6.6 "
        "after, the same at every site (the noise sets it). Envelopes of the shipped site profiles: "
        "partial sharing (10%, +-0.1) <= 34.3; Gaussian DP (C=1, z=2.4) <= C + zC (sqrt(d) + 6) = "
        "2619. The job names no scope, so a site may still run it under its Gaussian DP scope: "
        "max_update_norm 2700 admits all of them (210x a DP-SGD update). Weights are withheld under "
        "DP-SGD (equal weights); max_weight 2400 as brats_fedavg. See docs/aggregation.md."
    ),
    "he": parts.he_aggregator_bounds("the encryptors' weight_meta_key", _MAX_WEIGHT),
}


def brats_segmentation(
    name: str,
    *,
    aggregation: str = "fedavg",
    privacy: str = "none",
    num_rounds: int = 10,
    min_clients: int = 2,
    local_epochs: Optional[int] = None,
    learning_rate: float = 0.005,
    batch_size: int = 2,
    bundle: Optional[Mapping] = None,
    network_args: Optional[Mapping] = None,
    required_preparation: Optional[Mapping] = None,
) -> JobDefinition:
    """A BraTS segmentation job.

    Args:
        name: the job's name (its folder's name).
        aggregation: the server step, one of :data:`AGGREGATIONS`: ``"fedavg"`` (the mean
            update added) or ``"fedyogi"`` (Yogi on the mean update, lr 0.01, betas (0.9, 0.99),
            tau 1e-3).
        privacy: what the job does to an update at the site, one of :data:`PRIVACY`:
            ``"none"`` (the site's own scope alone), ``"percentile"`` (10% shared, clipped to
            +-0.1), ``"gaussian"`` (clipped to 1, noise solved for epsilon 10 over
            ``num_rounds`` releases, delta 1e-5), ``"dpsgd"`` (patient-level DP-SGD, z 1.5,
            C 1, 4 steps a round of 2 crops per patient, on the DP-compatible SegResNet) or
            ``"he"`` (the sites' ``secure_aggregation`` scope encrypts; the server sums
            ciphertexts).
        num_rounds: training rounds, an int >= 1 (at most 10 with ``privacy="gaussian"``).
        min_clients: sites that must take part, an int >= 1.
        local_epochs: passes over a site's data a round, an int >= 1; ``None``: 4, or 1 with
            ``privacy="dpsgd"`` (whose rounds are capped at 4 steps).
        learning_rate: the sites' Adam learning rate, in (0, 1].
        batch_size: crops per step, an int >= 1; under DP-SGD also the patients expected per
            step.
        bundle: a MONAI bundle the sites installed and allow-listed, named as
            ``{"bundle": NAME[, "version", "network_key", "use_preprocessing", "load_weights"]}``
            (:func:`medflare.training.bundle_registry.parse_bundle_request`); the sites train its
            network, which must equal the job's SegResNet (``network_args``). Not with
            ``privacy="dpsgd"`` (a bundle's SegResNet is not DP-SGD compatible).
        network_args: the SegResNet's arguments when they differ from the shipped ones (to
            match a bundle's ``network_def``); only with ``bundle``.
        required_preparation: ``{"name", "version"[, "parameters_hash"]}`` every site's
            ``medflare prepare`` manifest must meet
            (:func:`medflare.preparation.verification.check_required_preparation`).

    Returns:
        The job; its server config's ``aggregator_bounds`` says how the aggregator's bounds
        were derived for the shipped settings.

    Raises:
        TypeError: an option of the wrong type (bool is not an int).
        ValueError: an option out of range or not a known choice, or a combination the study
            cannot run: FedYogi with HE; the Gaussian job past 10 rounds.
    """
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_choice("privacy", privacy, PRIVACY)
    check_int("num_rounds", num_rounds, 1)
    check_int("min_clients", min_clients, 1)
    local_epochs = check_optional_int("local_epochs", local_epochs, _LOCAL_EPOCHS.get(privacy, _DEFAULT_LOCAL_EPOCHS))
    check_real("learning_rate", learning_rate, 0.0, 1.0, low_open=True)
    check_int("batch_size", batch_size, 1)
    _check_combination(aggregation, privacy, num_rounds)
    network = _checked_network(privacy, bundle, network_args)
    server = _server(aggregation, privacy, num_rounds, min_clients, network)
    executor = _executor(privacy, local_epochs, learning_rate, batch_size, network)
    args = executor["args"]
    if bundle is not None:
        from medflare.training.bundle_registry import parse_bundle_request

        parse_bundle_request(bundle, "bundle")
        args["model"] = {**dict(bundle), "network": network}
    if required_preparation is not None:
        from medflare.preparation.verification import check_required_preparation

        args["required_preparation"] = check_required_preparation(required_preparation)
    client = parts.client_app(executor, *_job_filters(privacy, num_rounds))
    scope = parts.SECURE_AGGREGATION_SCOPE if privacy == "he" else None
    return JobDefinition(name, min_clients, parts.with_model_export(server, client), client, scope)


def _check_combination(aggregation: str, privacy: str, num_rounds: int) -> None:
    if aggregation == "fedyogi" and privacy == "he":
        raise ValueError(
            "aggregation='fedyogi' cannot be combined with privacy='he': the HE server only sums "
            "ciphertexts and cannot run a server optimizer on them; use aggregation='fedavg' with "
            "privacy='he', or another privacy with 'fedyogi'"
        )
    if privacy == "gaussian" and num_rounds > _GAUSSIAN_MAX_ROUNDS:
        raise ValueError(
            f"num_rounds must be in [1, {_GAUSSIAN_MAX_ROUNDS}] with privacy='gaussian', got {num_rounds!r}: "
            f"epsilon {_GAUSSIAN['target_epsilon']} over more releases needs more noise than the "
            f"aggregator's max_update_norm {_MAX_UPDATE_NORM['gaussian']} admits"
        )


def _network(privacy: str) -> dict:
    return parts.network(_DP_SEGRESNET if privacy == "dpsgd" else _SEGRESNET, _NETWORK_ARGS)


def _checked_network(privacy: str, bundle: Optional[Mapping], network_args: Optional[Mapping]) -> dict:
    """The job's network: the shipped one, or a plain MONAI SegResNet of ``network_args`` (the
    architecture of a bundle's ``network_def``, which the sites check their bundle against)."""
    if bundle is not None and privacy == "dpsgd":
        raise ValueError("bundle cannot be combined with privacy='dpsgd': a bundle's SegResNet is not DP-SGD compatible")
    if network_args is None:
        return _network(privacy)
    if bundle is None:
        raise ValueError(f"network_args is only for a bundle job (to match the bundle's network_def), got {network_args!r}")
    if not isinstance(network_args, Mapping):
        raise ValueError(f"network_args must be a mapping of SegResNet arguments, got {network_args!r}")
    return parts.network("monai.networks.nets.SegResNet", dict(network_args))


def _server(aggregation: str, privacy: str, num_rounds: int, min_clients: int, network: dict) -> dict:
    encrypted = privacy == "he"
    if encrypted:
        generator = parts.he_shareable_generator()
        aggregator = parts.encrypted_aggregator(_MAX_UPDATE_NORM[privacy], _MAX_WEIGHT, NUM_TRAIN_CASES)
    else:
        generator = (
            parts.fedyogi_shareable_generator(**_YOGI)
            if aggregation == "fedyogi"
            else parts.full_model_shareable_generator()
        )
        aggregator = parts.validated_aggregator(_MAX_UPDATE_NORM[privacy], _MAX_WEIGHT)
    if privacy != "none":
        bounds = _PRIVACY_BOUNDS[privacy]
    else:
        bounds = _FEDYOGI_BOUNDS if aggregation == "fedyogi" else _FEDAVG_BOUNDS
    return parts.server_app(
        num_rounds=num_rounds,
        min_clients=min_clients,
        model=network,
        # FedOpt's source_model names a component, so only FedYogi declares the network as one
        model_as_component=aggregation == "fedyogi",
        shareable_generator=generator,
        aggregator=aggregator,
        key_metric=_KEY_METRIC,
        evaluation=parts.global_model_eval(),
        aggregator_bounds=bounds,
        encrypted=encrypted,
    )


def _executor(privacy: str, local_epochs: int, learning_rate: float, batch_size: int, network: dict) -> dict:
    args = {
        "model": network,
        "local_epochs": local_epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "roi_size": [32, 32, 32],
        "val_roi_size": [48, 48, 48],
        "device": "auto",
        "amp": True,
        "seed": 0,
    }
    if privacy == "dpsgd":
        args.update(
            max_steps_per_round=_DP_SGD_STEPS_PER_ROUND,
            crops_per_patient=_DP_SGD_CROPS_PER_PATIENT,
            dp_sgd=parts.dp_sgd_settings(expected_patients_per_step=batch_size, **_DP_SGD),
        )
    return parts.executor("medflare.executors.segmentation_executor.SegmentationExecutor", args)


def _job_filters(privacy: str, num_rounds: int) -> tuple[list, list]:
    """The job's own (task_result_filters, task_data_filters)."""
    tasks = parts.releasing_tasks(parts.global_model_eval())
    if privacy == "percentile":
        return [parts.filter_entry(tasks, [parts.percentile_sharing_filter(**_PERCENTILE)])], []
    if privacy == "gaussian":
        gaussian = parts.gaussian_privacy_filter(num_rounds=num_rounds, **_GAUSSIAN)
        return [parts.filter_entry(tasks, [gaussian])], []
    if privacy == "dpsgd":
        return parts.patient_dp_sgd_filters(tasks, **_DP_SGD, **_DP_SGD_FILTER)
    return [], []
