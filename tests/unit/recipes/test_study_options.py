"""The study functions refuse bad options loudly, and their options land where NVFlare reads them."""

import copy
import os

import pytest

from medflare.recipes.brats_segmentation import brats_segmentation
from medflare.recipes.heart_disease import heart_disease
from medflare.recipes.job_definition import JobDefinition, JobDefinitionError
from medflare.recipes.outcome_prediction import outcome_prediction
from medflare.recipes.study_options import check_choice, check_optional_int

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
NAN, INF = float("nan"), float("inf")


def _shipped(name):
    return JobDefinition.from_folder(os.path.join(REPO, "jobs", name))


def _executor_args(definition):
    return definition.client["executors"][0]["executor"]["args"]


def _component(config, component_id):
    return next(c for c in config["components"] if c["id"] == component_id)


# --- refusals ----------------------------------------------------------------------------------

BRATS_REFUSALS = [
    ({"aggregation": "fedprox"}, ValueError, r"aggregation must be one of \['fedavg', 'fedyogi'\], got 'fedprox'"),
    ({"aggregation": "FedAvg"}, ValueError, r"got 'FedAvg' \(did you mean 'fedavg'\?\)"),
    ({"aggregation": None}, TypeError, r"aggregation must be one of .*got None \(NoneType\)"),
    ({"privacy": "dp"}, ValueError, r"privacy must be one of \['none', 'percentile', 'gaussian', 'dpsgd', 'he'\], got 'dp'"),
    ({"privacy": 1}, TypeError, r"privacy must be one of .*got 1 \(int\)"),
    ({"num_rounds": 0}, ValueError, r"num_rounds must be an int in \[1, inf\], got 0"),
    ({"num_rounds": True}, TypeError, r"num_rounds must be an int in \[1, inf\], got True \(bool\)"),
    ({"num_rounds": 2.0}, TypeError, r"num_rounds must be an int in \[1, inf\], got 2.0 \(float\)"),
    ({"min_clients": -1}, ValueError, r"min_clients must be an int in \[1, inf\], got -1"),
    ({"local_epochs": 0}, ValueError, r"local_epochs must be an int in \[1, inf\], got 0"),
    ({"local_epochs": False}, TypeError, r"local_epochs must be an int .*got False \(bool\)"),
    ({"learning_rate": NAN}, ValueError, r"learning_rate must be a finite real number in \(0.0, 1.0\], got nan"),
    ({"learning_rate": INF}, ValueError, r"learning_rate must be a finite real number in \(0.0, 1.0\], got inf"),
    ({"learning_rate": 0.0}, ValueError, r"learning_rate must be in \(0.0, 1.0\], got 0.0"),
    ({"learning_rate": 1.5}, ValueError, r"learning_rate must be in \(0.0, 1.0\], got 1.5"),
    ({"learning_rate": "0.01"}, TypeError, r"learning_rate must be a real number in \(0.0, 1.0\], got '0.01' \(str\)"),
    ({"learning_rate": True}, TypeError, r"learning_rate must be a real number .*got True \(bool\)"),
    ({"batch_size": 0}, ValueError, r"batch_size must be an int in \[1, inf\], got 0"),
    ({"batch_size": None}, TypeError, r"batch_size must be an int in \[1, inf\], got None"),
    ({"aggregation": "fedyogi", "privacy": "he"}, ValueError, r"aggregation='fedyogi' cannot be combined with privacy='he'"),
    ({"privacy": "gaussian", "num_rounds": 11}, ValueError, r"num_rounds must be in \[1, 10\] with privacy='gaussian', got 11"),
    ({"local_steps": 5}, TypeError, r"unexpected keyword argument 'local_steps'"),
]

