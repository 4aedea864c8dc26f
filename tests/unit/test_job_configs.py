"""Every component named in every job config is built, so a typo in JSON fails here, not at a hospital.

Variables are resolved with NVFlare's own resolver and components built with NVFlare's own
``ComponentBuilder`` (nested ``{"path": ...}`` arguments included), as a FLARE app does.
"""

import copy
import glob
import importlib
import json
import os

import pytest

from nvflare.fuel.utils.component_builder import ComponentBuilder
from nvflare.fuel.utils.json_scanner import JsonScanner
from nvflare.fuel.utils.wfconf import resolve_var_refs

from medflare.sites.class_allow_list import site_class_allow_list
from medflare.sites.site_profiles import is_allowed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "jobs", "*", "*", "config", "config_fed_*.json")))
_SECTIONS = ("components", "workflows", "executors", "task_data_filters", "task_result_filters")


class _Builder(ComponentBuilder):
    def get_module_scanner(self):
        return None


def _resolved(path):
    with open(path) as f:
        config = json.load(f)
    variables = {k: v for k, v in config.items() if k not in _SECTIONS}
    resolve_var_refs(JsonScanner(config, path), variables)
    return config


def _component_configs(config):
    """Every ``{"path": ...}`` dict in the config, outermost first."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("path"), str) and node.get("config_type") != "dict":
                found.append(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for section in _SECTIONS:
        walk(config.get(section, []))
    return found


def test_every_job_has_configs():
    jobs = sorted(glob.glob(os.path.join(REPO, "jobs", "*", "meta.json")))
    assert jobs, "no job folders found"
    for meta_path in jobs:
        with open(meta_path) as f:
            meta = json.load(f)
        assert meta["name"] == os.path.basename(os.path.dirname(meta_path))
        assert meta["min_clients"] >= 1
        for app in meta["deploy_map"]:
            assert os.path.isfile(os.path.join(os.path.dirname(meta_path), app, "config", "config_fed_client.json"))
            assert os.path.isfile(os.path.join(os.path.dirname(meta_path), app, "config", "config_fed_server.json"))


@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_every_component_instantiates_and_is_allowed(config_path):
    config = _resolved(config_path)
    allow_list = site_class_allow_list()
    components = _component_configs(config)
    assert components
    builder = _Builder()
    for component in components:
        assert is_allowed(component["path"], allow_list), f"{component['path']} is not on the sites' allow-list"
        built = builder.build_component(copy.deepcopy(component))
        assert built is not None, component["path"]
    for executor in config.get("executors", []):
        assert executor["tasks"], "an executor must name its tasks"
    for path in _plain_dict_paths(config):  # built later by their owner (e.g. FedOpt's optimizer)
        module, _, name = path.rpartition(".")
        assert hasattr(importlib.import_module(module), name), path


def _plain_dict_paths(config):
    paths = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("config_type") == "dict" and isinstance(node.get("path"), str):
                paths.append(node["path"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(config)
    return paths


@pytest.mark.parametrize("job", sorted({p.split(os.sep)[-4] for p in CONFIGS}))
def test_server_and_sites_build_the_same_network(job):
    """The persistor's model and the executor's model must have identical state_dict layouts."""
    from medflare.training.model_spec import build_model

    apps = glob.glob(os.path.join(REPO, "jobs", job, "*", "config"))
    for app in apps:
        server = _resolved(os.path.join(app, "config_fed_server.json"))
        client = _resolved(os.path.join(app, "config_fed_client.json"))
        persistor = next(c for c in server["components"] if c["id"] == "persistor")
        executor = client["executors"][0]["executor"]
        if "model" not in executor["args"]:
            continue
        server_model = persistor["args"]["model"]
        if isinstance(server_model, str):  # a component id
            server_model = next(c for c in server["components"] if c["id"] == server_model)
        server_state = build_model(server_model).state_dict()
        client_state = build_model(executor["args"]["model"]).state_dict()
        assert {k: v.shape for k, v in server_state.items()} == {k: v.shape for k, v in client_state.items()}
