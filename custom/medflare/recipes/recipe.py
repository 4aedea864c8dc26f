"""medflare jobs as NVFlare 2.9 recipes: one object that runs on ``SimEnv``, ``PocEnv`` and
``ProdEnv`` and exports the same job folder the admin console submits.

NVFlare's Job API builds a job by instantiating its components and reading their constructor
arguments back from the objects' attributes. medflare's jobs are declared as data instead
(:class:`~medflare.recipes.job_definition.JobDefinition`: the exact ``config_fed_*.json`` the
sites build), so :class:`MedflareJob` is a ``FedJob`` whose export *is* that definition: every
environment that deploys a ``FedJob`` (``SimEnv`` through ``FedJob.simulator_run``, ``ProdEnv``
and ``PocEnv`` through ``FedJob.export_job`` and the FLARE API session) deploys exactly the
folder ``medflare job export`` writes and ``jobs/`` ships. Nothing is re-serialised on the way.

What each environment needs besides the job, :meth:`MedflareRecipe.process_env` does:

- ``SimEnv``: the simulator builds only allow-listed classes, so the simulation workspace's
  ``local/resources.json`` gets medflare's allow-list (NVFlare's ``SimEnv`` writes its default
  list, without medflare, when none is there); the simulated sites' data configuration
  (``MEDFLARE_DATA_CONFIG``) and privacy budget (``MEDFLARE_PRIVACY_BUDGET``, the research
  profile's) are set for the simulator process, as a real site sets them in its environment. The
  simulator applies no site privacy policy (``privacy.json``), so a job that relies on a scope
  (secure aggregation) is refused there.
- ``ProdEnv``: nothing: a provisioned site has medflare installed (``medflare site install``).
- ``PocEnv``: NVFlare's ``PocEnv`` provisions a fresh federation at every deploy, without
  medflare's allow-list or privacy scopes, so a medflare job would be refused at every site;
  :class:`~medflare.recipes.poc_env.MedflarePocEnv` provisions, installs medflare on every
  participant, starts and submits. A plain ``PocEnv`` is refused here with that explanation.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

from nvflare.job_config.api import FedJob
from nvflare.recipe.poc_env import PocEnv
from nvflare.recipe.sim_env import SimEnv
from nvflare.recipe.spec import ExecEnv, Recipe

from medflare.recipes.job_definition import JobDefinition

__all__ = ["MedflareJob", "MedflareRecipe", "RecipeEnvError", "aggregates_ciphertexts", "prepare_simulation", "uses_site_scope"]


class RecipeEnvError(RuntimeError):
    """The recipe cannot run in the environment it was given."""


class MedflareJob(FedJob):
    """A ``FedJob`` whose exported folder is a :class:`JobDefinition`, unchanged.

    Components are not added through ``to()``: the definition already holds the configs the
    sites build; ``export_job`` and ``simulator_run`` write it.
    """

    def __init__(self, definition: JobDefinition):
        if not isinstance(definition, JobDefinition):
            raise TypeError(f"definition must be a JobDefinition, got {type(definition).__name__}")
        meta_props = {"scope": definition.scope} if definition.scope else None
        super().__init__(name=definition.name, min_clients=definition.min_clients, meta_props=meta_props)
        self.definition = definition

    def export_job(self, job_root: str) -> str:
        """Write the job folder ``job_root/<name>``; its path."""
        return self.definition.write(job_root)

    def simulator_run(
        self,
        workspace: str,
        n_clients: Optional[int] = None,
        clients: Optional[list] = None,
        threads: Optional[int] = None,
        gpu: Optional[str] = None,
        log_config: Optional[str] = None,
    ) -> int:
        """Run the job in NVFlare's simulator (the process ``FedJob.simulator_run`` starts);
        the simulator's exit status."""
        if not clients and not n_clients:
            raise ValueError("give the simulated clients: n_clients or clients")
        with tempfile.TemporaryDirectory(prefix="medflare-job-") as root:
            job_dir = self.export_job(root)
            command = [sys.executable, "-m", "nvflare.private.fed.app.simulator.simulator", job_dir, "-w", workspace]
            if clients:
                command += ["-c", ",".join(clients)]
            else:
                command += ["-n", str(n_clients)]
            command += ["-t", str(threads or n_clients or len(clients))]
            if gpu:
                command += ["-gpu", gpu]
            if log_config:
                command += ["-l", log_config]
            return subprocess.call(command)


def aggregates_ciphertexts(server_config: dict) -> bool:
    """Whether a server app config aggregates CKKS ciphertexts (medflare's ``EncryptedSumAggregator``)."""
    components = server_config.get("components", []) if isinstance(server_config, dict) else []
    return any(
        isinstance(c, dict) and str(c.get("path", "")).endswith("EncryptedSumAggregator")
        for c in (components if isinstance(components, list) else [])
    )


def uses_site_scope(definition: JobDefinition) -> bool:
    """Whether the job needs a site privacy scope to do what it says (a job asking for a scope;
    CKKS secure aggregation, whose encryption is the scope's last filter)."""
    return bool(definition.scope) or aggregates_ciphertexts(definition.server)


