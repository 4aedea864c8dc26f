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
    assert "is neither a job folder (no meta.json there) nor a shipped job's name (brats_fedavg" in capsys.readouterr().err


def test_version_names_medflare_and_what_it_runs_on(capsys):
    import medflare

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"medflare {medflare.__version__} (nvflare 2.9") and "opacus" in out


def test_job_list_and_export_write_the_shipped_jobs(tmp_path, capsys):
    assert main(["job", "list"]) == 0
    listed = capsys.readouterr().out
    assert "brats_percentile: brats_segmentation(privacy='percentile'), min_clients 2" in listed
    assert "heart_disease_he: heart_disease(privacy='he'), min_clients 4, scope secure_aggregation" in listed
    assert main(["job", "export", "brats_he", "cxr_emr_dpsgd", "--out", str(tmp_path)]) == 0
    for name in ("brats_he", "cxr_emr_dpsgd"):
        for rel in ("meta.json", "app/config/config_fed_server.json", "app/config/config_fed_client.json"):
            assert (tmp_path / name / rel).read_bytes() == open(os.path.join(REPO, "jobs", name, rel), "rb").read()
    assert main(["job", "export", "--all", "--out", str(tmp_path / "all")]) == 0
    assert len(os.listdir(tmp_path / "all")) == len(os.listdir(os.path.join(REPO, "jobs")))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["job", "export", "--out", "x"], "give shipped job names or --all"),
        (["job", "export", "brats_fedavg", "--all", "--out", "x"], "give shipped job names or --all"),
        (["job", "export", "brats_fedavgg", "--out", "x"], "unknown job(s) ['brats_fedavgg']; shipped jobs: brats_fedavg"),
        (["job", "simulator-workspace", "ws", "--data", "/d/site-1/data_config.json"], "must name each site's data config with '{site_name}'"),
    ],
)
def test_job_commands_refuse_bad_arguments(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_simulator_workspace_prepares_the_stock_simulator(tmp_path, capsys):
    ws = tmp_path / "ws"
    assert main(["job", "simulator-workspace", str(ws), "--data", str(tmp_path / "{site_name}" / "data_config.json")]) == 0
    out = capsys.readouterr().out
    assert f"export MEDFLARE_DATA_CONFIG={tmp_path / '{site_name}' / 'data_config.json'}" in out
    assert f"export MEDFLARE_PRIVACY_BUDGET={ws / 'local' / 'simulated_medflare_privacy_budget.json'}" in out
    assert "medflare." in json.loads((ws / "local" / "resources.json").read_text())["class_allow_list"]


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
