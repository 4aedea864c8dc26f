"""An executor rebuilt in the middle of a job (simulator threads < clients, a restarted client)
resumes from the state it saved in the job's run folder instead of losing it."""

import logging
import pickle
import re

import numpy as np
import pytest
import torch

from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal

from medflare.executors.executor_state import STATE_FILE, ExecutorStateError, load_state, save_state
from medflare.executors.outcome_executor import OutcomeExecutor
from medflare.wire_contract import LOCAL_MODEL
from tests.unit.executors.flare_objects import site_context, weights_task
from tests.unit.executors.test_dp_sgd_executors import TARGET, _table_site_of, _train
from tests.unit.executors.test_outcome_executor import _ready, outcome_site  # noqa: F401 (fixture)

JOB_ID = "job-7"


def _in_job(fl_ctx):
    fl_ctx.set_prop(ReservedKey.RUN_NUM, JOB_ID, private=False, sticky=True)
    return fl_ctx


def _state_file(tmp_path):
    return tmp_path / "site-1" / JOB_ID / STATE_FILE


def _rebuilt(executor, tmp_path):
    """A new executor with the same arguments, started as the client starts it again."""
    args = {k: getattr(executor, k) for k in ("model", "label_columns", "clinical_columns", "image_column", "image_size",
                                              "local_steps", "batch_size", "clinical_normalisation", "device",
                                              "local_model", "dp_sgd")}
    again = OutcomeExecutor(**args)
    fl_ctx = _in_job(site_context(tmp_path))
    again.handle_event(EventType.START_RUN, fl_ctx)
    return again, fl_ctx


def _submit(executor, fl_ctx):
    return executor.execute("submit_model", Shareable(), fl_ctx, Signal())


@pytest.mark.parametrize("local_model", ["site_only", "last_round"])
def test_the_local_model_survives_a_rebuild(tmp_path, outcome_site, monkeypatch, local_model):  # noqa: F811
    executor, fl_ctx, weights = _ready(tmp_path, outcome_site, monkeypatch, "table-binary", local_model=local_model)
    _in_job(fl_ctx)
    executor._restore_state(fl_ctx)  # as START_RUN would have, now that the context names a job
    for round_number in range(2):
        moved = {k: v + 0.1 * round_number for k, v in weights.items()}
        assert executor.execute("train", weights_task(moved, round_number), fl_ctx, Signal()).get_return_code() == ReturnCode.OK
    before = from_shareable(_submit(executor, fl_ctx))
    assert _state_file(tmp_path).is_file()

    again, fl_ctx2 = _rebuilt(executor, tmp_path)
    after = from_shareable(_submit(again, fl_ctx2))
    assert after.get_meta_prop(LOCAL_MODEL) == local_model
    for key in before.data:
        np.testing.assert_array_equal(after.data[key], before.data[key])
    if local_model == "site_only":
        # it trains on from where it was, not from the next global model
        again.execute("train", weights_task({k: v + 5.0 for k, v in weights.items()}, 2), fl_ctx2, Signal())
        resumed = from_shareable(_submit(again, fl_ctx2)).data
        assert np.abs(resumed["head.weight"] - before.data["head.weight"]).max() < 1.0


def test_without_a_saved_state_a_rebuilt_executor_has_nothing_to_submit(tmp_path, outcome_site, monkeypatch):  # noqa: F811
    executor, fl_ctx, _ = _ready(tmp_path, outcome_site, monkeypatch, "table-binary", local_model="site_only")
    again, fl_ctx2 = _rebuilt(executor, tmp_path)
    assert _submit(again, fl_ctx2).get_return_code() == ReturnCode.EXECUTION_RESULT_ERROR


