"""A job may require a preparation: ``required_preparation`` validated when the executor is built,
and the site's manifest verified when its data is first loaded; a site that fails refuses every
task (nothing trained or sent). Jobs without it load their data as before."""

import inspect
import json
import logging
import os

import pytest

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.signal import Signal

from medflare.data.site_data_config import ENV_VAR, LOCAL_FILE_NAME
from medflare.executors.outcome_executor import OutcomeExecutor
from medflare.executors.segmentation_executor import SegmentationExecutor
from medflare.executors.site_training_executor import SiteTrainingExecutor
from medflare.preparation.file_hashes import forget_file_hashes
from medflare.preparation.prepare_segmentation import prepare_segmentation
from medflare.preparation.recipe import SegmentationPreparation
from tests.conftest import TINY_SEGRESNET
from tests.unit.executors.flare_objects import site_context, weights_task
from tests.unit.preparation.preparation_fixtures import brats_site

REQUIRED = {"name": "medflare-brats-prep", "version": ">=1.0,<2"}


class _Trainer:
    """What the base executor asks of a trainer when it loads data: counts and a device."""

    def __init__(self, datalist):
        with open(datalist) as f:
            self.num_train_cases = len(json.load(f)["training"])
        self.device = "cpu"


class _Executor(SiteTrainingExecutor):
    """The base class with the least a subclass supplies, so the test needs no network training."""

    @property
    def kind_dataset(self):
        return "segmentation"

    def _build_trainer(self, config, network):
        return _Trainer(config.datalist)


def _executor(**kwargs):
    return _Executor(model=TINY_SEGRESNET, device="cpu", **kwargs)


@pytest.fixture()
def prepared_site(tmp_path, monkeypatch):
    """A site whose local/medflare_data.json points at data prepared by medflare prepare."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    datalist, root = brats_site(tmp_path / "raw")
    result = prepare_segmentation(datalist, root, str(tmp_path / "prepared"), SegmentationPreparation())
    fl_ctx = site_context(tmp_path)
    local = tmp_path / "site-1" / "local" / LOCAL_FILE_NAME
    local.write_text(json.dumps({"datasets": {"segmentation": {"data_root": result.out, "datalist": result.datalist}}}))
    forget_file_hashes()
    return fl_ctx, result, local, (datalist, root)


def _start(executor, fl_ctx):
    executor.handle_event(EventType.START_RUN, fl_ctx)
    return executor


def test_data_prepared_as_required_is_loaded(prepared_site):
    fl_ctx, result, _, _ = prepared_site
    executor = _start(_executor(required_preparation=REQUIRED), fl_ctx)
    assert executor._trainer is not None, executor._setup_error
    assert executor._trainer.num_train_cases == 2
    assert executor.required_preparation == REQUIRED


def _refused(executor, fl_ctx, caplog) -> str:
    with caplog.at_level(logging.ERROR):
        _start(executor, fl_ctx)
        reply = executor.execute("train", weights_task({"w": __import__("numpy").zeros(1)}), fl_ctx, Signal())
    assert executor._trainer is None
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert "refused, nothing sent" in caplog.text
    return executor._setup_error


def test_a_version_the_job_does_not_accept_refuses_every_task(prepared_site, caplog):
    fl_ctx, _, _, _ = prepared_site
    message = _refused(_executor(required_preparation={"name": "medflare-brats-prep", "version": ">=2.0"}), fl_ctx, caplog)
    assert message.startswith("site-1: data set 'segmentation' does not meet the job's required_preparation")
    assert "site prepared with version 1.0.0 of medflare-brats-prep, the job requires >=2.0; re-run `medflare prepare`" in message
    assert "nothing trained or sent" in message


def test_raw_data_without_a_manifest_is_refused(prepared_site, caplog):
    fl_ctx, _, local, (datalist, root) = prepared_site
    local.write_text(json.dumps({"data_root": root, "datalist": datalist}))
    message = _refused(_executor(required_preparation=REQUIRED), fl_ctx, caplog)
    assert "this site has not prepared its data with medflare prepare" in message


def test_prepared_data_changed_since_is_refused(prepared_site, caplog):
    fl_ctx, result, _, _ = prepared_site
    path = os.path.join(result.out, "good-1", "good-1_seg.nii.gz")
    with open(path, "ab") as f:
        f.write(b"\0")
    message = _refused(_executor(required_preparation={**REQUIRED, "parameters_hash": SegmentationPreparation().parameters_hash()}), fl_ctx, caplog)
    assert f"{path} changed after preparation" in message


def test_without_the_argument_unprepared_data_loads_as_before(prepared_site):
    fl_ctx, _, local, (datalist, root) = prepared_site
    local.write_text(json.dumps({"data_root": root, "datalist": datalist}))
    executor = _start(_executor(), fl_ctx)
    assert executor.required_preparation is None
    assert executor._trainer is not None, executor._setup_error


@pytest.mark.parametrize(
    "value, message",
    [
        ("medflare-brats-prep", "required_preparation must be null or {'name': ..., 'version': ...[, 'parameters_hash': ...]}, got 'medflare-brats-prep'"),
        ({"name": "medflare-brats-prep"}, "required_preparation['version'] must be a version ('1.0.0') or a range ('>=1.0,<2'), got None"),
        ({"name": "medflare-brats-prep", "version": "latest"}, "must be a version MAJOR[.MINOR[.PATCH]] (e.g. 1.0.0), got 'latest'"),
        ({"name": 3, "version": "1"}, "required_preparation['name'] must be a preparation name (e.g. 'medflare-brats-prep'), got 3"),
        ({"name": "x", "version": "1", "parameters_hash": True}, "required_preparation['parameters_hash'] must be 64 lower-case hex digits (sha256), got True"),
        ({"name": "x", "version": "1", "spacing": [1, 1, 1]}, "required_preparation has unknown key(s) ['spacing']"),
    ],
)
def test_a_malformed_requirement_is_refused_when_the_job_is_built(value, message):
    with pytest.raises(ValueError) as refused:
        _executor(required_preparation=value)
    assert message in str(refused.value)


def _shipped(executor_class, **kwargs):
    if executor_class is SegmentationExecutor:
        return SegmentationExecutor(model=TINY_SEGRESNET, roi_size=[16, 16, 16], cache_rate=0.0, device="cpu", **kwargs)
    from tests.unit.executors.test_executor_datasets import _outcome

    return _outcome(image=False, **kwargs)


@pytest.mark.parametrize("executor_class", [SegmentationExecutor, OutcomeExecutor])
def test_the_shipped_executors_forward_the_argument(executor_class):
    assert "required_preparation" in inspect.signature(executor_class.__init__).parameters
    assert _shipped(executor_class, required_preparation=REQUIRED).required_preparation == REQUIRED
    assert _shipped(executor_class).required_preparation is None
    with pytest.raises(ValueError, match="required_preparation has unknown key"):
        _shipped(executor_class, required_preparation={**REQUIRED, "extra": 1})
