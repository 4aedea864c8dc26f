import json
import os

import pytest

from medflare.data.brats_layout import DataListError
from medflare.data.site_data_config import (
    ENV_VAR,
    LOCAL_FILE_NAME,
    read_site_data_config,
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
