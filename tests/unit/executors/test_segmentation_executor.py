"""The executor against NVFlare's real task objects (DXO, Shareable, FLContext, Signal, Workspace)."""

import json
import logging
import os

import numpy as np
import pytest

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from medflare.data.site_data_config import ENV_VAR, LOCAL_FILE_NAME
from medflare.executors.segmentation_executor import SegmentationExecutor
from medflare.training.model_spec import build_model
from tests.conftest import TINY_SEGRESNET
from tests.unit.executors.flare_objects import install_data, site_context, weights_task

EXECUTOR_ARGS = dict(model=TINY_SEGRESNET, roi_size=[16, 16, 16], val_roi_size=[32, 32, 32], batch_size=2)


@pytest.fixture()
def ready(tmp_path, tiny_sites, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    install_data(tmp_path, tiny_sites["site-1"])
    fl_ctx = site_context(tmp_path)
    executor = SegmentationExecutor(**EXECUTOR_ARGS)
    executor.handle_event(EventType.START_RUN, fl_ctx)
    assert executor._trainer is not None
    global_weights = {k: v.numpy() for k, v in build_model(TINY_SEGRESNET).state_dict().items()}
    return executor, fl_ctx, global_weights


def test_train_returns_a_weight_diff_with_steps_and_metrics(ready):
    executor, fl_ctx, global_weights = ready
    reply = executor.execute("train", weights_task(global_weights), fl_ctx, Signal())
    assert reply.get_return_code() == ReturnCode.OK
    dxo = from_shareable(reply)
    assert dxo.data_kind == DataKind.WEIGHT_DIFF
    assert set(dxo.data) == set(global_weights)
    for key, value in dxo.data.items():
        assert value.shape == global_weights[key].shape and value.dtype == np.float32
    assert dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == executor._trainer.num_train_cases // 2 + (
        executor._trainer.num_train_cases % 2
    )
    metrics = dxo.get_meta_prop(MetaKey.INITIAL_METRICS)
    assert {"dice_tc", "dice_wt", "dice_et", "dice_mean"} <= set(metrics)
    assert dxo.get_meta_prop("train_loss") > 0
    assert any(np.abs(v).sum() > 0 for v in dxo.data.values())


def test_validate_scores_the_given_model_without_disturbing_local_training(ready):
    executor, fl_ctx, global_weights = ready
    executor.execute("train", weights_task(global_weights), fl_ctx, Signal())
    local = executor._trainer.get_weights()
    task = weights_task(global_weights)
    task.set_header(AppConstants.MODEL_OWNER, "server")
    reply = executor.execute("validate", task, fl_ctx, Signal())
    dxo = from_shareable(reply)
    assert dxo.data_kind == DataKind.METRICS
    assert 0.0 <= dxo.data["dice_mean"] <= 1.0
    after = executor._trainer.get_weights()
    assert all(np.array_equal(local[k], after[k]) for k in local)


def test_submit_model_returns_the_local_model_once_trained(ready):
    executor, fl_ctx, global_weights = ready
    early = executor.execute("submit_model", Shareable(), fl_ctx, Signal())
    assert early.get_return_code() == ReturnCode.EXECUTION_RESULT_ERROR
    executor.execute("train", weights_task(global_weights), fl_ctx, Signal())
    dxo = from_shareable(executor.execute("submit_model", Shareable(), fl_ctx, Signal()))
    assert dxo.data_kind == DataKind.WEIGHTS
    assert not np.array_equal(dxo.data["convInit.conv.weight"], global_weights["convInit.conv.weight"])


def test_unknown_task_gets_task_unknown(ready):
    executor, fl_ctx, _ = ready
    assert executor.execute("bogus", Shareable(), fl_ctx, Signal()).get_return_code() == ReturnCode.TASK_UNKNOWN


def test_abort_signal_stops_the_task_and_sends_nothing(ready):
    executor, fl_ctx, global_weights = ready
    signal = Signal()
    signal.trigger("stop")
    reply = executor.execute("train", weights_task(global_weights), fl_ctx, signal)
    assert reply.get_return_code() == ReturnCode.TASK_ABORTED
    with pytest.raises(Exception):
        from_shareable(reply)


def test_abort_mid_training_is_honoured_between_batches(ready):
    executor, fl_ctx, global_weights = ready
    signal = Signal()
    original = executor._trainer.train

    def train_then_abort(*args, **kwargs):
        signal.trigger("abort during training")
        return original(*args, **kwargs)

    executor._trainer.train = train_then_abort
    reply = executor.execute("train", weights_task(global_weights), fl_ctx, signal)
    assert reply.get_return_code() == ReturnCode.TASK_ABORTED