OUTCOME_REFUSALS = [
    ({"privacy": "he"}, ValueError, r"privacy must be one of \['none', 'dpsgd'\], got 'he'"),
    ({"privacy": "DPSGD"}, ValueError, r"got 'DPSGD' \(did you mean 'dpsgd'\?\)"),
    ({"aggregation": "fedyogi"}, TypeError, r"unexpected keyword argument 'aggregation'"),
    ({"num_rounds": -3}, ValueError, r"num_rounds must be an int in \[1, inf\], got -3"),
    ({"min_clients": 0}, ValueError, r"min_clients must be an int in \[1, inf\], got 0"),
    ({"local_epochs": 1.5}, TypeError, r"local_epochs must be an int in \[1, inf\], got 1.5 \(float\)"),
    ({"local_steps": 0}, ValueError, r"local_steps must be an int in \[1, inf\], got 0"),
    ({"local_steps": True}, TypeError, r"local_steps must be an int .*got True \(bool\)"),
    ({"learning_rate": -INF}, ValueError, r"learning_rate must be a finite real number in \(0.0, 1.0\], got -inf"),
    ({"learning_rate": NAN}, ValueError, r"learning_rate must be a finite real number .*got nan"),
    ({"batch_size": 2.5}, TypeError, r"batch_size must be an int in \[1, inf\], got 2.5 \(float\)"),
]

HEART_REFUSALS = [
    ({"privacy": "percentile"}, ValueError, r"privacy must be one of \['none', 'dpsgd', 'he'\], got 'percentile'"),
    ({"aggregation": "scaffold"}, ValueError, r"aggregation must be one of \['fedavg', 'fedyogi'\], got 'scaffold'"),
    ({"min_clients": 5}, ValueError, r"min_clients must be an int in \[1, 4\], got 5"),
    ({"min_clients": True}, TypeError, r"min_clients must be an int in \[1, 4\], got True \(bool\)"),
    ({"num_rounds": 0}, ValueError, r"num_rounds must be an int in \[1, inf\], got 0"),
    ({"local_steps": 0}, ValueError, r"local_steps must be an int in \[1, inf\], got 0"),
    ({"learning_rate": NAN}, ValueError, r"learning_rate must be a finite real number in \(0.0, 1.0\], got nan"),
    ({"learning_rate": 2}, ValueError, r"learning_rate must be in \(0.0, 1.0\], got 2.0"),
    ({"batch_size": True}, TypeError, r"batch_size must be an int in \[1, inf\], got True \(bool\)"),
    ({"aggregation": "fedyogi", "privacy": "he"}, ValueError, r"aggregation='fedyogi' cannot be combined with privacy='he'"),
    ({"local_epochs": 2}, TypeError, r"unexpected keyword argument 'local_epochs'"),
]


@pytest.mark.parametrize("options, error, message", BRATS_REFUSALS)
def test_brats_segmentation_refuses(options, error, message):
    with pytest.raises(error, match=message):
        brats_segmentation("job", **options)


@pytest.mark.parametrize("options, error, message", OUTCOME_REFUSALS)
def test_outcome_prediction_refuses(options, error, message):
    with pytest.raises(error, match=message):
        outcome_prediction("job", **options)


@pytest.mark.parametrize("options, error, message", HEART_REFUSALS)
def test_heart_disease_refuses(options, error, message):
    with pytest.raises(error, match=message):
        heart_disease("job", **options)


@pytest.mark.parametrize("study", [brats_segmentation, outcome_prediction, heart_disease])
@pytest.mark.parametrize("name", ["", "has space", "-leading-dash", None])
def test_a_name_the_job_store_would_refuse_is_refused(study, name):
    with pytest.raises(JobDefinitionError, match=r"name must be 1-64 letters"):
        study(name)


def test_options_are_keyword_only():
    with pytest.raises(TypeError, match=r"positional argument"):
        brats_segmentation("job", "fedyogi")


def test_check_choice_and_check_optional_int():
    assert check_choice("privacy", "he", ("none", "he")) == "he"
    with pytest.raises(ValueError, match=r"privacy must be one of \['none', 'he'\], got 'xyz'$"):
        check_choice("privacy", "xyz", ("none", "he"))
    assert check_optional_int("local_steps", None, 7) == 7
    assert check_optional_int("local_steps", 3, 7) == 3


# --- where the options land --------------------------------------------------------------------


