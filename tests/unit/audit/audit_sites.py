"""FLARE client workspaces with an installed site profile, and small copies of the shipped jobs,
for the audit's tests."""

from __future__ import annotations

import json
import os
import shutil

from medflare.sites.site_install import install_site

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
JOBS = os.path.join(REPO, "jobs")

#: the LeNet-size CNN an inversion is known to beat the prior on
SMALL_CNN = {"path": "medflare.training.small_networks.SmallConvNet", "args": {"image_size": [32, 32]}, "config_type": "dict"}


def client_workspace(root, name: str, profile: str, data_config) -> str:
    """A provisioned-looking client workspace with ``profile`` installed by ``medflare site install``
    (``data_config``: one data set's path, or a list of ``[NAME=]PATH``: a site holding several)."""
    workspace = os.path.join(str(root), name)
    os.makedirs(os.path.join(workspace, "startup"), exist_ok=True)
    with open(os.path.join(workspace, "startup", "fed_client.json"), "w") as f:
        f.write("{}")
    install_site(workspace, profile=profile, data=data_config)
    return workspace


def job_copy(root, job: str, name: str, **executor_args) -> str:
    """``jobs/<job>`` copied to ``root/name`` with executor arguments replaced (``model_args``
    updates the network's arguments, in the client and the server config alike)."""
    folder = os.path.join(str(root), name)
    shutil.copytree(os.path.join(JOBS, job), folder)
    client_path = os.path.join(folder, "app", "config", "config_fed_client.json")
    with open(client_path) as f:
        client = json.load(f)
    args = client["executors"][0]["executor"]["args"]
    model_args = executor_args.pop("model_args", None)
    if model_args:
        args["model"]["args"].update(model_args)
    args.update(executor_args)
    with open(client_path, "w") as f:
        json.dump(client, f, indent=1)
    server_path = os.path.join(folder, "app", "config", "config_fed_server.json")
    with open(server_path) as f:
        server = json.load(f)
    if "model_args" in server and model_args:
        server["model_args"].update(model_args)
    with open(server_path, "w") as f:
        json.dump(server, f, indent=1)
    return folder


def small_cnn_job(root, name: str = "cxr_small_cnn") -> str:
    """The CXR job with a small CNN, plain SGD, no dropout, one epoch: where the attack must work."""
    return job_copy(
        root, "cxr_emr_fedavg", name,
        model_args={"image_network": SMALL_CNN, "image_features": 16, "dropout": 0.0},
        image_size=[32, 32], optimizer="sgd", learning_rate=0.1, local_model="last_round", local_epochs=1,
    )
