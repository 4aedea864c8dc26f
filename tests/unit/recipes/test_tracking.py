"""Experiment tracking added to a job: a receiver on the server, the round record streamed to it,
nothing added at the sites."""

import pytest

from medflare.jobs.job_check import check_job
from medflare.recipes import HeartDiseaseRecipe
from medflare.recipes.job_definition import JobDefinition, JobDefinitionError
from medflare.recipes.shipped_jobs import SHIPPED_JOBS
from medflare.recipes.tracking import TRACKERS, with_tracking


def _component(definition, path):
    return [c for c in definition.server["components"] if c["path"] == path]


@pytest.mark.parametrize("tracking_type", sorted(TRACKERS))
def test_tracking_adds_the_receiver_and_streams_the_record(tracking_type):
    job = SHIPPED_JOBS["brats_gaussian_dp"]()
    tracked = with_tracking(job, tracking_type)
    (receiver,) = _component(tracked, TRACKERS[tracking_type][0])
    (writer,) = _component(tracked, "medflare.reporting.round_metrics_writer.RoundMetricsWriter")
    assert writer["args"]["stream_to_tracking"] is True
    assert tracked.client == job.client  # nothing at the sites
    if tracking_type == "mlflow":
        assert receiver["args"]["kw_args"]["experiment_name"] == "brats_gaussian_dp-experiment"
    assert _component(job, TRACKERS[tracking_type][0]) == []  # the original is untouched


@pytest.mark.parametrize(
    "tracking_type, config, message",
    [
        ("wandb", None, "tracking_type must be one of"),
        ("tensorboard", "tb", "tracking_config must be a dict"),
    ],
)
def test_bad_tracking_is_refused(tracking_type, config, message):
    with pytest.raises(JobDefinitionError, match=message):
        with_tracking(SHIPPED_JOBS["brats_fedavg"](), tracking_type, config)


def test_tracking_twice_or_without_a_record_is_refused():
    tracked = with_tracking(SHIPPED_JOBS["brats_fedavg"](), "tensorboard")
    with pytest.raises(JobDefinitionError, match="already has experiment tracking"):
        with_tracking(tracked, "mlflow")
    bare = JobDefinition("bare", 1, {"format_version": 2, "components": []}, {"format_version": 2})
    with pytest.raises(JobDefinitionError, match="no RoundMetricsWriter"):
        with_tracking(bare, "tensorboard")


def test_the_recipe_method_tracks_and_exports_it(tmp_path):
    recipe = HeartDiseaseRecipe("heart_tracked")
    recipe.add_experiment_tracking("tensorboard", {"tb_folder": "tb"})
    recipe.export(str(tmp_path))
    exported = JobDefinition.from_folder(str(tmp_path / "heart_tracked"))
    (receiver,) = _component(exported, TRACKERS["tensorboard"][0])
    assert receiver["args"] == {"tb_folder": "tb"}


def test_a_tracker_whose_package_is_missing_is_refused_before_the_job_runs(tmp_path, monkeypatch):
    import medflare.optional_dependencies as optional

    tracked = with_tracking(SHIPPED_JOBS["heart_disease_fedavg"](), "mlflow").write(str(tmp_path))
    monkeypatch.setattr(optional, "available", lambda module: module != "mlflow")
    problems = check_job(tracked).problems
    assert any("needs mlflow, which is not installed" in p and "medflare[tracking]" in p for p in problems), problems
