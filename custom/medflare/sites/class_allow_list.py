"""The component classes a FLARE site must allow for medflare jobs to deploy.

NVFlare 2.9 builds only components whose dotted path is on the site's ``class_allow_list``
(in ``local/resources.json``); its default list holds NVFlare's own classes only. medflare's
jobs also need medflare's classes, the MONAI networks they name, and NVFlare's PyTorch
persistor. Entries are dotted-path prefixes.
"""

from __future__ import annotations

import json
import os

__all__ = ["MEDFLARE_CLASS_ALLOW_LIST", "site_class_allow_list", "write_simulator_resources"]

#: Prefixes medflare adds to NVFlare's default allow-list.
MEDFLARE_CLASS_ALLOW_LIST = (
    "medflare.",
    "monai.networks.nets.",
    "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",
    "nvflare.app_opt.he.",  # NVFlare's HE components (its default list lacks HECrossSiteModelEval)
)


def site_class_allow_list() -> list[str]:
    """NVFlare's default allow-list plus medflare's entries, without duplicates."""
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    return list(dict.fromkeys(list(DEFAULT_CLASS_ALLOW_LIST) + list(MEDFLARE_CLASS_ALLOW_LIST)))


def write_simulator_resources(sim_workspace: str) -> str:
    """Write ``<sim_workspace>/local/resources.json`` with the allow-list; the simulator copies
    ``local/`` into every simulated site and the server. Other keys already there are kept."""
    from nvflare.app_common.widgets.component_path_authorizer import CLASS_ALLOW_LIST

    local_dir = os.path.join(sim_workspace, "local")
    os.makedirs(local_dir, exist_ok=True)
    path = os.path.join(local_dir, "resources.json")
    resources = {"format_version": 2}
    if os.path.exists(path):
        with open(path) as f:
            resources = json.load(f)
    resources[CLASS_ALLOW_LIST] = site_class_allow_list()
    with open(path, "w") as f:
        json.dump(resources, f, indent=2)
    return path