def test_the_dp_target_rounds_trained_survive_a_rebuild(tmp_path, monkeypatch, caplog):
    root = tmp_path / "n20"
    executor, fl_ctx, weights = _ready(root, _table_site_of(root / "data", 20), monkeypatch, "table-binary",
                                       dp_sgd=TARGET, local_steps=2)
    _in_job(fl_ctx)
    executor._restore_state(fl_ctx)
    for round_number in range(2):
        assert _train(executor, fl_ctx, weights, rounds=2, round_number=round_number)[0].get_return_code() == ReturnCode.OK
    again, fl_ctx2 = _rebuilt(executor, root)
    assert again._target_rounds_trained == 2
    caplog.set_level(logging.INFO)
    # a third round would spend more than the target the noise multiplier was solved for
    reply, dxo = _train(again, fl_ctx2, weights, rounds=2, round_number=2)
    assert reply.get_return_code() == ReturnCode.BAD_TASK_DATA and dxo is None
    assert "has trained the 2 rounds its noise multiplier was solved for" in caplog.text


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a torch file", "cannot be read"),
        (None, "not medflare executor state version 1"),  # a readable file of another kind
    ],
)
def test_an_unreadable_state_stops_every_task_naming_the_file(tmp_path, outcome_site, monkeypatch, content, message):  # noqa: F811
    executor, _, weights = _ready(tmp_path, outcome_site, monkeypatch, "table-binary", local_model="site_only")
    path = _state_file(tmp_path)
    path.parent.mkdir(parents=True)
    if content is None:
        torch.save({"version": 99}, path)
    else:
        path.write_bytes(content)
    again, fl_ctx = _rebuilt(executor, tmp_path)
    assert message in again._setup_error and str(path) in again._setup_error
    for task in ("train", "validate", "submit_model"):
        reply = again.execute(task, weights_task(weights), fl_ctx, Signal())
        assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION, task


class _Payload:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_loading_runs_no_pickled_code(tmp_path):
    path = tmp_path / STATE_FILE
    with open(path, "wb") as f:
        pickle.dump({"version": 1, "local_weights": _Payload()}, f)
    with pytest.raises(ExecutorStateError, match="cannot be read"):
        load_state(str(path))


def test_save_and_load_round_trip_whole_or_not_at_all(tmp_path):
    path = str(tmp_path / "run" / STATE_FILE)
    weights = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3, dtype=np.int64)}
    save_state(path, {"local_weights": weights, "site_only_weights": None, "site_only_dp_records": [{"steps": 4}],
                      "site_only_unprivate": False, "target_rounds_trained": 3})
    state = load_state(path)
    np.testing.assert_array_equal(state["local_weights"]["a"], weights["a"])
    assert state["local_weights"]["n"].dtype == np.int64 and state["site_only_weights"] is None
    assert state["site_only_dp_records"] == [{"steps": 4}] and state["target_rounds_trained"] == 3
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [STATE_FILE]  # no temporary file left
    assert load_state(str(tmp_path / "absent.pt")) is None and load_state(None) is None


@pytest.mark.parametrize(
    "tampered, message",
    [
        ({"local_weights": {"w": [1.0, 2.0]}}, "local_weights is not a mapping of names to tensors"),
        ({"site_only_weights": "weights"}, "site_only_weights is not a mapping of names to tensors"),
        ({"target_rounds_trained": -1}, "target_rounds_trained must be an int >= 0, got -1"),
        ({"target_rounds_trained": True}, "target_rounds_trained must be an int >= 0, got True"),
        ({"target_rounds_trained": 1.5}, "target_rounds_trained must be an int >= 0, got 1.5"),
        ({"site_only_unprivate": "no"}, "site_only_unprivate must be true or false"),
        ({"site_only_dp_records": {"steps": 4}}, "site_only_dp_records must be a list of DP-SGD records"),
        ({"site_only_dp_records": [3]}, "site_only_dp_records must be a list of DP-SGD records"),
    ],
)
def test_a_tampered_state_is_refused_naming_what_is_wrong(tmp_path, tampered, message):
    path = tmp_path / STATE_FILE
    payload = {"version": 1, "local_weights": None, "site_only_weights": None, "site_only_dp_records": [],
               "site_only_unprivate": False, "target_rounds_trained": 0, **tampered}
    torch.save(payload, path)
    with pytest.raises(ExecutorStateError, match=re.escape(message)):
        load_state(str(path))
