"""Paths of a site's datalist or table must stay inside the data root: ``..``, absolute paths
and symlinks that leave it are refused, naming the entry, what it resolves to and the root."""

from __future__ import annotations

import os
import re

import pytest

from medflare.data.brats_layout import DataListError
from medflare.data.data_root_paths import DataPathError, path_in_data_root


@pytest.fixture
def root(tmp_path):
    """``tmp_path/data`` holding ``sub/a.nii.gz``, with ``tmp_path/secret.txt`` beside it."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "a.nii.gz").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("not site data")
    return data


@pytest.mark.parametrize(
    "path",
    ["sub/a.nii.gz", "./sub/../sub/a.nii.gz", "sub//a.nii.gz", "not-yet-there.nii.gz"],
)
def test_paths_inside_the_root_are_normalised_and_kept(root, path):
    assert path_in_data_root(str(root), path, "datalist x") == os.path.normpath(os.path.join(str(root), path))


def test_an_absolute_path_inside_the_root_is_accepted(root):
    inside = str(root / "sub" / "a.nii.gz")
    assert path_in_data_root(str(root), inside, "datalist x") == inside


def test_a_root_reached_through_a_symlink_is_its_target(root, tmp_path):
    link = tmp_path / "data-link"
    link.symlink_to(root, target_is_directory=True)
    assert path_in_data_root(str(link), "sub/a.nii.gz", "datalist x") == str(link / "sub" / "a.nii.gz")


def test_a_symlink_inside_the_root_to_a_file_inside_is_accepted(root):
    (root / "alias.nii.gz").symlink_to(root / "sub" / "a.nii.gz")
    assert path_in_data_root(str(root), "alias.nii.gz", "datalist x") == str(root / "alias.nii.gz")


@pytest.mark.parametrize(
    "path, resolves_to",
    [
        ("../secret.txt", "{tmp}/secret.txt"),
        ("../../../../../../etc/passwd", "/etc/passwd"),
        ("sub/../../secret.txt", "{tmp}/secret.txt"),
        ("/etc/passwd", "/etc/passwd"),
        ("{tmp}/secret.txt", "{tmp}/secret.txt"),
        ("..", "{tmp}"),
        ("../data-other/a.nii.gz", "{tmp}/data-other/a.nii.gz"),  # a sibling whose name starts like the root's
    ],
)
def test_paths_leaving_the_root_are_refused(root, tmp_path, path, resolves_to):
    tmp = os.path.realpath(tmp_path)
    with pytest.raises(DataPathError) as raised:
        path_in_data_root(str(root), path.format(tmp=tmp), "datalist /x/list.json: training[3] image t1")
    text = str(raised.value)
    assert text.startswith(f"datalist /x/list.json: training[3] image t1: {path.format(tmp=tmp)!r} resolves to ")
    assert f"resolves to {resolves_to.format(tmp=tmp)}" in text
    assert f"outside the data root {os.path.realpath(root)}" in text
    assert isinstance(raised.value, DataListError)


@pytest.mark.parametrize("target", ["file", "folder"])
def test_a_symlink_escaping_the_root_is_refused(root, tmp_path, target):
    if target == "file":
        (root / "sub" / "b.nii.gz").symlink_to(tmp_path / "secret.txt")
        path = "sub/b.nii.gz"
    else:
        (root / "elsewhere").symlink_to(tmp_path, target_is_directory=True)
        path = "elsewhere/secret.txt"
    with pytest.raises(DataPathError, match=re.escape(f"resolves to {os.path.realpath(tmp_path / 'secret.txt')} (as {root / path})")):
        path_in_data_root(str(root), path, "datalist x")


@pytest.mark.parametrize("path", ["", "   ", None, 7, ["a"]])
def test_an_empty_or_non_string_path_is_refused(root, path):
    with pytest.raises(DataPathError, match=re.escape(f"datalist x: a path must be a non-empty string, got {path!r}")):
        path_in_data_root(str(root), path, "datalist x")
