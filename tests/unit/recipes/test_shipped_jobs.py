"""Every folder in ``jobs/`` is exactly what its study definition exports, and every folder has one.

A hand edit of a job folder, or a study definition changed without re-exporting, fails here;
the fix is ``python -m medflare.recipes.shipped_jobs`` (after changing the definition).
"""

import os

import pytest

from medflare.recipes.job_definition import APP_NAME
from medflare.recipes.shipped_jobs import SHIPPED_JOBS, export_shipped_jobs, main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
JOBS = os.path.join(REPO, "jobs")
_REEXPORT = "change the definition in custom/medflare/recipes/ and run python -m medflare.recipes.shipped_jobs"


def _files_under(folder):
    return sorted(
        os.path.relpath(os.path.join(parent, name), folder) for parent, _, names in os.walk(folder) for name in names
    )


def test_every_job_folder_has_a_definition_and_every_definition_a_folder():
    folders = {name for name in os.listdir(JOBS) if os.path.isdir(os.path.join(JOBS, name))}
    assert folders == set(SHIPPED_JOBS), (
        f"job folders without a definition: {sorted(folders - set(SHIPPED_JOBS))}; "
        f"definitions without a folder: {sorted(set(SHIPPED_JOBS) - folders)}"
    )


@pytest.mark.parametrize("name", sorted(SHIPPED_JOBS))
def test_shipped_folder_is_byte_identical_to_its_export(name, tmp_path):
    definition = SHIPPED_JOBS[name]()
    assert definition.name == name
    exported = definition.write(str(tmp_path))
    shipped = os.path.join(JOBS, name)
    assert _files_under(shipped) == _files_under(exported), f"jobs/{name} holds other files than its export: {_REEXPORT}"
    for rel in _files_under(exported):
        with open(os.path.join(exported, rel), "rb") as f:
            expected = f.read()
        with open(os.path.join(shipped, rel), "rb") as f:
            assert f.read() == expected, f"jobs/{name}/{rel} differs from its definition's export: {_REEXPORT}"


def test_every_shipped_job_deploys_its_one_app_to_all_sites():
    for name, build in SHIPPED_JOBS.items():
        meta = build().meta
        assert meta["deploy_map"] == {APP_NAME: ["@ALL"]}, name
        workflows = build().server["workflows"]
        assert workflows[0]["args"]["min_clients"] == meta["min_clients"], name


def test_export_writes_every_job_under_the_root(tmp_path):
    written = export_shipped_jobs(str(tmp_path))
    assert written == [os.path.join(str(tmp_path), name) for name in SHIPPED_JOBS]
    assert sorted(os.listdir(tmp_path)) == sorted(SHIPPED_JOBS)


def test_main_exports_to_the_given_root_and_refuses_bad_usage(tmp_path, capsys):
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [os.path.join(str(tmp_path), name) for name in SHIPPED_JOBS]
    assert main(["a", "b"]) == 2
    assert main(["--help"]) == 2
    assert "usage: python -m medflare.recipes.shipped_jobs [JOB_ROOT]" in capsys.readouterr().err
