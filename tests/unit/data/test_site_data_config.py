"""Where a site's data lives: the flat file of a site with one data set, and the keyed file of a
site with several, from which each job's executor takes the data set it asks for."""

import json
import os
import re

import pytest

from medflare.data.brats_layout import DataListError
from medflare.data.site_data_config import (
    DATASET_KINDS,
    ENV_VAR,
    LOCAL_FILE_NAME,
    OUTCOME_IMAGE,
    OUTCOME_TABLE,
    SEGMENTATION,
    check_dataset_name,
    keyed_data_config,
    read_site_data_config,
    read_site_datasets,
    resolve_site_data_config,
)


def _write(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    return path


def test_local_file_with_relative_paths(tmp_path):
    local = str(tmp_path / "site-1" / "local")
    _write(os.path.join(local, LOCAL_FILE_NAME), {"data_root": "../data", "datalist": "../data/list.json"})
    config = resolve_site_data_config("site-1", local, environ={})
    assert config.data_root == str(tmp_path / "site-1" / "data")
    assert config.datalist == str(tmp_path / "site-1" / "data" / "list.json")
    assert config.source == os.path.join(local, LOCAL_FILE_NAME)


def test_environment_template_names_the_site_and_wins(tmp_path):
    for site in ("site-1", "site-2"):
        _write(str(tmp_path / site / "cfg.json"), {"data_root": "/data/" + site, "datalist": "/lists/" + site})
    local = str(tmp_path / "local")
    _write(os.path.join(local, LOCAL_FILE_NAME), {"data_root": "/elsewhere", "datalist": "/elsewhere/l.json"})
    env = {ENV_VAR: str(tmp_path / "{site_name}" / "cfg.json")}
    assert resolve_site_data_config("site-2", local, env).data_root == "/data/site-2"
    assert resolve_site_data_config("site-1", None, env).datalist == "/lists/site-1"


def test_no_configuration_names_every_place_looked(tmp_path):
    with pytest.raises(DataListError) as err:
        resolve_site_data_config("site-9", str(tmp_path / "local"), environ={})
    assert ENV_VAR in str(err.value)
    assert os.path.join(str(tmp_path / "local"), LOCAL_FILE_NAME) in str(err.value)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{oops", "not readable JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ({"data_root": "/d"}, "'datalist'"),
        ({"data_root": "", "datalist": "x"}, "'data_root'"),
    ],
)
def test_bad_configuration_file_is_named(tmp_path, content, message):
    path = _write(str(tmp_path / "cfg.json"), content)
    with pytest.raises(DataListError, match=message) as err:
        read_site_data_config(path)
    assert path in str(err.value)


def test_environment_pointing_at_a_missing_file_is_an_error(tmp_path):
    env = {ENV_VAR: str(tmp_path / "{site_name}.json")}
    with pytest.raises(DataListError, match="not found: .*site-3.json"):
        resolve_site_data_config("site-3", None, env)


# the keyed form: one file, several data sets, each job's executor asks for its own ----------------

THREE = {
    "datasets": {
        "segmentation": {"data_root": "/data/brats", "datalist": "/data/brats/datalist.json"},
        "outcome_table": {"data_root": "/data/heart", "datalist": "/data/heart/table.csv"},
        "outcome_image": {"data_root": "../cxr", "datalist": "../cxr/table.csv"},
    }
}


def test_the_kind_names_are_the_three_executor_kinds():
    assert DATASET_KINDS == (SEGMENTATION, OUTCOME_TABLE, OUTCOME_IMAGE) == ("segmentation", "outcome_table", "outcome_image")


@pytest.mark.parametrize("name, root", [("segmentation", "/data/brats"), ("outcome_table", "/data/heart")])
def test_a_keyed_file_serves_each_data_set_by_name(tmp_path, name, root):
    local = str(tmp_path / "site-1" / "local")
    _write(os.path.join(local, LOCAL_FILE_NAME), THREE)
    config = resolve_site_data_config("site-1", local, environ={}, dataset=name)
    assert config.data_root == root and config.dataset == name
    assert config.source == os.path.join(local, LOCAL_FILE_NAME)


def test_relative_paths_of_a_keyed_entry_start_at_the_files_folder(tmp_path):
    local = str(tmp_path / "site-1" / "local")
    _write(os.path.join(local, LOCAL_FILE_NAME), THREE)
    config = resolve_site_data_config("site-1", local, environ={}, dataset="outcome_image")
    assert config.data_root == str(tmp_path / "site-1" / "cxr")
    assert config.datalist == str(tmp_path / "site-1" / "cxr" / "table.csv")


@pytest.mark.parametrize("name", [*DATASET_KINDS, "brats-2021", None])
def test_a_flat_file_serves_every_data_set_name(tmp_path, name):
    path = _write(str(tmp_path / "local" / LOCAL_FILE_NAME), {"data_root": "d", "datalist": "d/list.json", "hospital": "x"})
    config = resolve_site_data_config("site-1", str(tmp_path / "local"), environ={}, dataset=name)
    assert config.datalist == str(tmp_path / "local" / "d" / "list.json") and config.dataset is None
    assert read_site_datasets(path) == [config]


