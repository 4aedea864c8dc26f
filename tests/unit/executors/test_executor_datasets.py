"""Which of the site's data sets a job's executor trains on: its kind's name, or the job's
``dataset`` argument, looked up in the site's keyed ``medflare_data.json``; the job names no path."""

import json
import logging
import os
import re

import numpy as np
import pytest

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.signal import Signal

from medflare.data.site_data_config import ENV_VAR, LOCAL_FILE_NAME
from medflare.executors.outcome_executor import OutcomeExecutor
from medflare.executors.segmentation_executor import SegmentationExecutor
from tests.conftest import TINY_SEGRESNET
from tests.unit.executors.flare_objects import site_context, weights_task
from tests.unit.executors.test_dp_sgd_executors import _table_site_of
from tests.unit.executors.test_outcome_executor import CLINICAL, _model, outcome_site  # noqa: F401 (fixture)

SEGMENTATION_ARGS = dict(model=TINY_SEGRESNET, roi_size=[16, 16, 16], val_roi_size=[32, 32, 32], batch_size=2, cache_rate=0.0, device="cpu")


def _outcome(image: bool, **kwargs) -> OutcomeExecutor:
    clinical = [] if image else CLINICAL
    return OutcomeExecutor(
        model=_model(["o2_24h"], clinical, image),
        label_columns=["o2_24h"],
        clinical_columns=clinical,
        image_column="image" if image else None,
        image_size=[16, 16],
        device="cpu",
        **kwargs,
    )


def _entry(data_config: str) -> dict:
    """A flat data configuration's entry with absolute paths (what an install writes)."""
    with open(data_config) as f:
        content = json.load(f)
    base = os.path.dirname(data_config)
    return {key: os.path.normpath(os.path.join(base, content[key])) for key in ("data_root", "datalist")}


@pytest.fixture()
def three_kinds(tmp_path, tiny_sites, outcome_site, monkeypatch):  # noqa: F811 (fixture)
    """A site holding a BraTS datalist, a clinical table and a chest X-ray table, in one keyed file."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    table = _table_site_of(tmp_path / "heart", 10)
    fl_ctx = site_context(tmp_path)
    datasets = {"segmentation": _entry(tiny_sites["site-1"]), "outcome_table": _entry(table), "outcome_image": _entry(outcome_site)}
    (tmp_path / "site-1" / "local" / LOCAL_FILE_NAME).write_text(json.dumps({"datasets": datasets}))
    return fl_ctx, datasets


def _started(executor, fl_ctx):
    executor.handle_event(EventType.START_RUN, fl_ctx)
    return executor


def test_each_executor_kind_asks_for_its_data_set_name_and_the_job_may_name_another():
    assert SegmentationExecutor(**SEGMENTATION_ARGS).dataset_name == "segmentation"
    assert _outcome(image=False).dataset_name == "outcome_table"
    assert _outcome(image=True).dataset_name == "outcome_image"
    assert SegmentationExecutor(**SEGMENTATION_ARGS, dataset="brats-2021").dataset_name == "brats-2021"
    named = _outcome(image=True, dataset="cxr.v2")
    assert named.dataset_name == "cxr.v2" and named.kind_dataset == "outcome_image" and named.dataset == "cxr.v2"
    assert named.dataset_origin == "the job's executor argument 'dataset'"
    assert _outcome(image=False).dataset_origin == "the executor kind, OutcomeExecutor without image_column"
    assert SegmentationExecutor(**SEGMENTATION_ARGS).dataset_origin == "the executor kind, SegmentationExecutor"


def test_one_keyed_file_serves_a_segmentation_and_both_outcome_executors(three_kinds):
    fl_ctx, datasets = three_kinds
    segmentation = _started(SegmentationExecutor(**SEGMENTATION_ARGS), fl_ctx)
    assert segmentation._trainer is not None, segmentation._setup_error
    assert segmentation._trainer.num_train_cases == 3  # tiny_sites: 5 subjects, 2 for validation
    table = _started(_outcome(image=False), fl_ctx)
    assert table._trainer is not None, table._setup_error
    assert table._trainer.num_train_cases == 10  # the clinical table, not the X-ray table's 16 training cases
    image = _started(_outcome(image=True), fl_ctx)
    assert image._trainer is not None, image._setup_error
    assert image._trainer.num_train_cases == 16


def test_the_jobs_dataset_argument_picks_another_entry(three_kinds):
    fl_ctx, _ = three_kinds
    executor = _started(_outcome(image=False, dataset="outcome_image"), fl_ctx)  # the X-ray table's clinical columns
    assert executor._trainer is not None, executor._setup_error
    assert executor._trainer.num_train_cases == 16


@pytest.mark.parametrize(
    "build, origin",
    [
        (lambda: SegmentationExecutor(**SEGMENTATION_ARGS, dataset="brats-2021"), "the job's executor argument 'dataset'"),
        (lambda: _outcome(image=False), "the executor kind, OutcomeExecutor without image_column"),
    ],
)
def test_a_data_set_the_site_lacks_refuses_every_task_naming_it_and_what_the_site_has(tmp_path, three_kinds, caplog, build, origin):
    fl_ctx, datasets = three_kinds
    path = tmp_path / "site-1" / "local" / LOCAL_FILE_NAME
    if origin.startswith("the executor kind"):  # a site with no clinical table
        path.write_text(json.dumps({"datasets": {k: v for k, v in datasets.items() if k != "outcome_table"}}))
    executor = build()
    with caplog.at_level(logging.ERROR):
        _started(executor, fl_ctx)
        reply = executor.execute("train", weights_task({"w": np.zeros(1)}), fl_ctx, Signal())
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert f"has no data set {executor.dataset_name!r} (asked for by {origin}); this site has [" in executor._setup_error
    assert str(path) in executor._setup_error and "'segmentation'" in executor._setup_error
    assert "nothing sent" in caplog.text


def test_a_flat_file_still_serves_every_kind(tmp_path, tiny_sites, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    fl_ctx = site_context(tmp_path)
    (tmp_path / "site-1" / "local" / LOCAL_FILE_NAME).write_text(json.dumps(_entry(tiny_sites["site-1"])))
    executor = _started(SegmentationExecutor(**SEGMENTATION_ARGS, dataset="anything"), fl_ctx)
    assert executor._trainer is not None, executor._setup_error


BAD_NAMES = ["", "a b", "../x", "x/y", "..", ".hidden", 3, True, ["segmentation"], {"name": "x"}]


@pytest.mark.parametrize("value", BAD_NAMES)
@pytest.mark.parametrize("build", [lambda v: SegmentationExecutor(**SEGMENTATION_ARGS, dataset=v), lambda v: _outcome(image=True, dataset=v)])
def test_bad_dataset_values_are_refused_when_the_job_is_built(build, value):
    with pytest.raises(ValueError, match=rf"^dataset \(the site's data set name, or null for the executor kind's\) must be .*got {re.escape(repr(value))}$"):
        build(value)
