"""Site profiles: the shipped ones are valid and say what they promise; bad ones are refused."""

import copy
import json
import os

import pytest

from medflare.sites.class_allow_list import site_class_allow_list
from medflare.sites.site_profiles import (
    BUDGET_FILE,
    PROFILE_FILES,
    SiteProfileError,
    available_profiles,
    check_privacy_policy,
    check_resources_fragment,
    is_allowed,
    load_profile,
    resolve_profile,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DP_SGD = "medflare.filters.patient_dp_sgd.PatientDPSGDFilter"
GAUSSIAN = "medflare.filters.gaussian_privacy.GaussianPrivacyFilter"
PERCENTILE = "medflare.filters.percentile_sharing.PercentileSharingFilter"


def _policy(**scope_overrides):
    scope = {
        "name": "s",
        "properties": {},
        "task_data_filters": [],
        "task_result_filters": [{"path": PERCENTILE, "args": {"fraction_shared": 0.1, "gamma": 0.1}}],
    }
    scope.update(scope_overrides)
    return {"scopes": [scope], "default_scope": "s"}


def test_shipped_profiles_are_found_in_the_package_and_site_configs_links_to_them():
    profiles = available_profiles()
    assert {"research", "clinical"} <= set(profiles)
    for name in ("research", "clinical"):
        assert profiles[name] == os.path.join(REPO, "custom", "medflare", "site_profiles", name)
        assert os.path.realpath(os.path.join(REPO, "site_configs", name)) == os.path.realpath(profiles[name])


@pytest.mark.parametrize("name", ["research", "clinical"])
def test_shipped_profiles_load_and_build_every_filter(name):
    profile = resolve_profile(name)
    assert profile.name == name
    assert profile.default_scope in profile.scope_names
    for scope in profile.privacy["scopes"]:
        assert scope["properties"]["description"]
        for f in scope["task_result_filters"]:
            assert is_allowed(f["path"], site_class_allow_list())


def test_clinical_profile_releases_no_update_without_differential_privacy_within_a_budget():
    profile = resolve_profile("clinical")
    assert profile.budget.max_epsilon <= 8.0
    for scope in profile.privacy["scopes"]:
        paths = [f["path"] for f in scope["task_result_filters"]]
        assert paths[0] in (GAUSSIAN, DP_SGD), f"scope {scope['name']} must start with Gaussian DP or DP-SGD"
        if paths[0] == GAUSSIAN:
            assert scope["task_result_filters"][0]["args"]["max_epsilon"] <= 8.0
        else:  # DP-SGD: the executor is told the requirement on the way in, with the same arguments
            assert scope["task_data_filters"] == scope["task_result_filters"][:1]
    assert profile.resources["allow_log_streaming"] is False


def _scope(profile, name):
    return next(s for s in profile.privacy["scopes"] if s["name"] == name)


def test_clinical_profile_defaults_to_patient_level_dp_sgd_and_keeps_gaussian_selectable():
    profile = resolve_profile("clinical")
    assert profile.default_scope == "dp_sgd"
    default = _scope(profile, "dp_sgd")
    (spec,) = default["task_result_filters"]
    assert spec["path"] == DP_SGD and default["task_data_filters"] == [spec]  # told on the way in, checked on the way out
    args = spec["args"]
    assert args["noise_multiplier"] >= 1.0 and args["max_grad_norm"] <= 1.0
    assert args["target_delta"] == profile.budget.delta and args.get("max_epsilon") is None  # the site's cap, 8
    assert args.get("allow_seeded_noise", False) is False and args["release_meta"] == []
    # the site-level Gaussian scopes are still there for a job that names them in meta.json
    assert {"clinical", "clinical_sparse"} <= set(profile.scope_names)
    assert _scope(profile, "clinical")["task_result_filters"][0]["path"] == GAUSSIAN
    # the same DP-SGD scope, by name and requirement, in the research profile: a job naming
    # "scope": "dp_sgd" runs at both kinds of site
    research = _scope(resolve_profile("research"), "dp_sgd")
    assert research["task_result_filters"] == default["task_result_filters"]


@pytest.mark.parametrize("name", ["research", "clinical"])
def test_dp_scope_descriptions_state_the_numbers_the_site_enforces(name):
    """What ``medflare site profiles`` prints must match the filters: z, C, delta and the site's cap."""
    profile = resolve_profile(name)
    cap = f"epsilon {profile.budget.max_epsilon:g}"
    for scope in profile.privacy["scopes"]:
        text = scope["properties"]["description"]
        for f in scope["task_result_filters"]:
            args = f["args"]
            if f["path"] == DP_SGD:
                assert f"multiplier at least {args['noise_multiplier']:.1f}" in text, scope["name"]
                assert f"L2 norm at most {args['max_grad_norm']:g}" in text, scope["name"]
            elif f["path"] == GAUSSIAN:
                assert f"multiplier {args['noise_multiplier']:g}" in text and f"L2 norm {args['clipping_norm']:g}" in text, scope["name"]
            else:
                continue
            assert cap in text and "delta 1e-5" in text, scope["name"]
            assert "validation scores of models the server asks" in text, scope["name"]  # METRICS pass
            assert args.get("release_meta") == [] and "release_meta is empty" in text, scope["name"]


def test_research_profile_defaults_to_partial_sharing():
    profile = resolve_profile("research")
    default = next(s for s in profile.privacy["scopes"] if s["name"] == profile.default_scope)
    assert [f["path"] for f in default["task_result_filters"]] == [PERCENTILE]


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(SiteProfileError, match=r"unknown profile 'clinic'.*clinical, research"):
        resolve_profile("clinic")


def test_profile_by_folder_and_missing_file(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "privacy.json").write_text(json.dumps(_policy()))
    with pytest.raises(SiteProfileError, match="profile file missing: .*resources.json"):
        resolve_profile(str(folder))
    (folder / "resources.json").write_text("{}")
    assert resolve_profile(str(folder)).scope_names == ["s"]
    with pytest.raises(SiteProfileError, match="profile folder not found"):
        resolve_profile(str(tmp_path / "nope"))


def test_profiles_env_var_is_searched_first(tmp_path, monkeypatch):
    folder = tmp_path / "research"
    folder.mkdir()
    (folder / "privacy.json").write_text(json.dumps(_policy()))
    (folder / "resources.json").write_text("{}")
    monkeypatch.setenv("MEDFLARE_SITE_CONFIGS", str(tmp_path))
    assert resolve_profile("research").folder == str(folder)


@pytest.mark.parametrize(
    "policy, message",
    [
        ({"scopes": [], "default_scope": "s"}, "'scopes' must be a non-empty list"),
        ({"scopes": [{"name": "s"}], "default_scope": "t"}, r"default_scope 't' is not one of the scopes \['s'\]"),
        ({"scopes": [{"name": "s"}, {"name": "s"}], "default_scope": "s"}, "scope name 's' is defined twice"),
        ({"scopes": [{"name": ""}], "default_scope": ""}, "needs a non-empty string 'name'"),
        ({"scopes": [{"name": "s", "filters": []}], "default_scope": "s"}, r"unknown keys \['filters'\]"),
        ({"scopes": [{"name": "s"}], "default_scope": "s", "budget": 1}, r"unknown top-level keys \['budget'\]"),
        (
            _policy(task_result_filters=[{"path": PERCENTILE, "args": {"fraction_shared": 1.5, "gamma": 0.1}}]),
            r"scope 's' task_result_filters\[0\]: .*PercentileSharingFilter refuses its arguments .*fraction_shared",
        ),
        (
            _policy(task_result_filters=[{"path": GAUSSIAN, "args": {"clipping_norm": -1.0, "noise_multiplier": 1.0}}]),
            "GaussianPrivacyFilter refuses its arguments.*clipping_norm",
        ),
        (
            _policy(task_result_filters=[{"path": "some.vendor.Filter", "args": {}}]),
            "some.vendor.Filter is not on the site's class allow-list",
        ),
        (
            _policy(task_result_filters=[{"path": "medflare.filters.nope.Filter", "args": {}}]),
            "class 'medflare.filters.nope.Filter' cannot be imported",
        ),
        (_policy(task_data_filters={"path": PERCENTILE}), "'task_data_filters' must be a list"),
    ],
)
def test_invalid_policies_are_refused_with_the_place_at_fault(policy, message):
    with pytest.raises(SiteProfileError, match=message):
        check_privacy_policy(policy, "privacy.json", site_class_allow_list())


@pytest.mark.parametrize(
    "fragment, message",
    [
        ({"class_allow_list": ["x."]}, "'class_allow_list' is set by the installer"),
        ({"components": {}}, "'components' must be a list"),
        ({"components": [{"id": "a", "path": "x.Y"}, {"id": "a", "path": "x.Z"}]}, "component id 'a' appears twice"),
        ({"components": [{"id": "rm", "path": "x.Y", "args": {"num_of_gpus": -1}}]}, "num_of_gpus must be 'auto' or a number >= 0"),
        ({"components": [{"path": "x.Y"}]}, "needs a string 'id'"),
    ],
)
def test_invalid_resource_fragments_are_refused(fragment, message):
    with pytest.raises(SiteProfileError, match=message):
        check_resources_fragment(fragment, "resources.json")


def test_allow_list_rule_matches_nvflare():
    allow = ["medflare.", "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor"]
    assert is_allowed("medflare.filters.x.Y", allow)
    assert is_allowed("nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor", allow)
    assert not is_allowed("nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistorX", allow)
    assert not is_allowed("medflarex.Y", allow)


def test_a_profile_that_is_not_json_is_refused(tmp_path):
    (tmp_path / "privacy.json").write_text("{not json")
    (tmp_path / "resources.json").write_text("{}")
    with pytest.raises(SiteProfileError, match="privacy.json is not readable JSON"):
        load_profile(str(tmp_path))
    (tmp_path / "privacy.json").write_text("[]")
    with pytest.raises(SiteProfileError, match="must hold a JSON object, got list"):
        load_profile(str(tmp_path))
    # loading does not change the caller's dict
    policy = _policy()
    before = copy.deepcopy(policy)
    check_privacy_policy(policy, "p", site_class_allow_list())
    assert policy == before


def test_every_profile_file_ships_in_the_wheel():
    """``setup.cfg``'s package data covers every profile file (they live in the package)."""
    import configparser
    import fnmatch

    config = configparser.ConfigParser()
    config.read(os.path.join(REPO, "setup.cfg"))
    patterns = [p.strip() for p in config["options.package_data"]["medflare"].replace("\n", ",").split(",") if p.strip()]
    package = os.path.join(REPO, "custom", "medflare")
    folders = sorted(n for n in os.listdir(os.path.join(REPO, "site_configs")) if os.path.isdir(os.path.join(REPO, "site_configs", n)))
    assert folders == ["clinical", "research"]
    for name in folders:
        for f in PROFILE_FILES:
            rel = f"site_profiles/{name}/{f}"
            assert os.path.isfile(os.path.join(package, rel))
            assert any(fnmatch.fnmatch(rel, p) for p in patterns), rel


@pytest.mark.parametrize("name, cap", [("research", 10.0), ("clinical", 8.0)])
def test_shipped_profiles_carry_the_sites_budget(name, cap):
    budget = resolve_profile(name).budget
    assert (budget.max_epsilon, budget.delta, budget.accountant, budget.seal_path) == (cap, 1e-5, "rdp", None)


def _profile_folder(tmp_path, budget=None, policy=None):
    folder = tmp_path / "mine"
    folder.mkdir(exist_ok=True)
    (folder / "privacy.json").write_text(json.dumps(policy or _policy()))
    (folder / "resources.json").write_text("{}")
    if budget is not None:
        (folder / BUDGET_FILE).write_text(budget if isinstance(budget, str) else json.dumps(budget))
    return folder


def test_a_profile_without_a_budget_file_loads_without_one(tmp_path):
    profile = load_profile(str(_profile_folder(tmp_path)))
    assert profile.budget is None and profile.budget_content is None


@pytest.mark.parametrize(
    "budget, message",
    [
        ({"max_epsilon": -1, "delta": 1e-5, "accountant": "rdp"}, r"mine/medflare_privacy_budget.json: max_epsilon must be in \(0.0, inf\), got -1.0"),
        ({"max_epsilon": 8, "delta": 1e-5, "accountant": "rdp", "cap": 9}, r"unknown field\(s\) \['cap'\]"),
        ({"max_epsilon": 8, "accountant": "rdp"}, "missing field 'delta'"),
        ("{", "is not readable JSON"),
    ],
)
def test_an_invalid_budget_file_is_refused(tmp_path, budget, message):
    with pytest.raises(SiteProfileError, match=message):
        load_profile(str(_profile_folder(tmp_path, budget)))


def test_a_filter_asking_for_a_larger_delta_than_the_budget_is_refused(tmp_path):
    policy = _policy(
        task_result_filters=[
            {"path": GAUSSIAN, "args": {"clipping_norm": 1.0, "noise_multiplier": 2.4, "max_epsilon": 8.0, "target_delta": 1e-4}}
        ]
    )
    folder = _profile_folder(tmp_path, {"max_epsilon": 8, "delta": 1e-5, "accountant": "rdp"}, policy)
    with pytest.raises(SiteProfileError, match=r"scope 's' task_result_filters\[0\]: target_delta 0.0001 is above the site budget's delta 1e-05"):
        load_profile(str(folder))


def test_a_dp_sgd_scope_must_tell_the_executor_on_the_way_in():
    from medflare.sites.class_allow_list import site_class_allow_list
    from medflare.sites.site_profiles import SiteProfileError, check_privacy_policy

    spec = {"path": DP_SGD, "args": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}
    told = {"name": "dp", "task_data_filters": [spec], "task_result_filters": [spec]}
    check_privacy_policy({"scopes": [told], "default_scope": "dp"}, "p.json", site_class_allow_list())
    for data_filters in ([], [{"path": DP_SGD, "args": {"noise_multiplier": 0.5, "max_grad_norm": 1.0}}]):
        untold = dict(told, task_data_filters=data_filters)
        with pytest.raises(SiteProfileError, match="needs the same filter with the same args in task_data_filters"):
            check_privacy_policy({"scopes": [untold], "default_scope": "dp"}, "p.json", site_class_allow_list())
