"""What ``PocFederation`` writes into the server's ``local/resources.json`` before it starts: its
own job and snapshot storage, the heartbeat timeout, and how many jobs run at once."""

import json
import os

import pytest

from medflare.federation.poc_federation import FederationError, PocFederation

#: the part of NVFlare 2.9's POC ``resources.json.default`` these options touch
DEFAULT = {
    "format_version": 2,
    "servers": [{"heart_beat_timeout": 600}],
    "snapshot_persistor": {"args": {"storage": {"args": {"root_dir": "/tmp/nvflare/snapshot-storage"}}}},
    "components": [
        {"id": "job_scheduler", "path": "nvflare.app_common.job_schedulers.job_scheduler.DefaultJobScheduler", "args": {"max_jobs": 4}},
        {"id": "job_manager", "path": "nvflare.apis.impl.job_def_manager.SimpleJobDefManager", "args": {"uri_root": "/tmp/nvflare/jobs-storage"}},
    ],
}


def _server_resources(fed, content=DEFAULT):
    local = os.path.join(fed.workspace("server"), "local")
    os.makedirs(local)
    with open(os.path.join(local, "resources.json.default"), "w") as f:
        json.dump(content, f)
    fed._isolate_server_storage()
    with open(os.path.join(local, "resources.json")) as f:
        return json.load(f)


def test_the_server_runs_as_many_jobs_at_once_as_asked_in_storage_of_its_own(tmp_path):
    written = _server_resources(PocFederation(str(tmp_path), clients=3, heartbeat_timeout=30, max_jobs=5))
    (scheduler,) = [c for c in written["components"] if c["id"] == "job_scheduler"]
    assert scheduler["args"]["max_jobs"] == 5
    assert written["servers"][0]["heart_beat_timeout"] == 30
    text = json.dumps(written)
    assert "/tmp/nvflare/" not in text and str(tmp_path / "storage") in text


def test_without_options_nvflares_defaults_stay(tmp_path):
    written = _server_resources(PocFederation(str(tmp_path)))
    assert written["components"][0]["args"]["max_jobs"] == 4 and written["servers"][0]["heart_beat_timeout"] == 600


def test_a_server_without_a_job_scheduler_is_refused_by_name(tmp_path):
    content = dict(DEFAULT, components=[DEFAULT["components"][1]])
    with pytest.raises(FederationError, match="no job_scheduler component to set max_jobs on"):
        _server_resources(PocFederation(str(tmp_path), max_jobs=2), content)


@pytest.mark.parametrize("value", [0, -1, 2.0, True, "5"])
def test_bad_max_jobs_is_refused(tmp_path, value):
    with pytest.raises(ValueError, match=r"max_jobs must be an int >= 1 or None, got"):
        PocFederation(str(tmp_path), max_jobs=value)
