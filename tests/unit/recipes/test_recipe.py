"""MedflareRecipe: a study's definition as an NVFlare recipe; what each environment is given."""

import json
import os

import pytest

from nvflare.app_common.widgets.component_path_authorizer import CLASS_ALLOW_LIST
from nvflare.recipe.poc_env import PocEnv
from nvflare.recipe.sim_env import SimEnv

from medflare.data.site_data_config import ENV_VAR as DATA_ENV_VAR
from medflare.privacy.site_budget import ENV_VAR as BUDGET_ENV_VAR
from medflare.recipes import BratsSegmentationRecipe, HeartDiseaseRecipe, MedflarePocEnv, MedflareRecipe, OutcomePredictionRecipe
from medflare.recipes.job_definition import JobDefinition, JobDefinitionError
from medflare.recipes.recipe import RecipeEnvError
from medflare.recipes.shipped_jobs import SHIPPED_JOBS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
STUDY_OF = {"brats": BratsSegmentationRecipe, "cxr": OutcomePredictionRecipe, "heart": HeartDiseaseRecipe}


def _files(folder):
    return {
        os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
        for d, _, names in os.walk(folder)
        for f in names
    }


@pytest.mark.parametrize(
    "name, cls, options",
    [
        ("brats_percentile", BratsSegmentationRecipe, {"privacy": "percentile"}),
        ("cxr_emr_dpsgd", OutcomePredictionRecipe, {"privacy": "dpsgd"}),
        ("heart_disease_fedyogi", HeartDiseaseRecipe, {"aggregation": "fedyogi"}),
    ],
)
def test_a_study_recipe_exports_the_shipped_job(tmp_path, name, cls, options):
    cls(name, **options).export(str(tmp_path))
    assert _files(tmp_path / name) == _files(os.path.join(REPO, "jobs", name))


@pytest.mark.parametrize("name", sorted(SHIPPED_JOBS))
def test_a_job_folder_read_back_is_its_definition(name):
    assert MedflareRecipe.from_job_folder(os.path.join(REPO, "jobs", name)).definition == SHIPPED_JOBS[name]()


def test_on_simenv_the_workspace_gets_medflares_allow_list_budget_and_data(tmp_path, monkeypatch):
    for var in (DATA_ENV_VAR, BUDGET_ENV_VAR):  # recorded, so what process_env sets is undone afterwards
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    workspace = tmp_path / "sim" / "brats_dpsgd"
    (workspace / "site-1" / "local").mkdir(parents=True)  # a previous run's simulated site and ledger
    recipe = BratsSegmentationRecipe("brats_dpsgd", privacy="dpsgd", site_data=str(tmp_path / "{site_name}" / "data_config.json"))
    recipe.process_env(SimEnv(num_clients=2, workspace_root=str(tmp_path / "sim")))
    resources = json.loads((workspace / "local" / "resources.json").read_text())
    assert "medflare." in resources[CLASS_ALLOW_LIST]
    assert os.environ[DATA_ENV_VAR] == str(tmp_path / "{site_name}" / "data_config.json")
    assert os.path.isfile(os.environ[BUDGET_ENV_VAR]) and os.environ[BUDGET_ENV_VAR].startswith(str(workspace / "local"))
    assert not (workspace / "site-1").exists()  # a simulated site's ledger is not a hospital's
    # SimEnv keeps an allow-list that is there (it writes NVFlare's default only where none is)
    SimEnv._ensure_default_component_policy(str(workspace))
    assert "medflare." in json.loads((workspace / "local" / "resources.json").read_text())[CLASS_ALLOW_LIST]


@pytest.mark.parametrize("recipe", [lambda: BratsSegmentationRecipe("b", privacy="he"), lambda: HeartDiseaseRecipe("h", privacy="he")])
def test_a_job_that_relies_on_a_site_scope_is_refused_on_simenv(tmp_path, recipe):
    with pytest.raises(RecipeEnvError, match="applies no site policy"):
        recipe().process_env(SimEnv(num_clients=2, workspace_root=str(tmp_path)))


def test_nvflares_poc_env_is_refused_with_what_to_use_instead():
    with pytest.raises(RecipeEnvError, match="use medflare.recipes.MedflarePocEnv"):
        HeartDiseaseRecipe().process_env(PocEnv(num_clients=2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"site_data": "/data/site-1/data_config.json"}, "site_data must name each site's data config with '{site_name}'"),
        ({"site_data": "/d/{site_name}.json", "profile": ""}, "profile must be a site profile name or folder"),
        ({"site_data": "/d/{site_name}.json", "num_clients": 0}, "clients must be an int >= 1"),
        ({"root": None, "site_data": "/d/{site_name}.json"}, "root must be the folder for the federation"),
    ],
)
def test_medflare_poc_env_refuses_bad_arguments(tmp_path, kwargs, message):
    args = {"root": str(tmp_path), "num_clients": 2, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("{", r"\{").replace("}", r"\}")):
        MedflarePocEnv(**args)
    with pytest.raises(TypeError, match="federation must be a started PocFederation"):
        MedflarePocEnv(federation=str(tmp_path))


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda d: None, "job file not found: .*meta.json"),
        (lambda d: (d / "meta.json").write_text("{"), "job file .*meta.json is not readable JSON"),
        (lambda d: (d / "meta.json").write_text("[]"), "meta.json must hold a JSON object"),
        (lambda d: (d / "meta.json").write_text('{"name": "x", "deploy_map": {"a": ["server"], "b": ["site-1"]}}'), "deploy_map must be"),
        (lambda d: (d / "meta.json").write_text('{"name": "x", "deploy_map": {"app": ["@ALL"]}}'), "job file not found: .*config_fed_server.json"),
    ],
)
def test_a_bad_job_folder_is_refused_naming_the_file(tmp_path, write, message):
    folder = tmp_path / "job"
    folder.mkdir()
    write(folder)
    with pytest.raises(JobDefinitionError, match=message):
        MedflareRecipe.from_job_folder(str(folder))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "../escape"}, "name must be"),
        ({"name": ""}, "name must be"),
        ({"min_clients": 0}, "min_clients must be a positive int"),
        ({"min_clients": True}, "min_clients must be a positive int"),
        ({"server": {"format_version": 1}}, "server must be an app config dict with format_version 2"),
        ({"client": []}, "client must be an app config dict"),
        ({"scope": "a b"}, "scope must be a privacy scope name"),
        ({"server": {"format_version": 2, "lr": float("nan")}}, "the server config is not JSON"),
        ({"client": {"format_version": 2, "x": object()}}, "the client config is not JSON"),
    ],
)
def test_a_bad_definition_is_refused(kwargs, message):
    args = {"name": "j", "min_clients": 1, "server": {"format_version": 2}, "client": {"format_version": 2}, **kwargs}
    with pytest.raises(JobDefinitionError, match=message):
        JobDefinition(**args)


def test_a_simulation_workspace_that_is_a_file_is_refused(tmp_path):
    from medflare.recipes.recipe import prepare_simulation

    (tmp_path / "ws").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        prepare_simulation(str(tmp_path / "ws"), None)
