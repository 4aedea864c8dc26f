"""A real NVFlare federation on this machine: POC mode on loopback, driven through the FLARE API.

``nvflare poc prepare`` provisions a server, N clients and admin users with certificates; each
participant is then started with its own ``startup/start.sh``, exactly as on a hospital's
machine, and jobs go in through :mod:`nvflare.fuel.flare_api.flare_api`, the path the admin
console's ``submit_job`` takes. Nothing is mocked.

Every participant is started in its own session (``setsid``); :meth:`PocFederation.kill`
takes down that session and every descendant (NVFlare starts job processes in sessions of
their own), so one site's watchdog (``sub_start.sh``), client and job processes all go at
once, as in a machine crash; :meth:`PocFederation.stop` does that for all of
them, and is what the context manager calls on exit.

``nvflare poc prepare`` writes ``~/.nvflare/config.conf``; the federation runs it with its own
``HOME`` under ``root`` so a user's configuration is never touched.

Example::

    with PocFederation("/tmp/fed", clients=2) as fed:
        fed.prepare()
        fed.install_server()
        for site in fed.sites:
            fed.install_site(site, "research", f"/data/{site}/data_config.json")
        fed.start()
        job_id = fed.submit("jobs/brats_fedavg")
        meta = fed.wait(job_id, timeout=900)
        fed.download(job_id, "/tmp/results")
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Optional

__all__ = ["PocFederation", "FederationError", "ADMIN_USER", "FINISHED_PREFIX"]

ADMIN_USER = "admin@nvidia.com"
FINISHED_PREFIX = "FINISHED"
SERVER_PORT = 8002


class FederationError(RuntimeError):
    """The federation could not be prepared, started or driven as asked."""


def _process_table() -> dict[int, tuple[int, int]]:
    """``{pid: (ppid, session id)}`` of every live, non-zombie process (read from ``/proc``)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # fields after the ")" closing the command name: state ppid pgrp session ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 3 and fields[0] != "Z":
            table[int(entry)] = (int(fields[1]), int(fields[3]))
    return table


def _process_tree(sid: int) -> list[int]:
    """Every live process of session ``sid`` and all their descendants. NVFlare starts each
    job process in a session of its own, so the session alone would miss them."""
    table = _process_table()
    found = {pid for pid, (_, session) in table.items() if session == sid}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return sorted(found)


