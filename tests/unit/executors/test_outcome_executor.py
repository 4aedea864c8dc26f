"""The outcome executor against NVFlare's real task objects, in each of its modes."""

import csv
import json
import os
import logging

import numpy as np
import pytest
from PIL import Image

from nvflare.apis.dxo import DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from medflare.wire_contract import LOCAL_MODEL
from medflare.data.site_data_config import ENV_VAR
from medflare.executors.outcome_executor import OutcomeExecutor
from medflare.training.model_spec import build_model
from tests.unit.executors.flare_objects import install_data, site_context, weights_task

CLINICAL = ["age", "spo2", "crp"]
LABELS = ["o2_24h", "o2_72h"]
TINY_DENSENET = {
    "path": "monai.networks.nets.DenseNet",
    "args": {"spatial_dims": 2, "in_channels": 1, "init_features": 4, "growth_rate": 4, "block_config": [1, 1]},
}


def _model(labels, clinical, image):
    return {
        "path": "medflare.training.outcome_networks.OutcomeNet",
        "args": {
            "num_outputs": len(labels),
            "clinical_features": len(clinical),
            "image_network": TINY_DENSENET if image else None,
            "image_features": 8,
            "clinical_hidden": [8],
            "seed": 3,
        },
    }


# (labels, clinical columns, image column): binary table only, binary image only, multi-label fusion
MODES = {
    "table-binary": (["o2_24h"], CLINICAL, None),
    "image-binary": (["o2_24h"], [], "image"),
    "fusion-multilabel": (LABELS, CLINICAL, "image"),
}


@pytest.fixture(scope="module")
def outcome_site(tmp_path_factory):
    """A site of 24 cases: the image shows an opacity when o2_24h, spo2 is low when o2_72h."""
    root = tmp_path_factory.mktemp("outcome_site")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        o2_24h = i % 2
        o2_72h = int(o2_24h or i % 3 == 0)
        pixels = rng.integers(0, 60, size=(20, 20)).astype(np.uint8)
        if o2_24h:
            pixels[5:12, 5:12] = 220
        Image.fromarray(pixels).save(root / "images" / f"c{i}.png")
        clinical = [50 + rng.normal(0, 10), 97 - 8 * o2_72h + rng.normal(0, 1), 20 + rng.normal(0, 5)]
        rows.append([f"c{i}", "test" if i % 3 == 2 else "train", f"images/c{i}.png", *clinical, o2_24h, o2_72h])
    with open(root / "cases.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id", "split", "image", *CLINICAL, *LABELS])
        writer.writerows(rows)
    config = root / "data_config.json"
    config.write_text(json.dumps({"data_root": ".", "datalist": "cases.csv"}))
    return str(config)


def _ready(tmp_path, outcome_site, monkeypatch, mode, **kwargs):
    monkeypatch.delenv(ENV_VAR, raising=False)
    install_data(tmp_path, outcome_site)
    labels, clinical, image = MODES[mode]
    args = dict(
        model=_model(labels, clinical, image),
        label_columns=labels,
        clinical_columns=clinical,
        image_column=image,
        image_size=[16, 16],
        local_steps=3,
        batch_size=4,
        clinical_normalisation="site",
        device="cpu",
    )
    args.update(kwargs)
    executor = OutcomeExecutor(**args)
    fl_ctx = site_context(tmp_path)
    executor.handle_event(EventType.START_RUN, fl_ctx)
    assert executor._trainer is not None, executor._setup_error
    global_weights = {k: v.numpy() for k, v in build_model(args["model"]).state_dict().items()}
    return executor, fl_ctx, global_weights