@pytest.mark.parametrize("study", [brats_segmentation, outcome_prediction, heart_disease])
def test_num_rounds_and_min_clients_land_in_the_server_config_and_meta(study):
    job = study("job", num_rounds=3, min_clients=2)
    assert job.server["num_rounds"] == 3
    scatter_and_gather = job.server["workflows"][0]["args"]
    assert scatter_and_gather["num_rounds"] == "{num_rounds}"
    assert scatter_and_gather["min_clients"] == 2 == job.meta["min_clients"]


def test_brats_dpsgd_yields_the_shipped_dp_sgd_executor_and_filters():
    job = brats_segmentation("job", privacy="dpsgd")
    shipped = _shipped("brats_dpsgd")
    assert job.client == shipped.client
    assert job.server["model"]["path"] == "medflare.training.seeded_networks.SeededDPSegResNet"
    assert _executor_args(job)["local_epochs"] == 1


def test_outcome_and_heart_dpsgd_yield_the_shipped_executor_and_filters():
    assert outcome_prediction("job", privacy="dpsgd").client == _shipped("cxr_emr_dpsgd").client
    assert heart_disease("job", privacy="dpsgd").client == _shipped("heart_disease_dpsgd").client
    filters = heart_disease("job", privacy="dpsgd").client["task_result_filters"]
    assert filters[0]["tasks"] == ["train", "submit_model"], "a site model leaves in cross-site evaluation too"


def test_dpsgd_expects_batch_size_patients_per_step():
    args = _executor_args(brats_segmentation("job", privacy="dpsgd", batch_size=3))
    assert args["batch_size"] == 3 and args["dp_sgd"]["expected_patients_per_step"] == 3


def test_training_knobs_land_in_the_executor():
    args = _executor_args(brats_segmentation("job", local_epochs=2, learning_rate=0.01, batch_size=4))
    assert (args["local_epochs"], args["learning_rate"], args["batch_size"]) == (2, 0.01, 4)
    args = _executor_args(outcome_prediction("job", local_steps=7))
    assert args["local_steps"] == 7 and args["optimizer"] == "adam"
    assert "local_steps" not in _executor_args(outcome_prediction("job"))
    assert _executor_args(heart_disease("job", local_steps=20, learning_rate=0.1))["local_steps"] == 20


def test_gaussian_filter_spends_its_epsilon_over_the_job_rounds():
    job = brats_segmentation("job", privacy="gaussian", num_rounds=5)
    gaussian = job.client["task_result_filters"][0]["filters"][0]
    assert gaussian["path"] == "medflare.filters.gaussian_privacy.GaussianPrivacyFilter"
    assert gaussian["args"]["num_rounds"] == 5


def test_he_asks_for_the_secure_aggregation_scope_and_sums_ciphertexts():
    for job in (brats_segmentation("job", privacy="he"), heart_disease("job", privacy="he")):
        assert job.meta["scope"] == "secure_aggregation"
        assert _component(job.server, "aggregator")["path"].endswith("EncryptedSumAggregator")
        assert _component(job.server, "persistor")["args"]["filter_id"] == "model_serialize_filter"
        assert job.client["task_result_filters"] == [], "the site's scope encrypts, not the job"
    assert "scope" not in brats_segmentation("job").meta


def test_fedyogi_runs_yogi_on_the_model_component():
    job = brats_segmentation("job", aggregation="fedyogi", privacy="percentile")
    generator = _component(job.server, "shareable_generator")
    assert generator["args"]["source_model"] == "model"
    assert _component(job.server, "model")["args"] == "{model_args}"
    assert "model" not in job.server and job.server["model_args"]["in_channels"] == 4
    assert job.client["task_result_filters"][0]["filters"][0]["path"].endswith("PercentileSharingFilter")


def test_heart_defaults_follow_aggregation_and_privacy():
    assert _executor_args(heart_disease("job", aggregation="fedyogi"))["learning_rate"] == 0.003162
    combined = heart_disease("job", aggregation="fedyogi", privacy="dpsgd")
    assert _executor_args(combined)["learning_rate"] == 0.05
    assert _component(combined.server, "shareable_generator")["path"].endswith("PTFedOptModelShareableGenerator")