def _alive(pids) -> list[int]:
    table = _process_table()
    return [pid for pid in pids if pid in table]


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class PocFederation:
    """A POC federation under ``root``: ``root/poc`` (NVFlare's POC workspace), ``root/home``.

    Args:
        root: folder for everything the federation writes.
        clients: number of client sites (``site-1`` ... ``site-N``), at least 1.
        env: extra environment for every participant (e.g. NVFlare config variables such as
            ``NVFLARE_DEAD_CLIENT_GRACE_PERIOD``).
        heartbeat_timeout: seconds without a heartbeat after which the server drops a client
            (NVFlare's default, 600 s, when None).
        max_jobs: jobs the server runs at once (its job scheduler's ``max_jobs``; NVFlare's POC
            default, 4, when None). Jobs beyond it wait in ``SUBMITTED`` for a free slot.
        he: provision CKKS keys for homomorphic encryption (``nvflare poc prepare -he``: NVFlare's
            ``HEBuilder`` writes ``server_context.tenseal``, without the secret key, and
            ``client_context.tenseal`` into the startup kits), for the HE jobs.
        log: where progress lines go (default: nowhere).
    """

    def __init__(
        self,
        root: str,
        clients: int = 2,
        env: Optional[dict] = None,
        heartbeat_timeout: Optional[float] = None,
        max_jobs: Optional[int] = None,
        he: bool = False,
        log: Callable[[str], None] = lambda m: None,
    ):
        if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
            raise ValueError(f"clients must be an int >= 1, got {clients!r}")
        if max_jobs is not None and (isinstance(max_jobs, bool) or not isinstance(max_jobs, int) or max_jobs < 1):
            raise ValueError(f"max_jobs must be an int >= 1 or None, got {max_jobs!r}")
        if not isinstance(he, bool):
            raise TypeError(f"he must be true or false, got {he!r}")
        self.max_jobs = max_jobs
        self.he = he
        self.root = os.path.abspath(root)
        self.clients = clients
        self.extra_env = dict(env or {})
        self.heartbeat_timeout = heartbeat_timeout
        self.log = log
        self.poc_workspace = os.path.join(self.root, "poc")
        self.home = os.path.join(self.root, "home")
        self.sites = [f"site-{i}" for i in range(1, clients + 1)]
        self._sessions: dict[str, int] = {}  # participant -> session id
        self._flare_session = None

    # ---- layout -------------------------------------------------------------------------
    @property
    def project_dir(self) -> str:
        return os.path.join(self.poc_workspace, "example_project", "prod_00")

    def workspace(self, participant: str) -> str:
        """The workspace folder of ``server``, ``site-N`` or an admin user."""
        return os.path.join(self.project_dir, participant)

    @property
    def admin_dir(self) -> str:
        return self.workspace(ADMIN_USER)

    def _env(self, participant: str) -> dict:
        env = dict(os.environ)
        env["NVFLARE_POC_WORKSPACE"] = self.poc_workspace
        # the participants run `python3` from PATH: make it this interpreter
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        if participant != "server" and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.clients))
        env.update(self.extra_env)
        return env

    # ---- set-up -------------------------------------------------------------------------
    def prepare(self) -> None:
        """``nvflare poc prepare -n N`` (with ``-he`` when asked) into ``root/poc`` (replacing an earlier one)."""
        os.makedirs(self.home, exist_ok=True)
        cmd = [sys.executable, "-m", "nvflare.cli", "poc", "prepare", "-n", str(self.clients), "--force"]
        if self.he:
            cmd.append("-he")
        env = self._env("server")
        env["HOME"] = self.home  # prepare writes ~/.nvflare/config.conf: not the user's
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if result.returncode != 0 or not os.path.isdir(self.admin_dir):
            raise FederationError(f"nvflare poc prepare failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        self._isolate_server_storage()
        self.log(f"prepared POC federation in {self.poc_workspace}: server, {', '.join(self.sites)}")

    def _isolate_server_storage(self) -> None:
        """Point the server's job store and snapshot store into ``root/storage``: NVFlare's
        defaults (``/tmp/nvflare/...``) are shared by every POC federation on the machine, so
        one would see, and might resume, another's jobs."""
        local = os.path.join(self.workspace("server"), "local")
        source = os.path.join(local, "resources.json")
        if not os.path.isfile(source):
            source = os.path.join(local, "resources.json.default")
        with open(source) as f:
            text = f.read()
        storage = os.path.join(self.root, "storage")
        text = text.replace('"/tmp/nvflare/jobs-storage"', json.dumps(os.path.join(storage, "jobs")))
        text = text.replace('"/tmp/nvflare/snapshot-storage"', json.dumps(os.path.join(storage, "snapshots")))
        resources = json.loads(text)
        if self.heartbeat_timeout is not None:
            for server in resources.get("servers", []):
                server["heart_beat_timeout"] = self.heartbeat_timeout
        if self.max_jobs is not None:
            schedulers = [c for c in resources.get("components", []) if c.get("id") == "job_scheduler"]
            if not schedulers:
                raise FederationError(f"{source} has no job_scheduler component to set max_jobs on")
            for scheduler in schedulers:
                scheduler.setdefault("args", {})["max_jobs"] = self.max_jobs
        with open(os.path.join(local, "resources.json"), "w") as f:
            json.dump(resources, f, indent=2)

    def install_server(self) -> None:
        """Install medflare's class allow-list into the server's workspace."""
        from medflare.sites.site_install import install_site

        install_site(self.workspace("server"))

    def install_site(self, site: str, profile: str, data: str | list[str] | dict[str, str], **kwargs) -> None:
        """``medflare site install`` for one client (see :mod:`medflare.sites.site_install`).

        ``data`` is passed through as :func:`~medflare.sites.site_install.plan_install` takes it:
        one ``"[NAME=]PATH"`` (a data configuration, datalist or outcome table), a list of them
        (``--data`` repeated: a site holding several data sets) or a dict ``{NAME: PATH}``; a
        NAME defaults to the kind detected (``segmentation``, ``outcome_image``, ``outcome_table``).
        """
        from medflare.sites.site_install import install_site

        install_site(self.workspace(site), profile, data, **kwargs)

    # ---- processes ----------------------------------------------------------------------
    def start_participant(self, participant: str) -> None:
        """Run ``<participant>/startup/start.sh`` in a session of its own."""
        if self.running(participant):
            raise FederationError(f"{participant} is already running")
        script = os.path.join(self.workspace(participant), "startup", "start.sh")
        if not os.path.isfile(script):
            raise FederationError(f"no start script: {script}")
        log_path = os.path.join(self.root, f"{participant}.console.log")
        with open(log_path, "a") as out:
            proc = subprocess.Popen(
                ["bash", script], cwd=self.workspace(participant), env=self._env(participant),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self._sessions[participant] = proc.pid
        proc.wait(timeout=60)  # start.sh puts sub_start.sh in the background and returns
        self.log(f"started {participant}")

    def kill(self, participant: str, sig: int = signal.SIGKILL, timeout: float = 30.0) -> list[int]:
        """Send ``sig`` to every process of ``participant`` and wait until they are gone.

        Returns:
            The PIDs that were signalled.
        """
        sid = self._sessions.get(participant)
        if sid is None:
            return []
        pids = _process_tree(sid)
        self._signal(pids, sig)
        deadline = time.time() + timeout
        while _alive(pids) and time.time() < deadline:
            time.sleep(0.2)
        left = _alive(pids)
        if left and sig != signal.SIGKILL:
            self._signal(left, signal.SIGKILL)
            deadline = time.time() + timeout
            while _alive(left) and time.time() < deadline:
                time.sleep(0.2)
            left = _alive(left)
        if left:
            raise FederationError(f"{participant}: processes {left} survive SIGKILL")
        for name in ("pid.fl", "daemon_pid.fl", "shutdown.fl", "restart.fl"):
            path = os.path.join(self.workspace(participant), name)
            if os.path.exists(path):
                os.remove(path)
        del self._sessions[participant]
        self.log(f"killed {participant} ({len(pids)} processes, signal {sig})")
        return pids

    @staticmethod
    def _signal(pids, sig) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def running(self, participant: str) -> bool:
        sid = self._sessions.get(participant)
        return bool(sid and _process_tree(sid))

    def start(self, timeout: float = 180.0) -> None:
        """Start the server, then every client, and wait until all clients are connected."""
        if _port_open(SERVER_PORT):
            raise FederationError(f"port {SERVER_PORT} on localhost is already in use: is another FLARE server running?")
        self.start_participant("server")
        deadline = time.time() + timeout
        while not _port_open(SERVER_PORT):
            if time.time() > deadline or not self.running("server"):
                raise FederationError(f"the server did not open port {SERVER_PORT}; see {self.root}/server.console.log")
            time.sleep(0.5)
        for site in self.sites:
            self.start_participant(site)
        self.wait_for_clients(self.sites, timeout=max(10.0, deadline - time.time()))

    def registrations(self, site: str) -> int:
        """How often ``site``'s client has registered with the server (from its ``log.txt``)."""
        path = os.path.join(self.workspace(site), "log.txt")
        if not os.path.isfile(path):
            return 0
        with open(path, errors="replace") as f:
            return sum(1 for line in f if "Successfully registered client:" in line)

    def restart_client(self, site: str, timeout: float = 120.0) -> None:
        """Kill ``site`` hard, start it again, and wait until the new client has registered.

        Waiting on the admin's client list is not enough: the server keeps listing the dead
        client until its heartbeat times out, and a job submitted before the new client
        registered would be deployed to the dead one.
        """
        before = self.registrations(site)
        self.kill(site)
        self.start_participant(site)
        deadline = time.time() + timeout
        while self.registrations(site) <= before:
            if time.time() > deadline:
                raise FederationError(f"{site} did not register again within {timeout:.0f} s; see its log.txt")
            time.sleep(0.5)
        self.wait_for_clients([site], timeout=max(10.0, deadline - time.time()))
        self.log(f"restarted {site}")

    def connected_clients(self) -> list[str]:
        info = self.session().get_system_info()
        return sorted(c.name for c in info.client_info)

    def wait_for_clients(self, names, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                connected = self.connected_clients()
            except Exception:  # noqa: BLE001 - the admin port may not answer yet
                connected = []
            if set(names) <= set(connected):
                self.log(f"clients connected: {', '.join(connected)}")
                return
            if time.time() > deadline:
                raise FederationError(f"clients {sorted(set(names) - set(connected))} did not connect in {timeout:.0f} s")
            time.sleep(1.0)

    def stop(self) -> None:
        """End every process this federation started (SIGTERM, then SIGKILL after 10 s)."""
        if self._flare_session is not None:
            try:
                self._flare_session.close()
            except Exception:  # noqa: BLE001 - closing a dead session must not stop the clean-up
                pass
            self._flare_session = None
        for participant in list(self._sessions):
            self.kill(participant, signal.SIGTERM, timeout=10.0)
        self.log("federation stopped")

    def __enter__(self) -> "PocFederation":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- the admin's side ---------------------------------------------------------------
    def session(self):
        """A FLARE API session as ``admin@nvidia.com`` (opened once, then reused)."""
        if self._flare_session is None:
            from nvflare.fuel.flare_api.flare_api import new_secure_session

            self._flare_session = new_secure_session(ADMIN_USER, self.admin_dir, timeout=30.0)
        return self._flare_session

    def submit(self, job_dir: str) -> str:
        """Submit a job folder; returns the job id."""
        job_id = self.session().submit_job(os.path.abspath(job_dir))
        self.log(f"submitted {job_dir}: {job_id}")
        return job_id

    def job_meta(self, job_id: str) -> dict:
        return self.session().get_job_meta(job_id)

    def wait(self, job_id: str, timeout: float = 900.0, poll: float = 2.0, on_poll: Optional[Callable[[dict], None]] = None) -> dict:
        """Poll the job until its status starts with ``FINISHED``; returns its meta.

        Raises:
            FederationError: the job did not finish in ``timeout`` seconds (it is aborted).
        """
        deadline = time.time() + timeout
        while True:
            meta = self.job_meta(job_id)
            if on_poll is not None:
                on_poll(meta)
            if str(meta.get("status", "")).startswith(FINISHED_PREFIX):
                self.log(f"job {job_id}: {meta['status']}")
                return meta
            if time.time() > deadline:
                with contextlib.suppress(Exception):  # the error below says what matters
                    self.session().abort_job(job_id)
                raise FederationError(f"job {job_id} still {meta.get('status')} after {timeout:.0f} s; aborted")
            time.sleep(poll)

    def download(self, job_id: str, dest: str) -> str:
        """Download the job's result into ``dest``; returns the folder of that job's result."""
        os.makedirs(dest, exist_ok=True)
        path = self.session().download_job_result(job_id)
        target = os.path.join(os.path.abspath(dest), job_id)
        if os.path.abspath(path) != target:
            if os.path.exists(target):
                shutil.rmtree(target)
            shutil.move(path, target)
        return target
