"""A POC federation with medflare installed on every participant, as a recipe environment.

NVFlare's ``PocEnv`` provisions a fresh federation at every ``deploy`` and starts it at once,
so a site never gets medflare's class allow-list, privacy scopes or budget and refuses every
medflare component. :class:`MedflarePocEnv` runs the same steps a site admin runs, in order:
``nvflare poc prepare`` (with ``-he`` for the CKKS jobs), ``medflare site install`` on the
server and each client (profile, data), the participants' own ``startup/start.sh``, and then
submits through NVFlare's ``ProdEnv`` pointed at the POC admin's startup kit: the FLARE API
session the admin console uses. Status, result and abort are ``ProdEnv``'s too. The federation
is :class:`medflare.federation.poc_federation.PocFederation` (loopback only, its own ``HOME``
and job store, every process killed by :meth:`MedflarePocEnv.stop`).
"""

from __future__ import annotations

from typing import Callable, Optional

from nvflare.job_config.api import FedJob
from nvflare.recipe.spec import ExecEnv

__all__ = ["MedflarePocEnv"]


class MedflarePocEnv(ExecEnv):
    """Args:
        root: folder for the federation (workspace, job store, results); replaced at deploy.
        num_clients: sites ``site-1`` ... ``site-N``.
        site_data: each site's data configuration with ``{site_name}`` for its name, e.g.
            ``/data/brats/{site_name}/data_config.json``.
        profile: the site profile installed at every client (``medflare site profiles``).
        he: provision CKKS keys (NVFlare's ``HEBuilder``) for the secure-aggregation jobs.
        env: extra environment variables for every participant.
        log: where progress lines go.
        federation: a started :class:`~medflare.federation.poc_federation.PocFederation`
            (sites already installed) to submit to instead; then ``root``, ``num_clients``,
            ``site_data``, ``profile`` and ``he`` are not used. :meth:`stop` stops it too.
    """

    #: what MedflareRecipe.process_env checks: this environment installs medflare on its sites
    installs_medflare = True

    def __init__(
        self,
        root: Optional[str] = None,
        num_clients: Optional[int] = None,
        site_data: Optional[str] = None,
        profile: str = "research",
        he: bool = False,
        env: Optional[dict] = None,
        log: Callable[[str], None] = lambda m: None,
        extra: Optional[dict] = None,
        federation=None,
    ):
        super().__init__(extra)
        from medflare.federation.poc_federation import PocFederation

        self._prod_env = None
        self.site_data = site_data
        self.profile = profile
        if federation is not None:
            if not isinstance(federation, PocFederation):
                raise TypeError(f"federation must be a started PocFederation, got {type(federation).__name__}")
            self.federation = federation
            self._prod_env = self._admin_env()
            return
        if not isinstance(root, str) or not root:
            raise ValueError(f"root must be the folder for the federation, got {root!r}")
        if not isinstance(site_data, str) or "{site_name}" not in site_data:
            raise ValueError(f"site_data must name each site's data config with '{{site_name}}', got {site_data!r}")
        if not isinstance(profile, str) or not profile:
            raise ValueError(f"profile must be a site profile name or folder, got {profile!r}")
        self.federation = PocFederation(root, clients=num_clients, env=env, he=he, log=log)

    def _admin_env(self):
        from nvflare.recipe.prod_env import ProdEnv

        from medflare.federation.poc_federation import ADMIN_USER

        return ProdEnv(startup_kit_location=self.federation.admin_dir, username=ADMIN_USER, login_timeout=30.0)

    def _started(self):
        if self._prod_env is None:
            fed = self.federation
            fed.prepare()
            fed.install_server()
            for site in fed.sites:
                fed.install_site(site, self.profile, self.site_data.replace("{site_name}", site))
            fed.start()
            self._prod_env = self._admin_env()
        return self._prod_env

    def deploy(self, job: FedJob) -> str:
        """Provision, install and start the federation (once), then submit ``job``; its id."""
        return self._started().deploy(job)

    def get_job_status(self, job_id: str) -> Optional[str]:
        return self._started().get_job_status(job_id)

    def abort_job(self, job_id: str) -> None:
        self._started().abort_job(job_id)

    def get_job_result(self, job_id: str, timeout: float = 0.0) -> Optional[str]:
        return self._started().get_job_result(job_id, timeout)

    def stop(self, clean_up: bool = False) -> None:
        """Stop every participant (and every process it started)."""
        self.federation.stop()
        self._prod_env = None