def prepare_simulation(workspace: str, site_data: Optional[str], budget_from: str = "research") -> dict:
    """Make a simulation workspace ready for a medflare job; returns the environment variables
    the simulator process needs (:data:`MEDFLARE_DATA_CONFIG`, :data:`MEDFLARE_PRIVACY_BUDGET`).

    Writes medflare's class allow-list into ``workspace/local/resources.json`` and a copy of the
    ``budget_from`` profile's privacy budget into ``workspace/local/`` (the simulator empties its
    workspace at start, all but ``local/`` and ``startup/``); removes the simulated sites'
    folders of an earlier run (a simulated site's ledger is not a hospital's).

    Args:
        workspace: the simulator workspace (``SimEnv``: ``workspace_root/<job name>``).
        site_data: path of every site's ``data_config.json``, with ``{site_name}`` for the site;
            None leaves ``MEDFLARE_DATA_CONFIG`` to the caller's environment.
        budget_from: the site profile whose budget the simulated sites get.
    """
    from medflare.data.site_data_config import ENV_VAR as DATA_ENV_VAR
    from medflare.privacy.site_budget import ENV_VAR as BUDGET_ENV_VAR
    from medflare.sites.class_allow_list import write_simulator_resources
    from medflare.sites.site_profiles import BUDGET_FILE, resolve_profile

    if os.path.exists(workspace) and not os.path.isdir(workspace):
        raise ValueError(f"the simulation workspace {workspace} is a file, not a folder")
    os.makedirs(workspace, exist_ok=True)
    for entry in os.listdir(workspace):
        if entry.startswith("site-") and os.path.isdir(os.path.join(workspace, entry)):
            shutil.rmtree(os.path.join(workspace, entry))
    write_simulator_resources(workspace)
    budget = os.path.join(workspace, "local", "simulated_" + BUDGET_FILE)
    shutil.copyfile(os.path.join(resolve_profile(budget_from).folder, BUDGET_FILE), budget)
    env = {BUDGET_ENV_VAR: budget}
    if site_data is not None:
        if "{site_name}" not in site_data:
            raise ValueError(f"site_data must name each site's data config with '{{site_name}}', got {site_data!r}")
        env[DATA_ENV_VAR] = os.path.abspath(site_data)
    return env


class MedflareRecipe(Recipe):
    """A medflare job as an NVFlare recipe.

    Example::

        from nvflare.recipe import SimEnv
        from medflare.recipes import BratsSegmentationRecipe

        recipe = BratsSegmentationRecipe(privacy="percentile", num_rounds=5,
                                         site_data="/data/brats/{site_name}/data_config.json")
        run = recipe.run(SimEnv(num_clients=3))
        print(run.get_result())          # the simulation workspace
        recipe.export("jobs_out")        # the folder `nvflare job submit -j` takes

    Args:
        definition: the job.
        site_data: for ``SimEnv``: each simulated site's ``data_config.json`` with
            ``{site_name}`` for the site name; None: ``MEDFLARE_DATA_CONFIG`` from the caller's
            environment. Real sites find their data through their own configuration.
    """

    def __init__(self, definition: JobDefinition, site_data: Optional[str] = None):
        super().__init__(MedflareJob(definition))
        self.definition = definition
        self.site_data = site_data

    def add_experiment_tracking(self, tracking_type: str, tracking_config: Optional[dict] = None) -> None:
        """NVFlare's ``add_experiment_tracking`` for a medflare job: the ``tracking_type``
        ("tensorboard" or "mlflow") receiver on the server, fed per site with what the sites
        released (:mod:`medflare.recipes.tracking`); TensorBoard writes ``tb_events/<site>/`` in
        the server's run folder."""
        from medflare.recipes.tracking import with_tracking

        self.definition = with_tracking(self.definition, tracking_type, tracking_config)
        self._job.definition = self.definition

    @classmethod
    def from_job_folder(cls, job_dir: str, site_data: Optional[str] = None) -> "MedflareRecipe":
        """The recipe of a job folder (a shipped one or an exported one)."""
        return cls(JobDefinition.from_folder(job_dir), site_data=site_data)

    def process_env(self, env: ExecEnv):
        if isinstance(env, SimEnv):
            self._prepare_simulation(env)
        elif isinstance(env, PocEnv) and not getattr(env, "installs_medflare", False):
            raise RecipeEnvError(
                f"job {self.name}: NVFlare's PocEnv provisions a fresh federation at every deploy, without "
                "medflare's class allow-list or privacy scopes, so every site would refuse the job; use "
                "medflare.recipes.MedflarePocEnv, which installs medflare on each participant before starting"
            )

    def _prepare_simulation(self, env: SimEnv) -> None:
        if uses_site_scope(self.definition):
            raise RecipeEnvError(
                f"job {self.name} relies on a site privacy scope ({self.definition.scope or 'secure aggregation'}); "
                "NVFlare's simulator applies no site policy, so its sites would release what the scope forbids or "
                "encrypt nothing. Run it on MedflarePocEnv or ProdEnv"
            )
        workspace = os.path.join(env.workspace_root, self.name)
        os.environ.update(prepare_simulation(workspace, self.site_data))
