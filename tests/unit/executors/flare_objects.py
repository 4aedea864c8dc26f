"""NVFlare's real task objects, as a FLARE client hands them to an executor."""

import json
import os

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.workspace import Workspace
from nvflare.app_common.app_constant import AppConstants

from medflare.data.site_data_config import LOCAL_FILE_NAME


def site_context(tmp_path, site="site-1"):
    """An FLContext of client ``site`` with a workspace (``local/``, ``startup/``) under tmp_path."""
    root = tmp_path / site
    (root / "local").mkdir(parents=True, exist_ok=True)
    (root / "startup").mkdir(parents=True, exist_ok=True)
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=True)
    fl_ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, Workspace(str(root), site), private=True, sticky=True)
    return fl_ctx


def install_data(tmp_path, data_config, site="site-1"):
    """What a site admin does: point local/medflare_data.json at the site's data."""
    with open(data_config) as f:
        cfg = json.load(f)
    base = os.path.dirname(data_config)
    cfg = {k: os.path.join(base, v) for k, v in cfg.items() if k in ("data_root", "datalist")}
    path = tmp_path / site / "local" / LOCAL_FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))


def weights_task(weights, round_number=0):
    task = DXO(data_kind=DataKind.WEIGHTS, data=weights).to_shareable()
    task.set_header(AppConstants.CURRENT_ROUND, round_number)
    return task