def test_each_definition_owns_its_dicts():
    first, second = brats_segmentation("job"), brats_segmentation("job")
    snapshot = copy.deepcopy(second.client)
    _executor_args(first)["model"]["args"]["blocks_up"].append(9)
    first.server["model"]["args"]["seed"] = 7
    assert second.client == snapshot
    assert _executor_args(first)["model"]["args"]["seed"] == 0, "server and client networks are separate dicts"
    outcome, other = outcome_prediction("job"), outcome_prediction("job")
    outcome.server["model_args"]["image_network"]["args"]["layers"].append(1)
    assert other.server["model_args"]["image_network"]["args"]["layers"] == [1, 1, 1, 1]


# --- real-data options: a site bundle, a required preparation ------------------------------------

BUNDLE = {"bundle": "brats_mri_segmentation", "version": "0.5.3", "use_preprocessing": True}
BUNDLE_NETWORK = {"spatial_dims": 3, "in_channels": 4, "out_channels": 3, "init_filters": 16,
                  "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "dropout_prob": 0.2}
PREPARED = {"name": "medflare-brats-prep", "version": ">=1.0,<2"}


def test_a_bundle_job_names_the_bundle_and_the_network_the_server_aggregates():
    from medflare.training.model_spec import build_model, split_bundle_spec

    job = brats_segmentation("brats_bundle", bundle=BUNDLE, network_args=BUNDLE_NETWORK, required_preparation=PREPARED)
    args = _executor_args(job)
    request, network = split_bundle_spec(args["model"])
    assert request == BUNDLE
    # the sites check their bundle's network against exactly what the server's persistor builds
    assert network == job.server["model"] == {"path": "monai.networks.nets.SegResNet", "args": BUNDLE_NETWORK}
    assert build_model(args["model"]).state_dict().keys() == build_model(network).state_dict().keys()
    assert args["required_preparation"] == PREPARED
    # the shipped job's own options stay as they were
    assert brats_segmentation("brats_fedavg").client == _shipped("brats_fedavg").client


def test_the_outcome_job_requires_a_preparation_when_asked():
    job = outcome_prediction("job", required_preparation={"name": "medflare-xray-prep", "version": "1.0.0"})
    assert _executor_args(job)["required_preparation"] == {"name": "medflare-xray-prep", "version": "1.0.0"}
    assert "required_preparation" not in _executor_args(outcome_prediction("job"))


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"bundle": BUNDLE, "privacy": "dpsgd"}, ValueError, "bundle cannot be combined with privacy='dpsgd'"),
        ({"network_args": BUNDLE_NETWORK}, ValueError, "network_args is only for a bundle job"),
        ({"bundle": BUNDLE, "network_args": [1]}, ValueError, "network_args must be a mapping"),
        ({"bundle": {**BUNDLE, "config": "/tmp/evil.json"}}, ValueError, "unknown key(s) ['config']"),
        ({"bundle": {"bundle": "../bundles/x"}}, ValueError, "bundle['bundle']"),
        ({"bundle": "brats_mri_segmentation"}, ValueError, "must be a JSON object naming a site bundle"),
        ({"bundle": {**BUNDLE, "load_weights": 1}}, TypeError, "['load_weights'] must be true or false, got 1"),
        ({"required_preparation": {"name": "medflare-brats-prep", "version": "~=1.0"}}, ValueError, "required_preparation['version']"),
        ({"required_preparation": {"name": "", "version": "1.0.0"}}, ValueError, "required_preparation['name']"),
        ({"required_preparation": ["medflare-brats-prep"]}, ValueError, "required_preparation must be null or"),
        ({"required_preparation": {**PREPARED, "path": "/data"}}, ValueError, "unknown key(s) ['path']"),
    ],
)
def test_bad_real_data_options_are_refused(options, error, message):
    with pytest.raises(error) as raised:
        brats_segmentation("job", **options)
    assert message in str(raised.value)
