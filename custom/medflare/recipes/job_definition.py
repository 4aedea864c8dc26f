"""One job as data: the ``meta.json`` and the two app configs NVFlare reads.

A :class:`JobDefinition` is what every medflare recipe builds and what every way of running
a job consumes: :meth:`JobDefinition.write` writes the job folder that ``nvflare job submit``,
the admin console's ``submit_job`` and ``nvflare simulator`` take, and
:class:`medflare.recipes.recipe.MedflareJob` hands the same folder to NVFlare's Job API
environments (``SimEnv``, ``PocEnv``, ``ProdEnv``). The shipped ``jobs/`` folders are written
by :func:`medflare.recipes.shipped_jobs.export_shipped_jobs` from the study definitions, and a test
regenerates them and compares, so a folder cannot drift from its definition.

Every medflare job has one app, ``app``, deployed to every site and the server (``@ALL``).
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["JobDefinition", "JobDefinitionError", "APP_NAME", "dump_json"]

#: the one app of a medflare job, deployed to ``@ALL``
APP_NAME = "app"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class JobDefinitionError(ValueError):
    """A job definition or a job folder that NVFlare would not accept."""


def dump_json(obj) -> str:
    """The one JSON layout of exported job files: two-space indent, a closing newline; NaN and
    infinity are refused (they are not JSON)."""
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"


@dataclass(frozen=True)
class JobDefinition:
    """A medflare job: its name, how many sites it needs, the privacy scope it asks the sites
    for, and the server and client app configs (``config_fed_server.json``,
    ``config_fed_client.json``, ``format_version`` 2).

    Args:
        name: the job's name (``meta.json`` ``name``, the exported folder's name).
        min_clients: sites that must take part (``meta.json`` ``min_clients``).
        server: the server app config.
        client: the client app config.
        scope: the site privacy scope the job asks for (``meta.json`` ``scope``); ``None``: the
            site's default scope.

    Raises:
        JobDefinitionError: a name NVFlare's job store would refuse, ``min_clients`` not a
            positive int, or a config that is not a ``format_version`` 2 dict.
    """

    name: str
    min_clients: int
    server: dict = field(repr=False)
    client: dict = field(repr=False)
    scope: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise JobDefinitionError(
                f"name must be 1-64 letters, digits, '_' or '-' starting with a letter or digit, got {self.name!r}"
            )
        if isinstance(self.min_clients, bool) or not isinstance(self.min_clients, int) or self.min_clients < 1:
            raise JobDefinitionError(f"min_clients must be a positive int, got {self.min_clients!r}")
        for which in ("server", "client"):
            config = getattr(self, which)
            if not isinstance(config, dict) or config.get("format_version") != 2:
                raise JobDefinitionError(f"{which} must be an app config dict with format_version 2, got {config!r:.80}")
        if self.scope is not None and (not isinstance(self.scope, str) or not _NAME.match(self.scope)):
            raise JobDefinitionError(f"scope must be a privacy scope name or None, got {self.scope!r}")
        for which in ("server", "client"):
            try:
                dump_json(getattr(self, which))
            except (TypeError, ValueError) as e:
                raise JobDefinitionError(f"job {self.name}: the {which} config is not JSON ({e})") from None

    @property
    def meta(self) -> dict:
        """``meta.json``."""
        meta = {
            "name": self.name,
            "resource_spec": {},
            "min_clients": self.min_clients,
            "mandatory_clients": [],
            "deploy_map": {APP_NAME: ["@ALL"]},
        }
        if self.scope is not None:
            meta["scope"] = self.scope
        return meta

    def files(self) -> dict[str, str]:
        """The job folder's files, by path relative to the folder, as they are written."""
        config = os.path.join(APP_NAME, "config")
        return {
            "meta.json": dump_json(self.meta),
            os.path.join(config, "config_fed_server.json"): dump_json(self.server),
            os.path.join(config, "config_fed_client.json"): dump_json(self.client),
        }

    def write(self, job_root: str) -> str:
        """Write the job folder ``job_root/<name>`` (replacing its config files); its path."""
        job_dir = os.path.join(job_root, self.name)
        for rel, text in self.files().items():
            path = os.path.join(job_dir, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
        return job_dir

    def with_server(self, **variables) -> "JobDefinition":
        """A copy with top-level server variables (e.g. ``num_rounds``) set."""
        server = copy.deepcopy(self.server)
        server.update(variables)
        return JobDefinition(self.name, self.min_clients, server, copy.deepcopy(self.client), self.scope)

    @classmethod
    def from_folder(cls, job_dir: str) -> "JobDefinition":
        """Read a medflare-shaped job folder (one app deployed to ``@ALL``).

        Raises:
            JobDefinitionError: naming the file: missing, not JSON, or not that shape.
        """
        meta = _read(os.path.join(job_dir, "meta.json"))
        deploy_map = meta.get("deploy_map")
        if deploy_map != {APP_NAME: ["@ALL"]}:
            raise JobDefinitionError(
                f"{os.path.join(job_dir, 'meta.json')}: deploy_map must be {{'app': ['@ALL']}} (one app for the server "
                f"and every site), got {deploy_map!r}"
            )
        config = os.path.join(job_dir, APP_NAME, "config")
        return cls(
            name=meta.get("name") or os.path.basename(os.path.normpath(job_dir)),
            min_clients=meta.get("min_clients", 1),
            server=_read(os.path.join(config, "config_fed_server.json")),
            client=_read(os.path.join(config, "config_fed_client.json")),
            scope=meta.get("scope"),
        )


def _read(path: str) -> dict:
    from medflare.data.brats_layout import read_json_object
    from medflare.data.data_errors import DataListError

    try:
        return read_json_object(path, "job file")
    except DataListError as e:
        raise JobDefinitionError(str(e)) from None
