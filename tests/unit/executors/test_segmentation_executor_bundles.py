"""The segmentation executor with a job naming a site bundle, against NVFlare's real task objects."""

import copy
import logging

import numpy as np
import pytest

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.signal import Signal

from medflare.data.site_data_config import ENV_VAR as DATA_ENV_VAR
from medflare.executors.segmentation_executor import SegmentationExecutor
from medflare.training.bundle_registry import ENV_VAR, LOCAL_FILE_NAME
from medflare.training.model_spec import build_model
from tests.unit.executors.flare_objects import install_data, site_context, weights_task
from tests.unit.training.bundle_fixture import TINY_BUNDLE_ARGS, TINY_BUNDLE_SPEC, make_bundle, write_registry

ARGS = dict(roi_size=[16, 16, 16], val_roi_size=[16, 16, 16], batch_size=2, max_steps_per_round=1, amp=False, device="cpu")


def _model(**request):
    return {"bundle": "tiny_brats", "network": copy.deepcopy(TINY_BUNDLE_SPEC), **request}


def _global_weights():
    return {k: v.numpy() for k, v in build_model(TINY_BUNDLE_SPEC).state_dict().items()}


@pytest.fixture()
def site(tmp_path, tiny_sites, monkeypatch):
    """site-1 with its data installed and the tiny bundle allow-listed in local/medflare_bundles.json."""
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    monkeypatch.delenv(ENV_VAR, raising=False)
    install_data(tmp_path, tiny_sites["site-1"])
    fl_ctx = site_context(tmp_path)
    folder = make_bundle(tmp_path / "bundles")
    write_registry(tmp_path / "site-1" / "local" / LOCAL_FILE_NAME, {"tiny_brats": folder})
    return fl_ctx, folder


def _started(fl_ctx, **request):
    executor = SegmentationExecutor(model=_model(**request), **ARGS)
    executor.handle_event(EventType.START_RUN, fl_ctx)
    return executor


def test_a_bundle_job_trains_the_bundles_network_and_reports_dice(site):
    fl_ctx, folder = site
    executor = _started(fl_ctx, version="0.1.0", use_preprocessing=True, load_weights=True)
    assert executor._trainer is not None, executor._setup_error
    assert executor.model["bundle"] == "tiny_brats"  # the job's argument, unchanged
    # the bundle's preprocessing gave the validation volumes its 8 mm grid (24^3, not 32^3)
    assert tuple(executor._trainer.val_loader.dataset[0]["image"].shape) == (4, 24, 24, 24)
    weights = _global_weights()
    reply = executor.execute("train", weights_task(weights), fl_ctx, Signal())
    assert reply.get_return_code() == ReturnCode.OK
    dxo = from_shareable(reply)
    assert dxo.data_kind == DataKind.WEIGHT_DIFF and set(dxo.data) == set(weights)
    assert 0.0 <= dxo.get_meta_prop("initial_metrics")["dice_mean"] <= 1.0


def test_without_preprocessing_validation_keeps_medflares_chain(site):
    executor = _started(site[0])
    assert executor._trainer is not None, executor._setup_error
    assert tuple(executor._trainer.val_loader.dataset[0]["image"].shape) == (4, 32, 32, 32)


def test_the_bundles_weights_start_the_sites_network(site):
    import torch

    fl_ctx, folder = site
    executor = _started(fl_ctx, load_weights=True)
    saved = torch.load(f"{folder}/models/model.pt", weights_only=True)
    local = executor._trainer.get_weights()
    assert np.array_equal(local["convInit.conv.weight"], saved["convInit.conv.weight"].numpy())


def _refused(executor, fl_ctx, caplog):
    with caplog.at_level(logging.ERROR):
        reply = executor.execute("train", weights_task(_global_weights()), fl_ctx, Signal())
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert executor._trainer is None
    return executor._setup_error


def test_a_bundle_the_site_does_not_allow_stops_every_task(site, caplog):
    fl_ctx, _ = site
    executor = SegmentationExecutor(model={**_model(), "bundle": "brats_mri_segmentation"}, **ARGS)
    executor.handle_event(EventType.START_RUN, fl_ctx)
    message = _refused(executor, fl_ctx, caplog)
    assert "cannot use the job's bundle 'brats_mri_segmentation'" in message and "not allow-listed" in message
    assert LOCAL_FILE_NAME in message


def test_a_site_without_a_registry_refuses(tmp_path, tiny_sites, monkeypatch, caplog):
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    monkeypatch.delenv(ENV_VAR, raising=False)
    install_data(tmp_path, tiny_sites["site-1"])
    fl_ctx = site_context(tmp_path)
    executor = SegmentationExecutor(model=_model(), **ARGS)
    executor.handle_event(EventType.START_RUN, fl_ctx)
    assert "allows no MONAI bundle" in _refused(executor, fl_ctx, caplog)


def test_a_job_network_other_than_the_bundles_is_refused(site, caplog):
    fl_ctx, _ = site
    model = _model()
    model["network"]["args"] = {**TINY_BUNDLE_ARGS, "init_filters": 8}
    executor = SegmentationExecutor(model=model, **ARGS)
    executor.handle_event(EventType.START_RUN, fl_ctx)
    message = _refused(executor, fl_ctx, caplog)
    assert "not the same architecture" in message and "monai.networks.nets.SegResNet" in message


def test_a_bundle_with_other_channels_is_refused(tmp_path, site, caplog):
    fl_ctx, _ = site
    folder = make_bundle(tmp_path / "two", network_args={**TINY_BUNDLE_ARGS, "out_channels": 2})
    write_registry(tmp_path / "site-1" / "local" / LOCAL_FILE_NAME, {"tiny_brats": folder})
    executor = _started(fl_ctx)
    assert "needs 4 input and 3 output channels" in _refused(executor, fl_ctx, caplog)


@pytest.mark.parametrize(
    "model, message",
    [
        ({"bundle": "tiny_brats"}, "needs 'network'"),
        ({"bundle": "tiny_brats", "network": {"bundle": "x"}}, "needs 'network'"),
        ({**_model(), "path": "/tmp/hostile_bundle"}, "never carries a bundle"),
        ({**_model(), "bundle": "../../tmp/hostile"}, "bundle's name"),
    ],
)
def test_a_malformed_bundle_model_is_refused_when_the_job_is_built(model, message):
    with pytest.raises(ValueError, match=message):
        SegmentationExecutor(model=model, **ARGS)


def test_dp_sgd_checks_the_plain_network_when_the_job_is_built():
    # the tiny SegResNet has GroupNorm but an in-place residual: refused before any site is asked
    from medflare.training.dp_networks import DPIncompatibleNetworkError

    with pytest.raises(DPIncompatibleNetworkError):
        SegmentationExecutor(
            model=_model(),
            dp_sgd={"noise_multiplier": 1.0, "max_grad_norm": 1.0, "expected_patients_per_step": 2},
            **ARGS,
        )