@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_trains_validates_and_submits(tmp_path, outcome_site, monkeypatch, mode):
    executor, fl_ctx, global_weights = _ready(tmp_path, outcome_site, monkeypatch, mode)
    labels = MODES[mode][0]
    reply = executor.execute("train", weights_task(global_weights), fl_ctx, Signal())
    assert reply.get_return_code() == ReturnCode.OK
    dxo = from_shareable(reply)
    assert dxo.data_kind == DataKind.WEIGHT_DIFF and set(dxo.data) == set(global_weights)
    assert dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 3
    assert dxo.get_meta_prop("num_train_cases") == 16
    initial = dxo.get_meta_prop(MetaKey.INITIAL_METRICS)
    assert initial["num_cases"] == 8 and 0 <= initial["auc"] <= 1 and 0 <= initial["accuracy"] <= 1
    if len(labels) > 1:
        assert {"auc_o2_24h", "auc_o2_72h", "accuracy_o2_24h", "accuracy_o2_72h"} <= set(initial)
    else:
        assert not any(k.startswith("auc_") for k in initial)
    assert any(np.abs(v).sum() > 0 for v in dxo.data.values())

    task = weights_task(global_weights)
    task.set_header(AppConstants.MODEL_OWNER, "site-2")
    local = executor._trainer.get_weights()
    metrics = from_shareable(executor.execute("validate", task, fl_ctx, Signal()))
    assert metrics.data_kind == DataKind.METRICS
    assert metrics.data["auc"] == pytest.approx(initial["auc"])  # the same model on the same cases
    after = executor._trainer.get_weights()
    assert all(np.array_equal(local[k], after[k]) for k in local)  # scoring left local training alone

    submitted = from_shareable(executor.execute("submit_model", Shareable(), fl_ctx, Signal()))
    assert submitted.data_kind == DataKind.WEIGHTS
    assert all(np.array_equal(submitted.data[k], local[k]) for k in local)


def test_the_model_learns_the_site_data(tmp_path, outcome_site, monkeypatch):
    executor, fl_ctx, global_weights = _ready(tmp_path, outcome_site, monkeypatch, "table-binary", local_steps=None, local_epochs=40)
    for round_number in range(2):
        reply = executor.execute("train", weights_task(global_weights, round_number), fl_ctx, Signal())
        global_weights = {k: global_weights[k] + v for k, v in from_shareable(reply).data.items()}
    metrics = executor._trainer.validate()
    # o2_24h alternates with the case number and the table carries only o2_72h's signal,
    # which agrees with o2_24h on 2/3 of the cases: well above chance, below perfect
    assert metrics["auc"] > 0.6


def test_site_only_model_is_trained_apart_and_submitted(tmp_path, outcome_site, monkeypatch):
    executor, fl_ctx, global_weights = _ready(
        tmp_path, outcome_site, monkeypatch, "table-binary", local_model="site_only"
    )
    assert executor._site_only_trainer.model is not executor._trainer.model
    early = executor.execute("submit_model", Shareable(), fl_ctx, Signal())
    assert early.get_return_code() == ReturnCode.EXECUTION_RESULT_ERROR
    executor.execute("train", weights_task(global_weights, 0), fl_ctx, Signal())
    # round 1 brings another global model: the federated local model follows it, the
    # site-only model goes on from its own weights
    moved = {k: v + 0.5 for k, v in global_weights.items()}
    executor.execute("train", weights_task(moved, 1), fl_ctx, Signal())
    submitted = from_shareable(executor.execute("submit_model", Shareable(), fl_ctx, Signal()))
    assert submitted.get_meta_prop(LOCAL_MODEL) == "site_only"  # what lets a partial-sharing site release it
    site_only = submitted.data
    federated = executor._local_weights
    key = "head.weight"
    assert np.abs(site_only[key] - federated[key]).max() > 0.3
    assert np.abs(site_only[key] - global_weights[key]).max() < 0.3  # 6 small steps from round 0's model


