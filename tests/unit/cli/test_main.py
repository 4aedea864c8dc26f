import json
import os
import shutil

import pytest

from medflare.cli.main import main
from medflare.cli.run_job import JobRunError, RunOptions, _with_rounds, run_job

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_data_brats_writes_sites(tmp_path, capsys):
    assert main(["data", "brats", "--out", str(tmp_path), "--sites", "2", "--cases", "4", "--size", "16"]) == 0
    out = capsys.readouterr().out
    for site in ("site-1", "site-2"):
        assert os.path.isfile(tmp_path / site / "datalist.json")
        assert f"{site}: {tmp_path / site / 'data_config.json'}" in out


def test_data_heart_writes_one_site_per_hospital(tmp_path, capsys, monkeypatch):
    assert main(["data", "heart", "--out", str(tmp_path), "--no-normalise"]) == 0
    assert f"site-4: {tmp_path / 'site-4' / 'data_config.json'}" in capsys.readouterr().out
    monkeypatch.setenv("MEDFLARE_HEART_DISEASE_CSV", str(tmp_path / "missing.csv"))
    assert main(["data", "heart", "--out", str(tmp_path)]) == 2
    assert "MEDFLARE_HEART_DISEASE_CSV names a missing file" in capsys.readouterr().err


def test_bad_arguments_exit_2_with_the_reason(tmp_path, capsys):
    assert main(["data", "brats", "--out", str(tmp_path), "--sites", "0"]) == 2
    assert "num_sites must be an int in [1, 64], got 0" in capsys.readouterr().err
    assert main(["run", str(tmp_path)]) == 2
    assert "is not a job folder (no meta.json)" in capsys.readouterr().err


def test_run_refuses_fewer_sites_than_the_job_needs(tmp_path):
    with pytest.raises(JobRunError, match="needs at least 2 sites"):
        run_job(RunOptions(job_dir=os.path.join(REPO, "jobs", "brats_fedavg"), sites=1, workspace=str(tmp_path)))


def test_run_with_data_dir_checks_every_site_has_a_configuration(tmp_path):
    with pytest.raises(JobRunError, match="no data configuration for site-1"):
        run_job(
            RunOptions(
                job_dir=os.path.join(REPO, "jobs", "brats_fedavg"),
                sites=2,
                workspace=str(tmp_path),
                data_dir=str(tmp_path / "nodata"),
            )
        )


def test_rounds_override_patches_a_copy_not_the_job(tmp_path):
    job = tmp_path / "job"
    shutil.copytree(os.path.join(REPO, "jobs", "brats_fedavg"), job)
    original = (job / "app" / "config" / "config_fed_server.json").read_text()
    copy_dir = _with_rounds(str(job), 3, str(tmp_path / "run"))
    with open(os.path.join(copy_dir, "app", "config", "config_fed_server.json")) as f:
        assert json.load(f)["num_rounds"] == 3
    assert (job / "app" / "config" / "config_fed_server.json").read_text() == original


def test_run_checks_the_job_first_and_runs_nothing_when_it_would_fail(tmp_path, capsys):
    import json
    import shutil

    job = tmp_path / "heart_typo"
    shutil.copytree(os.path.join(REPO, "jobs", "heart_disease_fedavg"), job)
    client = job / "app" / "config" / "config_fed_client.json"
    config = json.loads(client.read_text())
    config["executors"][0]["executor"]["args"]["learning_rat"] = 0.1
    client.write_text(json.dumps(config))
    workspace = tmp_path / "ws"
    assert main(["run", str(job), "--workspace", str(workspace)]) == 2
    err = capsys.readouterr().err
    assert "would fail at the server or a site (medflare job check); nothing was run" in err
    assert "learning_rat" in err and "did you mean 'learning_rate'" in err
    assert not (workspace / "data").exists()  # refused before any site data was generated
