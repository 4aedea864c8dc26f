"""The pieces every medflare job is made of, as the dicts NVFlare's app configs hold.

The study modules (:mod:`medflare.recipes.brats_segmentation`,
:mod:`medflare.recipes.outcome_prediction`, :mod:`medflare.recipes.heart_disease`) choose
among these and put them together; nothing here chooses for a study (the HE note, about the
sites' encrypting scopes, covers every network they check). Each function returns a new dict,
so a caller may change what it gets without touching another job.

Two assemblers give the configs their fixed shape: :func:`server_app` (persistor, shareable
generator, aggregator, model selector, locator, the two reporting widgets and the model exporter, then
ScatterAndGather and an evaluation workflow) and :func:`client_app` (one executor answering
``train``, ``validate`` and ``submit_model``, then the job's own filters).
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

from medflare.wire_contract import NUM_TRAIN_CASES

__all__ = [
    "SECURE_AGGREGATION_SCOPE",
    "TRAIN_TASK",
    "VALIDATE_TASK",
    "SUBMIT_MODEL_TASK",
    "network",
    "model_component",
    "persistor",
    "full_model_shareable_generator",
    "fedyogi_shareable_generator",
    "he_model_serialize_filter",
    "he_shareable_generator",
    "validated_aggregator",
    "encrypted_aggregator",
    "HE_MAX_UPDATE_NORM",
    "he_aggregator_bounds",
    "model_selector",
    "model_locator",
    "round_metrics_writer",
    "validation_json_generator",
    "model_exporter",
    "with_model_export",
    "scatter_and_gather",
    "global_model_eval",
    "cross_site_model_eval",
    "releasing_tasks",
    "server_app",
    "executor",
    "filter_entry",
    "percentile_sharing_filter",
    "gaussian_privacy_filter",
    "patient_dp_sgd_filter",
    "patient_dp_sgd_filters",
    "dp_sgd_settings",
    "client_app",
]

#: the site privacy scope an HE job asks for: the sites' filters end in the CKKS encryptor
SECURE_AGGREGATION_SCOPE = "secure_aggregation"
TRAIN_TASK = "train"
VALIDATE_TASK = "validate"
SUBMIT_MODEL_TASK = "submit_model"

#: the component id of the server's network when it is a component (FedOpt's ``source_model``)
_MODEL_ID = "model"
_PERSISTOR_ID = "persistor"
_SERIALIZE_FILTER_ID = "model_serialize_filter"
_CROSS_SITE_EVAL = "nvflare.app_common.workflows.cross_site_model_eval.CrossSiteModelEval"
_HE_CROSS_SITE_EVAL = "nvflare.app_opt.he.cross_site_model_eval.HECrossSiteModelEval"


# --- the network ---------------------------------------------------------------------------


def network(path: str, args: dict) -> dict:
    """A network as a ``{"path", "args"}`` dict (the server's persistor and the executor build it);
    ``args`` is copied, so a job never shares a list with another job or a module constant."""
    return {"path": path, "args": copy.deepcopy(args)}


def model_component(path: str) -> dict:
    """The server's network as the component ``model``, its arguments the variable ``model_args``."""
    return {"id": _MODEL_ID, "path": path, "args": "{model_args}"}


# --- server components -----------------------------------------------------------------------


def persistor(model: str, filter_id: Optional[str] = None) -> dict:
    """``PTFileModelPersistor`` of ``model`` (``"{model}"``: the variable; ``"model"``: the
    component); ``filter_id`` serialises the model for HE."""
    args = {"model": model}
    if filter_id is not None:
        args["filter_id"] = filter_id
    return {"id": _PERSISTOR_ID, "path": "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor", "args": args}


def full_model_shareable_generator() -> dict:
    """FedAvg's server step: the global model plus the aggregated difference."""
    return {
        "id": "shareable_generator",
        "path": "nvflare.app_common.shareablegenerators.full_model_shareable_generator.FullModelShareableGenerator",
        "args": {},
    }


def fedyogi_shareable_generator(lr: float, betas: Sequence[float], tau: float) -> dict:
    """FedYogi's server step (Reddi et al. 2021): NVFlare's FedOpt generator with medflare's Yogi,
    on the server network component ``model``."""
    return {
        "id": "shareable_generator",
        "path": "nvflare.app_opt.pt.fedopt.PTFedOptModelShareableGenerator",
        "args": {
            "optimizer_args": {
                "path": "medflare.aggregators.yogi.Yogi",
                "args": {"lr": lr, "betas": list(betas), "tau": tau},
                "config_type": "dict",
            },
            "source_model": _MODEL_ID,
            "device": "cpu",
        },
    }


def he_model_serialize_filter() -> dict:
    """The persistor's serialiser of an encrypted global model."""
    return {
        "id": _SERIALIZE_FILTER_ID,
        "path": "nvflare.app_opt.he.model_serialize_filter.HEModelSerializeFilter",
        "args": {},
    }


def he_shareable_generator() -> dict:
    """The server step of secure aggregation: the global model plus the decrypted sum."""
    return {
        "id": "shareable_generator",
        "path": "nvflare.app_opt.he.model_shareable_generator.HEModelShareableGenerator",
        "args": {},
    }


def validated_aggregator(max_update_norm: float, max_weight: int, weight_meta_key: Optional[str] = None) -> dict:
    """medflare's plaintext aggregator: a weighted mean of whole, checked contributions.

    ``weight_meta_key`` ``None`` leaves the aggregator's default (the steps of the round).
    """
    args = {"expected_data_kind": "WEIGHT_DIFF", "estimator": "weighted_mean"}
    if weight_meta_key is not None:
        args["weight_meta_key"] = weight_meta_key
    args.update(
        max_update_norm=max_update_norm,
        max_weight=max_weight,
        equal_weights_when_withheld=True,
        fail_after_empty_rounds=None,
    )
    return {"id": "aggregator", "path": "medflare.aggregators.validated_aggregator.ValidatedAggregator", "args": args}


def encrypted_aggregator(max_update_norm: float, max_weight: int, weight_meta_key: str = NUM_TRAIN_CASES) -> dict:
    """medflare's CKKS aggregator: a weighted sum of ciphertexts whose sites checked the norm."""
    return {
        "id": "aggregator",
        "path": "medflare.aggregators.encrypted_aggregator.EncryptedSumAggregator",
        "args": {
            "max_update_norm": max_update_norm,
            "weight_meta_key": weight_meta_key,
            "max_weight": max_weight,
            "min_contributions": 1,
            "fail_after_empty_rounds": None,
        },
    }


#: the largest norm bound the research profile's encrypting scopes check before encrypting
#: (``secure_distributed_dp``'s 1600; ``secure_aggregation`` checks 40)
HE_MAX_UPDATE_NORM = 1600.0


def he_aggregator_bounds(weighting: str, max_weight: int) -> str:
    """The ``aggregator_bounds`` note of an HE job: where :data:`HE_MAX_UPDATE_NORM` comes from;
    ``weighting`` says why the weights are ``num_train_cases``."""
    return (
        "Encrypted: the server checks names, ciphertext sizes, CKKS parameters and weights, not "
        "values. Each site's HEUpdateEncryptor checks the update's norm before encrypting and records "
        "the bound it checked; a contribution recorded with a bound above max_update_norm is refused. "
        "max_update_norm 1600 = the largest bound of the research profile's encrypting scopes: "
        "secure_aggregation checks 40 (its partial sharing's envelope, 10% clipped to +-0.1, is 0.1 "
        "sqrt(0.1 d) = 34.3 on the BraTS network, d = 1,176,843; 0.1 on the heart model, d = 14), "
        "secure_distributed_dp checks 1600 (its noised envelope C (1 + (z/sqrt(N)) (sqrt(d) + 6)) = "
        "1513 for C = 1, z = 2.4, N = 3 on the BraTS network; 14.5 on the heart model). Weights: "
        f"{NUM_TRAIN_CASES} ({weighting}), at most max_weight {max_weight}. See "
        "docs/privacy.md, Secure aggregation, and docs/aggregation.md."
    )


def model_selector(key_metric: str) -> dict:
    """Keeps the global model that scores best on ``key_metric``."""
    return {
        "id": "model_selector",
        "path": "nvflare.app_common.widgets.intime_model_selector.IntimeModelSelector",
        "args": {"key_metric": key_metric},
    }


def model_locator(encrypted: bool = False) -> dict:
    """Finds the persisted global model for evaluation (the encrypted one under HE)."""
    path = (
        "medflare.aggregators.encrypted_model_locator.EncryptedModelLocator"
        if encrypted
        else "nvflare.app_opt.pt.file_model_locator.PTFileModelLocator"
    )
    return {"id": "model_locator", "path": path, "args": {"pt_persistor_id": _PERSISTOR_ID}}


def round_metrics_writer() -> dict:
    """Writes each round's site metrics (``medflare report`` reads them)."""
    return {"id": "round_metrics", "path": "medflare.reporting.round_metrics_writer.RoundMetricsWriter", "args": {}}


def validation_json_generator() -> dict:
    """Writes the evaluation workflow's results as JSON."""
    return {
        "id": "validation_json_generator",
        "path": "nvflare.app_common.widgets.validation_json_generator.ValidationJsonGenerator",
        "args": {},
    }


def model_exporter(inputs: dict) -> dict:
    """Exports the final and best global models to TorchScript and ONNX when the run ends,
    each checked against the network on a sample input of ``inputs`` (``{name: shape}``)."""
    return {
        "id": "model_exporter",
        "path": "medflare.export.global_model_exporter.GlobalModelExporter",
        "args": {"inputs": copy.deepcopy(inputs), "persistor_id": _PERSISTOR_ID},
    }


def with_model_export(server: dict, client: dict) -> dict:
    """A copy of ``server`` whose components end in :func:`model_exporter`, its sample input
    derived from ``client``'s executor and the server's network
    (:func:`medflare.export.job_model.job_export_inputs`)."""
    from medflare.export.job_model import job_export_inputs

    _, inputs = job_export_inputs(server, client)
    config = copy.deepcopy(server)
    config["components"].append(model_exporter(inputs))
    return config


# --- server workflows ------------------------------------------------------------------------


def scatter_and_gather(min_clients: int) -> dict:
    """The training rounds: ``{num_rounds}`` rounds of ``train``, waiting for ``min_clients``."""
    return {
        "id": "scatter_and_gather",
        "path": "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather",
        "args": {
            "min_clients": min_clients,
            "num_rounds": "{num_rounds}",
            "start_round": 0,
            "wait_time_after_min_received": 120,
            "aggregator_id": "aggregator",
            "persistor_id": _PERSISTOR_ID,
            "shareable_generator_id": "shareable_generator",
            "train_task_name": TRAIN_TASK,
            "train_timeout": 0,
        },
    }


def global_model_eval() -> dict:
    """Every site scores the final global model (no site model leaves a site)."""
    return {
        "id": "global_model_eval",
        "path": "nvflare.app_common.workflows.global_model_eval.GlobalModelEval",
        "args": {
            "model_locator_id": "model_locator",
            "validation_task_name": VALIDATE_TASK,
            "validation_timeout": 1800,
        },
    }


def cross_site_model_eval(encrypted: bool = False) -> dict:
    """Every site scores the global model and every other site's submitted model (EXAM's table)."""
    return {
        "id": "cross_site_model_eval",
        "path": _HE_CROSS_SITE_EVAL if encrypted else _CROSS_SITE_EVAL,
        "args": {
            "model_locator_id": "model_locator",
            "submit_model_task_name": SUBMIT_MODEL_TASK,
            "validation_task_name": VALIDATE_TASK,
            "submit_model_timeout": 600,
            "validation_timeout": 1800,
        },
    }


def releasing_tasks(evaluation: dict) -> list[str]:
    """The tasks whose results carry a model out of a site: ``train``, and ``submit_model`` when
    the evaluation workflow collects site models. A job's privacy filters cover all of them."""
    if evaluation["path"] in (_CROSS_SITE_EVAL, _HE_CROSS_SITE_EVAL):
        return [TRAIN_TASK, SUBMIT_MODEL_TASK]
    return [TRAIN_TASK]


def server_app(
    *,
    num_rounds: int,
    min_clients: int,
    model: dict,
    model_as_component: bool,
    shareable_generator: dict,
    aggregator: dict,
    key_metric: str,
    evaluation: dict,
    aggregator_bounds: str,
    encrypted: bool = False,
) -> dict:
    """``config_fed_server.json``.

    Args:
        num_rounds: the variable ``num_rounds`` ScatterAndGather reads.
        min_clients: the sites ScatterAndGather waits for.
        model: the network (:func:`network`).
        model_as_component: declare the network as the component ``model`` with the variable
            ``model_args`` (needed by FedOpt's ``source_model``), instead of the variable ``model``.
        shareable_generator, aggregator: the server step and the aggregator.
        key_metric: the metric the model selector keeps the best global model by.
        evaluation: :func:`global_model_eval` or :func:`cross_site_model_eval`.
        aggregator_bounds: how the aggregator's bounds were derived; NVFlare ignores the field,
            a reader of the job needs it.
        encrypted: the HE persistor filter and the encrypted model locator.
    """
    components = [model_component(model["path"])] if model_as_component else []
    model_ref = _MODEL_ID if model_as_component else "{model}"
    components.append(persistor(model_ref, _SERIALIZE_FILTER_ID if encrypted else None))
    if encrypted:
        components.append(he_model_serialize_filter())
    components += [
        shareable_generator,
        aggregator,
        model_selector(key_metric),
        model_locator(encrypted),
        round_metrics_writer(),
        validation_json_generator(),
    ]
    config: dict = {"format_version": 2, "num_rounds": num_rounds}
    if not model_as_component:
        config["model"] = model
    config.update(
        task_data_filters=[],
        task_result_filters=[],
        components=components,
        workflows=[scatter_and_gather(min_clients), evaluation],
    )
    if model_as_component:
        config["model_args"] = model["args"]
    config["aggregator_bounds"] = aggregator_bounds
    return config


# --- the site side ---------------------------------------------------------------------------


def executor(path: str, args: dict) -> dict:
    """The site's executor component."""
    return {"id": "executor", "path": path, "args": args}


def filter_entry(tasks: Sequence[str], filters: Sequence[dict]) -> dict:
    """One entry of ``task_result_filters`` / ``task_data_filters``."""
    return {"tasks": list(tasks), "filters": copy.deepcopy(list(filters))}


def percentile_sharing_filter(fraction_shared: float, gamma: float, sparse_transport: bool) -> dict:
    """Share the largest ``fraction_shared`` of the update, clipped to ``+-gamma``."""
    return {
        "path": "medflare.filters.percentile_sharing.PercentileSharingFilter",
        "args": {"fraction_shared": fraction_shared, "gamma": gamma, "sparse_transport": sparse_transport},
    }


def gaussian_privacy_filter(
    clipping_norm: float,
    target_epsilon: float,
    num_rounds: int,
    target_delta: float,
    max_epsilon: float,
    accountant: str,
) -> dict:
    """Clip each update to ``clipping_norm`` and add the noise that spends ``target_epsilon`` over
    ``num_rounds`` releases."""
    return {
        "path": "medflare.filters.gaussian_privacy.GaussianPrivacyFilter",
        "args": {
            "clipping_norm": clipping_norm,
            "target_epsilon": target_epsilon,
            "num_rounds": num_rounds,
            "target_delta": target_delta,
            "max_epsilon": max_epsilon,
            "accountant": accountant,
        },
    }


def patient_dp_sgd_filter(noise_multiplier: float, max_grad_norm: float, target_delta: float, accountant: str) -> dict:
    """Require patient-level DP-SGD of the executor (data side) and check its record (result side)."""
    return {
        "path": "medflare.filters.patient_dp_sgd.PatientDPSGDFilter",
        "args": {
            "noise_multiplier": noise_multiplier,
            "max_grad_norm": max_grad_norm,
            "target_delta": target_delta,
            "accountant": accountant,
        },
    }


def patient_dp_sgd_filters(
    tasks: Sequence[str], noise_multiplier: float, max_grad_norm: float, target_delta: float, accountant: str
) -> tuple[list, list]:
    """``(task_result_filters, task_data_filters)`` of a DP-SGD job: the same filter on both sides,
    requiring DP-SGD of the executor on the way in and checking its record on the way out."""
    dp_sgd = patient_dp_sgd_filter(noise_multiplier, max_grad_norm, target_delta, accountant)
    return [filter_entry(tasks, [dp_sgd])], [filter_entry(tasks, [dp_sgd])]


def dp_sgd_settings(noise_multiplier: float, max_grad_norm: float, expected_patients_per_step: int) -> dict:
    """The executor's ``dp_sgd`` argument."""
    return {
        "noise_multiplier": noise_multiplier,
        "max_grad_norm": max_grad_norm,
        "expected_patients_per_step": expected_patients_per_step,
    }


def client_app(
    executor: dict, task_result_filters: Sequence[dict] = (), task_data_filters: Sequence[dict] = ()
) -> dict:
    """``config_fed_client.json``: ``executor`` answers every task; the job's own filters after it."""
    return {
        "format_version": 2,
        "executors": [{"tasks": [TRAIN_TASK, VALIDATE_TASK, SUBMIT_MODEL_TASK], "executor": executor}],
        "task_result_filters": list(task_result_filters),
        "task_data_filters": list(task_data_filters),
        "components": [],
    }