def test_last_round_is_the_default_local_model(tmp_path, outcome_site, monkeypatch):
    executor, fl_ctx, global_weights = _ready(tmp_path, outcome_site, monkeypatch, "table-binary")
    assert executor._site_only_trainer is None
    executor.execute("train", weights_task(global_weights), fl_ctx, Signal())
    dxo = from_shareable(executor.execute("submit_model", Shareable(), fl_ctx, Signal()))
    # the last round's weights: with that round's global model they give its full update
    assert dxo.get_meta_prop(LOCAL_MODEL) == "last_round"
    submitted = dxo.data
    assert all(np.array_equal(submitted[k], executor._local_weights[k]) for k in submitted)


def test_a_missing_column_fails_every_task_naming_it(tmp_path, outcome_site, monkeypatch, caplog):
    monkeypatch.delenv(ENV_VAR, raising=False)
    install_data(tmp_path, outcome_site)
    executor = OutcomeExecutor(
        model=_model(["o2_24h"], ["age", "lactate"], None),
        label_columns=["o2_24h"],
        clinical_columns=["age", "lactate"],
        device="cpu",
    )
    fl_ctx = site_context(tmp_path)
    with caplog.at_level(logging.ERROR):
        executor.handle_event(EventType.START_RUN, fl_ctx)
        reply = executor.execute("train", weights_task({"w": np.zeros(1)}), fl_ctx, Signal())
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert "lactate" in caplog.text and "cases.csv" in caplog.text


def test_weights_of_another_network_are_refused(tmp_path, outcome_site, monkeypatch):
    executor, fl_ctx, _ = _ready(tmp_path, outcome_site, monkeypatch, "table-binary")
    other = {k: v.numpy() for k, v in build_model(_model(["o2_24h"], CLINICAL[:2], None)).state_dict().items()}
    for name in ("train", "validate"):
        assert executor.execute(name, weights_task(other), fl_ctx, Signal()).get_return_code() == ReturnCode.BAD_TASK_DATA


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"label_columns": []}, "label_columns"),
        ({"clinical_columns": "age"}, "clinical_columns"),
        ({"clinical_columns": [], "image_column": None}, "needs inputs"),
        ({"image_size": [4, 16]}, "image_size"),
        ({"local_steps": 0}, "local_steps"),
        ({"local_epochs": 1.5}, "local_epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"clinical_normalisation": "global"}, "clinical_normalisation"),
        ({"local_model": "best"}, "local_model"),
        ({"device": "tpu"}, "device"),
        # the model's declared inputs and outputs must match the columns
        ({"label_columns": LABELS}, "num_outputs=1 but label_columns names 2"),
        ({"clinical_columns": CLINICAL[:2]}, "clinical_features=3 but clinical_columns names 2"),
        ({"image_column": "image"}, "has no image_network"),
    ],
)
def test_bad_configuration_is_refused_when_the_job_is_built(kwargs, message):
    args = dict(model=_model(["o2_24h"], CLINICAL, None), label_columns=["o2_24h"], clinical_columns=CLINICAL)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        OutcomeExecutor(**args)


def test_a_built_module_is_checked_as_well():
    module = build_model(_model(["o2_24h"], CLINICAL, "image"))
    with pytest.raises(ValueError, match="has an image_network but image_column is null"):
        OutcomeExecutor(model=module, label_columns=["o2_24h"], clinical_columns=CLINICAL)


def test_site_only_trainer_shares_the_loaded_cases(tmp_path, outcome_site, monkeypatch):
    executor, _, _ = _ready(tmp_path, outcome_site, monkeypatch, "fusion-multilabel", local_model="site_only")
    twin = executor._site_only_trainer
    # the images are read and resized once; the two models keep their own optimizers
    assert twin.train_data["image"] is executor._trainer.train_data["image"]
    assert twin.optimizer is not executor._trainer.optimizer
    assert twin.optimizer.param_groups[0]["params"][0] is next(twin.model.parameters())