@pytest.mark.parametrize(
    "task",
    [
        DXO(data_kind=DataKind.WEIGHT_DIFF, data={"a": np.zeros(1)}).to_shareable(),
        DXO(data_kind=DataKind.WEIGHTS, data={"convInit.conv.weight": np.zeros(1)}).to_shareable(),
        Shareable(),
    ],
    ids=["wrong-kind", "weights-that-do-not-fit", "not-a-dxo"],
)
def test_bad_task_data_is_refused(ready, task):
    executor, fl_ctx, _ = ready
    for name in ("train", "validate"):
        assert executor.execute(name, task, fl_ctx, Signal()).get_return_code() == ReturnCode.BAD_TASK_DATA


def test_missing_data_configuration_fails_every_task_naming_the_file(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(ENV_VAR, raising=False)
    fl_ctx = site_context(tmp_path, "site-7")
    executor = SegmentationExecutor(**EXECUTOR_ARGS)
    with caplog.at_level(logging.ERROR):
        executor.handle_event(EventType.START_RUN, fl_ctx)
        reply = executor.execute("train", weights_task({"w": np.zeros(1)}), fl_ctx, Signal())
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    with pytest.raises(Exception):
        from_shareable(reply)
    expected = os.path.join(str(tmp_path / "site-7" / "local"), LOCAL_FILE_NAME)
    assert expected in caplog.text


def test_corrupt_image_fails_naming_the_file(tmp_path, tiny_sites, monkeypatch, caplog):
    import shutil

    site_dir = tmp_path / "copy"
    shutil.copytree(os.path.dirname(tiny_sites["site-2"]), site_dir)
    with open(site_dir / "datalist.json") as f:
        first_image = site_dir / json.load(f)["training"][0]["image"][0]
    first_image.write_bytes(b"not a nifti file")
    monkeypatch.setenv(ENV_VAR, str(site_dir / "data_config.json"))
    fl_ctx = site_context(tmp_path, "site-2")
    executor = SegmentationExecutor(**EXECUTOR_ARGS)
    with caplog.at_level(logging.ERROR):
        executor.handle_event(EventType.START_RUN, fl_ctx)
        reply = executor.execute("validate", weights_task({"w": np.zeros(1)}), fl_ctx, Signal())
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert first_image.name in caplog.text


@pytest.mark.parametrize("local_model", ["last_round", "site_only"])
def test_a_label_outside_the_brats_labels_fails_set_up_naming_the_file(tmp_path, tiny_sites, monkeypatch, caplog, local_model):
    import shutil

    import nibabel as nib

    from medflare.data.brats_volume_checks import forget_checked_files

    site_dir = tmp_path / "copy"
    shutil.copytree(os.path.dirname(tiny_sites["site-2"]), site_dir)
    with open(site_dir / "datalist.json") as f:
        label = site_dir / json.load(f)["training"][0]["label"]
    image = nib.load(label)
    nib.save(nib.Nifti1Image(np.where(np.asanyarray(image.dataobj) == 4, 3, 0).astype(np.uint8), image.affine), label)
    forget_checked_files()
    monkeypatch.setenv(ENV_VAR, str(site_dir / "data_config.json"))
    fl_ctx = site_context(tmp_path, "site-2")
    executor = SegmentationExecutor(**EXECUTOR_ARGS, local_model=local_model)
    with caplog.at_level(logging.ERROR):
        executor.handle_event(EventType.START_RUN, fl_ctx)
        reply = executor.execute("train", weights_task({"w": np.zeros(1)}), fl_ctx, Signal())
    assert executor._trainer is None
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    with pytest.raises(Exception):
        from_shareable(reply)  # nothing sent
    assert f"label {label} has value(s) [3]" in caplog.text and "outside the BraTS labels [0, 1, 2, 4]" in caplog.text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"local_epochs": 0}, "local_epochs"),
        ({"local_epochs": True}, "local_epochs"),
        ({"max_steps_per_round": -1}, "max_steps_per_round"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"learning_rate": 2}, "learning_rate"),
        ({"roi_size": [32, 32]}, "roi_size"),
        ({"val_roi_size": [4, 32, 32]}, "val_roi_size"),
        ({"pixdim": [1, 1, 0]}, "pixdim"),
        ({"device": "gpu0"}, "device"),
        ({"cache_rate": -0.1}, "cache_rate"),
        ({"model": {"args": {}}}, "model"),
        ({"train_task_name": ""}, "train_task_name"),
    ],
)
def test_bad_configuration_is_refused_when_the_job_is_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SegmentationExecutor(**kwargs)


def test_non_boolean_flags_are_refused():
    with pytest.raises(TypeError, match="amp"):
        SegmentationExecutor(amp="yes")