def test_a_missing_name_is_named_with_where_it_came_from_and_what_the_site_has(tmp_path):
    path = _write(str(tmp_path / "local" / LOCAL_FILE_NAME), THREE)
    with pytest.raises(DataListError) as err:
        resolve_site_data_config(
            "site-1", str(tmp_path / "local"), environ={}, dataset="brats-2021", dataset_from="the job's executor argument 'dataset'"
        )
    message = str(err.value)
    assert path in message and "'brats-2021'" in message and "the job's executor argument 'dataset'" in message
    assert "['segmentation', 'outcome_table', 'outcome_image']" in message


def test_without_a_name_a_keyed_file_with_one_entry_is_used_and_one_with_several_is_refused(tmp_path):
    one = _write(str(tmp_path / "one.json"), {"datasets": {"outcome_image": THREE["datasets"]["outcome_image"]}})
    assert read_site_data_config(one).dataset == "outcome_image"
    several = _write(str(tmp_path / "several.json"), THREE)
    with pytest.raises(DataListError, match=r"holds several data sets \['segmentation', 'outcome_table', 'outcome_image'\] and none was asked for"):
        read_site_data_config(several)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"datasets": {}, "data_root": "/d"}, r"a keyed file holds only 'datasets', got also \['data_root'\]"),
        ({"datasets": THREE["datasets"], "version": 2, "notes": "x"}, r"got also \['notes', 'version'\]"),
        ({"datasets": {}}, "'datasets' must be a non-empty object"),
        ({"datasets": ["segmentation"]}, "'datasets' must be a non-empty object"),
        ({"datasets": {"segmentation": "/data/brats"}}, r"datasets.segmentation must be an object \{data_root, datalist\}, got '/data/brats'"),
        ({"datasets": {"segmentation": {"data_root": "/d"}}}, r"needs a non-empty string 'datalist' in datasets.segmentation, got None"),
        ({"datasets": {"seg": {"data_root": "", "datalist": "l"}}}, r"'data_root' in datasets.seg, got ''"),
        ({"datasets": {"a b": {"data_root": "/d", "datalist": "/l"}}}, r"the data set name under 'datasets' must be .*got 'a b'"),
        ({"datasets": {"..": {"data_root": "/d", "datalist": "/l"}}}, r"starting with a letter or digit.*got '\.\.'"),
    ],
)
def test_a_malformed_keyed_file_is_named_with_the_key_at_fault(tmp_path, content, message):
    path = _write(str(tmp_path / "cfg.json"), content)
    with pytest.raises(DataListError, match=message) as err:
        read_site_data_config(path, "segmentation")
    assert path in str(err.value)


def test_a_malformed_entry_is_refused_even_when_another_is_asked_for(tmp_path):
    content = {"datasets": {**THREE["datasets"], "outcome_table": {"data_root": 3, "datalist": "t.csv"}}}
    path = _write(str(tmp_path / "cfg.json"), content)
    with pytest.raises(DataListError, match=r"'data_root' in datasets.outcome_table, got 3"):
        read_site_data_config(path, "segmentation")


def test_the_environment_template_may_name_the_data_set(tmp_path):
    _write(str(tmp_path / "site-2" / "segmentation.json"), {"data_root": "/brats/2", "datalist": "/brats/2/l.json"})
    _write(str(tmp_path / "site-2" / "outcome_image.json"), {"datasets": {"outcome_image": {"data_root": "/cxr/2", "datalist": "/cxr/2/t.csv"}}})
    env = {ENV_VAR: str(tmp_path / "{site_name}" / "{dataset}.json")}
    assert resolve_site_data_config("site-2", None, env, dataset="segmentation").data_root == "/brats/2"
    image = resolve_site_data_config("site-2", None, env, dataset="outcome_image")
    assert image.datalist == "/cxr/2/t.csv" and image.dataset == "outcome_image"
    with pytest.raises(DataListError, match=r"contains \{dataset\} and no data set was asked for"):
        resolve_site_data_config("site-2", None, env)
    with pytest.raises(DataListError, match=r"not found: .*site-2/outcome_table.json"):
        resolve_site_data_config("site-2", None, env, dataset="outcome_table")


def test_the_environment_may_name_a_keyed_file(tmp_path):
    _write(str(tmp_path / "site-1.json"), THREE)
    env = {ENV_VAR: str(tmp_path / "{site_name}.json")}
    assert resolve_site_data_config("site-1", None, env, dataset="outcome_table").data_root == "/data/heart"


@pytest.mark.parametrize("value", ["", "a b", "../x", "x/y", ".hidden", "..", "-x", 3, None, True, ["segmentation"], "ség"])
def test_bad_data_set_names_are_refused_naming_the_argument(value):
    with pytest.raises(ValueError, match=rf"dataset must be a non-empty string of letters, digits.*got {re.escape(repr(value))}"):
        check_dataset_name(value)


@pytest.mark.parametrize("value", ["segmentation", "brats-2021", "cxr.v2", "Site_7"])
def test_good_data_set_names_pass(value):
    assert check_dataset_name(value) == value


def test_the_keyed_content_an_install_writes_reads_back(tmp_path):
    content = keyed_data_config({"segmentation": ("/b", "/b/l.json"), "outcome_image": ("/c", "/c/t.csv")})
    path = _write(str(tmp_path / LOCAL_FILE_NAME), content)
    assert [(c.dataset, c.data_root, c.datalist) for c in read_site_datasets(path)] == [
        ("segmentation", "/b", "/b/l.json"),
        ("outcome_image", "/c", "/c/t.csv"),
    ]
    with pytest.raises(ValueError, match="data set name must be"):
        keyed_data_config({"a/b": ("/b", "/b/l.json")})