# --- the chest X-ray table arguments (CheXpert, MIMIC-CXR-JPG) --------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"table_format": "dicom"}, "table_format must be one of ['auto', 'medflare', 'chexpert', 'mimic_cxr'], got 'dicom'"),
        ({"label_policy": "u_maybe"}, "label_policy must be one of ['u_ones', 'u_zeros', 'ignore'], got 'u_maybe'"),
        ({"blank_labels": None}, "blank_labels must be one of ['negative', 'ignore'], got None"),
        ({"views": "PA"}, "views must be null (frontal), 'all' or a non-empty list"),
        ({"views": ["PA", "oblique"]}, "views names unknown view position(s) ['oblique']"),
        ({"test_fraction": 1.5}, "test_fraction must be a number in (0, 1), got 1.5"),
        ({"test_fraction": False}, "test_fraction must be a number in (0, 1), got False"),
        ({"split_seed": "0"}, "split_seed must be an int >= 0, got '0'"),
        ({"table_format": "medflare", "views": ["PA"]}, "table_format 'medflare' takes no CheXpert/MIMIC table arguments"),
        ({"table_format": "medflare", "label_policy": "u_ones"}, "got {'label_policy': 'u_ones'}"),
        # data loading, augmentation and mixed precision are the trainer's checks, run when the job is built
        ({"data_loading": "disk"}, "data_loading"),
        ({"num_workers": -1}, "num_workers"),
        ({"cache_rate": float("nan")}, "cache_rate"),
        ({"amp": 1}, "amp"),
        ({"augmentation": True}, "augmentation True needs an image: this job has no image_column"),
        ({"augmentation": {"rotation_degrees": 90}}, "rotation_degrees"),
    ],
)
def test_bad_table_arguments_are_refused_when_the_job_is_built(kwargs, message):
    labels = kwargs.get("label_columns", ["o2_24h"])
    args = dict(model=_model(labels, CLINICAL, None), label_columns=labels, clinical_columns=CLINICAL)
    args.update(kwargs)
    with pytest.raises(ValueError) as raised:
        OutcomeExecutor(**args)
    assert message in str(raised.value)


def test_table_arguments_are_kept_unchanged_and_default_to_the_old_behaviour():
    args = dict(model=_model(["o2_24h"], CLINICAL, None), label_columns=["o2_24h"], clinical_columns=CLINICAL)
    plain = OutcomeExecutor(**args)
    assert (plain.table_format, plain.label_policy, plain.blank_labels, plain.views, plain.test_fraction, plain.split_seed) == (
        "auto", None, "negative", None, 0.2, 0,
    )
    chosen = OutcomeExecutor(**args, table_format="chexpert", label_policy="u_zeros", views=["pa"], test_fraction=0.3, split_seed=4)
    assert chosen.views == ["pa"] and chosen._table_options.views == ("PA",)


@pytest.fixture(scope="module")
def chexpert_site(tmp_path_factory):
    """A CheXpert download of 12 training images (5 patients) and 3 validation images, 16x16 JPGs."""
    from tests.unit.data.test_chest_xray_tables import make_chexpert

    root = tmp_path_factory.mktemp("chexpert_site")
    table = make_chexpert(root)
    config = root / "data_config.json"
    config.write_text(json.dumps({"data_root": ".", "datalist": os.path.relpath(table, root)}))
    return str(config)


def _chexpert_executor(tmp_path, chexpert_site, monkeypatch, **kwargs):
    monkeypatch.delenv(ENV_VAR, raising=False)
    install_data(tmp_path, chexpert_site)
    args = dict(
        model=_model(["Cardiomegaly"], ["Age", "Sex"], "image"),
        label_columns=["Cardiomegaly"],
        clinical_columns=["Age", "Sex"],
        image_column="image",
        image_size=[16, 16],
        local_steps=2,
        batch_size=4,
        device="cpu",
    )
    args.update(kwargs)
    executor = OutcomeExecutor(**args)
    fl_ctx = site_context(tmp_path)
    executor.handle_event(EventType.START_RUN, fl_ctx)
    return executor, fl_ctx, args


@pytest.mark.parametrize("policy, train_cases", [("u_ones", 8), ("u_zeros", 8), ("ignore", 6)])
def test_a_chexpert_site_trains_under_the_jobs_label_policy(tmp_path, chexpert_site, monkeypatch, policy, train_cases):
    executor, fl_ctx, args = _chexpert_executor(tmp_path, chexpert_site, monkeypatch, label_policy=policy)
    assert executor._trainer is not None, executor._setup_error
    assert executor._trainer.num_train_cases == train_cases and executor._trainer.num_test_cases == 2
    global_weights = {k: v.numpy() for k, v in build_model(args["model"]).state_dict().items()}
    reply = executor.execute("train", weights_task(global_weights), fl_ctx, Signal())
    assert reply.get_return_code() == ReturnCode.OK
    assert from_shareable(reply).get_meta_prop("num_train_cases") == train_cases


def test_a_chexpert_site_without_a_label_policy_sends_nothing(tmp_path, chexpert_site, monkeypatch, caplog):
    with caplog.at_level(logging.ERROR):
        executor, fl_ctx, _ = _chexpert_executor(tmp_path, chexpert_site, monkeypatch)
        reply = executor.execute("train", weights_task({"w": np.zeros(1)}), fl_ctx, Signal())
    assert executor._trainer is None
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert "the job must choose label_policy" in caplog.text


def test_patient_level_dp_sgd_refuses_several_images_per_patient(tmp_path, chexpert_site, monkeypatch):
    model = _model(["Cardiomegaly"], ["Age", "Sex"], None)
    executor, _, _ = _chexpert_executor(
        tmp_path, chexpert_site, monkeypatch, model=model, image_column=None, label_policy="u_ones", views="all",
        dp_sgd={"noise_multiplier": 1.0, "max_grad_norm": 1.0, "expected_patients_per_step": 2},
    )
    assert executor._trainer is None
    assert "patient-level DP-SGD counts one training case as one patient, but 5 patient(s) have several images" in executor._setup_error


def test_a_round_the_sites_scope_puts_under_dp_sgd_is_refused_too(tmp_path, chexpert_site, monkeypatch):
    from medflare.data.data_errors import DataListError
    from medflare.privacy.dp_sgd import parse_dp_sgd_settings

    model = _model(["Cardiomegaly"], ["Age", "Sex"], None)
    executor, _, _ = _chexpert_executor(tmp_path, chexpert_site, monkeypatch, model=model, image_column=None, label_policy="u_ones")
    assert executor._trainer is not None, executor._setup_error  # no DP-SGD asked by the job: it loads
    settings = parse_dp_sgd_settings({"noise_multiplier": 1.0, "max_grad_norm": 1.0, "expected_patients_per_step": 2})
    with pytest.raises(DataListError, match="3 patient\\(s\\) have several images"):
        executor._train_locally(executor._trainer, lambda: False, settings)
    assert executor._train_locally(executor._trainer, lambda: False).steps == 2  # without DP-SGD it trains


def test_two_labels_under_the_ignore_policy_train_streamed_with_the_ignored_ones_masked(tmp_path, chexpert_site, monkeypatch):
    labels = ["Cardiomegaly", "Edema"]
    executor, fl_ctx, args = _chexpert_executor(
        tmp_path, chexpert_site, monkeypatch, model=_model(labels, ["Age", "Sex"], "image"), label_columns=labels,
        label_policy="ignore", data_loading="stream", augmentation={"rotation_degrees": 5},
    )
    trainer = executor._trainer
    assert trainer is not None, executor._setup_error
    # a case stays while one of its labels is known; the unknown one is -1 (left out of loss and metrics)
    assert trainer.num_train_cases == 7 and trainer.data_loading == "stream"
    assert bool((trainer.train_data["labels"] == -1).any())
    global_weights = {k: v.numpy() for k, v in build_model(args["model"]).state_dict().items()}
    reply = executor.execute("train", weights_task(global_weights), fl_ctx, Signal())
    assert reply.get_return_code() == ReturnCode.OK
    assert from_shareable(reply).get_meta_prop("num_train_cases") == 7
