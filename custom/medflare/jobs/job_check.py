"""``medflare job check``: refuse a job before it is submitted, for what the server and a site would refuse.

A job that reaches the sites with a typo in a filter argument ends ``FINISHED:ABNORMAL`` with
the reason only in each site's log; one needing more clients than it names waits in
``SUBMITTED``; one whose releases exceed a site's budget is blocked near its end. This module
finds those before submission:

* every component of the job's client and server configs (nested ``{"path": ...}`` arguments
  included, variables resolved as NVFlare resolves them) is imported, checked against the
  site's class allow-list, its arguments checked against the class's signature (an unknown
  argument is named, with the closest real one: "did you mean"), and built as the FLARE
  client or server builds it (``ComponentBuilder``), so an out-of-range value is refused with
  the component's own message;
* with a site policy (``--profile`` or ``--site-workspace``): the job's ``meta.json`` scope must
  be one the site defines, and the site-level Gaussian releases the job's rounds make under that
  scope (the site's filters and the job's own, :math:`\\varepsilon` of ``rounds`` releases at
  noise multiplier :math:`z`, sampling rate 1) must fit the site's remaining budget; a DP-SGD
  ``target_epsilon`` must fit it too;
* ``min_clients`` (``meta.json`` and the workflows') must not exceed the sites a ``deploy_map``
  names, when it names them.

It reads and builds; it writes nothing and sends nothing.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from medflare.jobs.job_config import SECTIONS, ConfigBuilder, resolve_variables
from medflare.wire_contract import NUM_TRAIN_CASES

__all__ = ["JobCheck", "check_job"]


@dataclass
class JobCheck:
    """The result: ``problems`` (each naming the file and the component), and what was checked."""

    job: str
    problems: list = field(default_factory=list)
    checked: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _read(path: str, check: JobCheck) -> Optional[dict]:
    try:
        with open(path) as f:
            content = json.load(f)
    except FileNotFoundError:
        check.problems.append(f"{path}: missing")
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        check.problems.append(f"{path}: not readable JSON: {e}")
        return None
    if not isinstance(content, dict):
        check.problems.append(f"{path}: must be a JSON object")
        return None
    return content


def _resolved(path: str, check: JobCheck) -> Optional[dict]:
    config = _read(path, check)
    if config is None:
        return None
    try:
        resolve_variables(config, path)
    except Exception as e:  # noqa: BLE001 - NVFlare's own variable errors
        check.problems.append(f"{path}: {e}")
        return None
    return config


def _components(config: dict) -> list:
    """``(where, component dict)`` of every ``{"path": ...}`` that NVFlare builds, outermost first."""
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            if isinstance(node.get("path"), str) and node.get("config_type") != "dict":
                found.append((where, node))
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for n, value in enumerate(node):
                walk(value, f"{where}[{n}]")

    for section in SECTIONS:
        walk(config.get(section, []), section)
    return found


def _import(path: str):
    module_name, _, class_name = path.rpartition(".")
    module = importlib.import_module(module_name)
    return getattr(module, class_name), module


def _check_component(where: str, component: dict, allow_list: list, check: JobCheck) -> None:
    from medflare.sites.site_profiles import is_allowed

    path = component["path"]
    if not is_allowed(path, allow_list):
        check.problems.append(f"{where}: {path} is not on the sites' class allow-list; a provisioned site refuses to build it")
        return
    try:
        cls, module = _import(path)
    except (ImportError, ValueError) as e:
        check.problems.append(f"{where}: {path} cannot be imported: {e}")
        return
    except AttributeError:
        module_name, _, class_name = path.rpartition(".")
        names = [n for n in dir(importlib.import_module(module_name)) if not n.startswith("_")]
        close = difflib.get_close_matches(class_name, names, n=1)
        hint = f"; did you mean {module_name}.{close[0]}?" if close else ""
        check.problems.append(f"{where}: {module_name} has no {class_name}{hint}")
        return
    args = component.get("args", {}) or {}
    if not isinstance(args, dict):
        check.problems.append(f"{where}: {path}: args must be an object, got {args!r}")
        return
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        return
    parameters = signature.parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        known = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for name in args:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; it takes {known}"
                check.problems.append(f"{where}: {cls.__name__} has no argument {name!r}{hint}")


def _build(where: str, component: dict, check: JobCheck) -> None:
    try:
        ConfigBuilder().build_component(copy.deepcopy(component))
    except Exception as e:  # noqa: BLE001 - what the FLARE client or server would raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        check.problems.append(f"{where}: {component['path']} refuses its arguments: {message}")


def _site_policy(profile: Optional[str], site_workspace: Optional[str], check: JobCheck):
    """``(privacy policy, budget or None, epsilon spent, source)`` or ``None``."""
    if profile is None and site_workspace is None:
        return None
    if site_workspace is None:
        from medflare.sites.site_profiles import SiteProfileError, resolve_profile

        try:
            chosen = resolve_profile(profile)
        except SiteProfileError as e:
            check.problems.append(f"--profile {profile}: {e}")
            return None
        return chosen.privacy, chosen.budget, 0.0, f"profile {chosen.name}"
    from medflare.privacy.budget_ledger import LEDGER_FILE_NAME, LedgerError, PrivacyBudgetLedger
    from medflare.privacy.site_budget import load_site_budget

    local = os.path.join(site_workspace, "local")
    policy = _read(os.path.join(local, "privacy.json"), check)
    if policy is None:
        return None
    try:
        budget = load_site_budget(local)
    except LedgerError:
        budget = None
    spent = 0.0
    ledger = os.path.join(local, LEDGER_FILE_NAME)
    if budget is not None and os.path.isfile(ledger):
        try:
            records = PrivacyBudgetLedger.read_records(ledger)
            spent = PrivacyBudgetLedger.epsilon_of(records, budget.delta, budget.accountant)
        except LedgerError as e:
            check.problems.append(f"{ledger}: the site's ledger cannot be read ({e}): every DP release would be blocked")
    return policy, budget, spent, f"site workspace {site_workspace}"


def _gaussian_z(filters: list) -> list:
    return [
        float(f["args"]["noise_multiplier"])
        for f in filters
        if isinstance(f, dict) and str(f.get("path", "")).endswith("GaussianPrivacyFilter") and "noise_multiplier" in (f.get("args") or {})
    ]


def _check_budget(meta: dict, client: dict, rounds: Optional[int], site, check: JobCheck) -> None:
    from medflare.privacy.accounting import epsilon_of_history

    policy, budget, spent, source = site
    scopes = _scopes(policy)
    scope_name = _scope_name(meta, policy)
    if meta.get("scope") is not None and meta["scope"] not in scopes:
        check.problems.append(
            f"meta.json: scope {meta['scope']!r} is not defined by the {source} ({sorted(scopes)}); the site refuses "
            f"the job at deployment (\"privacy scope ... is not allowed\")"
        )
        return
    scope = scopes.get(scope_name, {})
    check.checked.append(f"scope {scope_name!r} of the {source}")
    if _site_dp_sgd_requirement(scope) is not None:
        _check_dp_sgd_network(client, scope_name, source, check)
    if budget is None or rounds is None:
        return
    site_filters = scope.get("task_result_filters", []) or []
    job_filters = [f for entry in client.get("task_result_filters", []) or [] if "train" in (entry.get("tasks") or []) for f in entry.get("filters", [])]
    remaining = budget.max_epsilon - spent
    for z in _gaussian_z(site_filters) + _gaussian_z(job_filters):
        epsilon = epsilon_of_history([(z, 1.0, rounds)], budget.delta, budget.accountant)
        if epsilon > remaining:
            fits = next((r for r in range(rounds, 0, -1) if epsilon_of_history([(z, 1.0, r)], budget.delta, budget.accountant) <= remaining), 0)
            check.problems.append(
                f"config_fed_server.json num_rounds {rounds}: under scope {scope_name!r} of the {source} each round is a "
                f"site-level Gaussian release (z {z:g}); {rounds} of them spend epsilon {epsilon:.2f} at delta "
                f"{budget.delta:g}, the site has {remaining:.2f} left (cap {budget.max_epsilon:g}, spent {spent:.2f}): its "
                f"results would be blocked after round {fits}; use at most {fits} rounds, or a larger noise multiplier"
            )
    for executor in client.get("executors", []) or []:
        dp = ((executor.get("executor") or {}).get("args") or {}).get("dp_sgd") or {}
        target = dp.get("target_epsilon") if isinstance(dp, dict) else None
        if isinstance(target, (int, float)) and not isinstance(target, bool) and target > remaining:
            check.problems.append(
                f"config_fed_client.json dp_sgd.target_epsilon {target:g}: the {source} has epsilon {remaining:.2f} left "
                f"(cap {budget.max_epsilon:g}); its patients' releases would be blocked before the run ends"
            )


def _check_dp_sgd_network(client: dict, scope_name: str, source: str, check: JobCheck) -> None:
    """A scope requiring patient-level DP-SGD refuses a network DP-SGD cannot train, at round 0."""
    from medflare.training.dp_networks import check_dp_compatible
    from medflare.training.model_spec import build_model

    for executor in client.get("executors", []) or []:
        model = ((executor.get("executor") or {}).get("args") or {}).get("model")
        if not isinstance(model, dict):
            continue
        try:
            check_dp_compatible(build_model(copy.deepcopy(model)))
        except ValueError as e:
            check.problems.append(
                f"config_fed_client.json executor model: scope {scope_name!r} of the {source} requires patient-level "
                f"DP-SGD and the site would refuse every train task: {str(e).splitlines()[0][:400]}; submit the job's "
                f"DP-SGD variant (jobs/*_dpsgd) or name a scope of the site without DP-SGD in meta.json"
            )
        except Exception:  # noqa: BLE001 - a model that cannot be built is reported by its component check
            pass


def _check_clients(meta: dict, server: Optional[dict], check: JobCheck) -> None:
    deploy_map = meta.get("deploy_map")
    if not isinstance(deploy_map, dict):
        return
    named = set()
    for sites in deploy_map.values():
        if not isinstance(sites, list) or any(s in ("@ALL", "@all") for s in sites):
            return
        named.update(s for s in sites if s != "server")
    wanted = [("meta.json min_clients", meta.get("min_clients"))]
    for workflow in (server or {}).get("workflows", []) or []:
        wanted.append((f"config_fed_server.json workflow {workflow.get('id')} min_clients", (workflow.get("args") or {}).get("min_clients")))
    for where, value in wanted:
        if isinstance(value, int) and not isinstance(value, bool) and value > len(named):
            check.problems.append(
                f"{where} {value}: the deploy_map names only {len(named)} client(s) ({sorted(named)}); the job would wait in "
                f"SUBMITTED for clients that never get it"
            )


def check_job(job_dir: str, profile: Optional[str] = None, site_workspace: Optional[str] = None) -> JobCheck:
    """Check ``job_dir`` as the server and the sites would, and against one site's policy.

    Args:
        job_dir: the job folder (``meta.json``, ``app/config/config_fed_{client,server}.json``).
        profile: a site profile name or folder (see ``medflare site profiles``), or
        site_workspace: a FLARE client workspace with an installed ``local/privacy.json``.

    Returns:
        :class:`JobCheck`; ``ok`` when nothing was found.
    """
    from medflare.sites.class_allow_list import site_class_allow_list

    check = JobCheck(job_dir)
    if profile is not None and site_workspace is not None:
        raise ValueError("give --profile or --site-workspace, not both")
    if not os.path.isdir(job_dir):
        check.problems.append(f"{job_dir}: not a job folder")
        return check
    meta = _read(os.path.join(job_dir, "meta.json"), check)
    if meta is None:
        return check
    apps = list((meta.get("deploy_map") or {}).keys()) or ["app"]
    allow_list = site_class_allow_list()
    client = server = None
    for app in apps:
        for role in ("client", "server"):
            path = os.path.join(job_dir, app, "config", f"config_fed_{role}.json")
            if not os.path.isfile(path):
                continue
            config = _resolved(path, check)
            if config is None:
                continue
            if role == "client":
                client = config
            else:
                server = config
            for where, component in _components(config):
                _check_component(f"{app}/config/config_fed_{role}.json {where}", component, allow_list, check)
            before = len(check.problems)
            if before == 0:
                for where, component in _components(config):
                    if where.count(".args.") == 0:  # top level: nested ones are built with it
                        _build(f"{app}/config/config_fed_{role}.json {where}", component, check)
            check.checked.append(f"{app}/config/config_fed_{role}.json")
    if client is None:
        check.problems.append(f"{job_dir}: no app/config/config_fed_client.json")
    rounds = None
    for workflow in (server or {}).get("workflows", []) or []:
        value = (workflow.get("args") or {}).get("num_rounds")
        if isinstance(value, int) and not isinstance(value, bool):
            rounds = value
    _check_clients(meta, server, check)
    if server is not None:
        from medflare.recipes.tracking import tracking_problems

        check.problems.extend(tracking_problems(server))
    site = _site_policy(profile, site_workspace, check)
    if site is not None and client is not None:
        _check_secure_aggregation(meta, client, server, site, site_workspace, check)
        _check_budget(meta, client, rounds, site, check)
        if check.ok:
            _check_dp_sgd_budget(meta, client, rounds, site, site_workspace, check)
    return check


#: site filters that encrypt what they release (they must end a scope's result chain)
ENCRYPTING_FILTERS = ("HEUpdateEncryptor", "DistributedGaussianPrivacyFilter")


def _check_secure_aggregation(meta: dict, client: dict, server: Optional[dict], site, site_workspace, check: JobCheck) -> None:
    """An HE job (its server adds ciphertexts) needs a scope that encrypts, with bounds and a
    weighting the server admits; a plain job cannot read what such a scope sends."""
    policy, _, _, source = site
    scope = _scopes(policy).get(_scope_name(meta, policy))
    if scope is None:
        return  # an undefined scope is reported by the budget check
    name = scope.get("name")
    results = [f for f in scope.get("task_result_filters", []) or [] if isinstance(f, dict)]
    last = results[-1] if results else {}
    encrypting = str(last.get("path", "")).rsplit(".", 1)[-1] in ENCRYPTING_FILTERS
    aggregator = next((c for c in (server or {}).get("components", []) if isinstance(c, dict) and c.get("id") == "aggregator"), {})
    encrypted_job = str(aggregator.get("path", "")).endswith("EncryptedSumAggregator")
    if encrypted_job and not encrypting:
        check.problems.append(
            f"meta.json: the job's server aggregates only ciphertexts (EncryptedSumAggregator) but scope {name!r} of the "
            f"{source} does not encrypt (its last result filter must be one of {list(ENCRYPTING_FILTERS)}): every "
            "contribution would be refused; choose a scope that encrypts (research: secure_aggregation, secure_distributed_dp)"
        )
        return
    if encrypting and not encrypted_job:
        check.problems.append(
            f"meta.json: scope {name!r} of the {source} encrypts every result, and the job's aggregator "
            f"({aggregator.get('path', 'none')}) cannot read ciphertexts: use an HE job (brats_he, heart_disease_he)"
        )
        return
    if not encrypting:
        return
    job_filters = [f for chain in client.get("task_result_filters", []) or [] for f in chain.get("filters", [])]
    if job_filters:
        check.problems.append(
            f"app/config/config_fed_client.json: the job's own result filters run after scope {name!r} has encrypted the "
            "result and would refuse ciphertexts; an HE job carries no result filters"
        )
    site_args, job_args = last.get("args") or {}, aggregator.get("args") or {}
    bound, job_bound = site_args.get("max_update_norm"), job_args.get("max_update_norm")
    if isinstance(bound, (int, float)) and isinstance(job_bound, (int, float)) and bound > job_bound:
        check.problems.append(
            f"scope {name!r} checks updates against max_update_norm {bound}, above the job aggregator's {job_bound}: "
            "the server refuses every contribution whose recorded bound it does not admit"
        )
    weighting = "equal" if last["path"].endswith("DistributedGaussianPrivacyFilter") else site_args.get("weight_meta_key", NUM_TRAIN_CASES)
    job_weighting = job_args.get("weight_meta_key", NUM_TRAIN_CASES)
    if weighting not in ("equal", job_weighting):
        check.problems.append(
            f"scope {name!r} weights by {weighting!r}, the job's aggregator by {job_weighting!r}: every contribution would be refused"
        )
    shares = site_args.get("num_sites")
    clients = meta.get("min_clients")
    if isinstance(shares, int) and isinstance(clients, int) and shares > clients:
        check.problems.append(
            f"scope {name!r} adds 1/sqrt({shares}) of its noise (distributed DP) and the server refuses sums of fewer "
            f"than {shares} sites, but the job runs rounds with min_clients {clients}: such rounds are not aggregated"
        )
    if site_workspace is not None:
        context = os.path.join(site_workspace, "startup", site_args.get("tenseal_context_file", "client_context.tenseal"))
        if not os.path.isfile(context):
            check.problems.append(
                f"{context}: missing; scope {name!r} encrypts with the site's CKKS key, which provisioning with "
                "NVFlare's HEBuilder writes into the startup kit (nvflare poc prepare -he)"
            )


def _scopes(policy: dict) -> dict:
    return {s.get("name"): s for s in policy.get("scopes", []) if isinstance(s, dict)}


def _scope_name(meta: dict, policy: dict):
    """The scope a site applies to the job: the one ``meta.json`` names, else the site's default."""
    return meta.get("scope") or policy.get("default_scope")


def _site_dp_sgd_requirement(scope: dict) -> Optional[tuple]:
    """``(noise_multiplier, max_grad_norm)`` the scope's ``PatientDPSGDFilter`` requires, or None."""
    for f in scope.get("task_data_filters", []) or []:
        if isinstance(f, dict) and str(f.get("path", "")).endswith("PatientDPSGDFilter"):
            args = f.get("args") or {}
            return float(args.get("noise_multiplier", 0.0)), float(args.get("max_grad_norm", 0.0))
    return None


def _training_cases(site_workspace: str, executor) -> int:
    """The training cases of the site's data set for ``executor``, as its trainer will count them."""
    from medflare.audit.scratch_site import open_site
    from medflare.data.brats_layout import load_datalist

    site = open_site(site_workspace, dataset=executor.dataset_name, dataset_from=executor.dataset_origin)
    datalist, root = site.data.datalist, site.data.data_root
    if datalist.lower().endswith(".csv") or os.path.isdir(datalist):
        from medflare.data.chest_xray_tables import detect_table_format
        from medflare.data.outcome_table import count_cases

        table_format, _ = detect_table_format(datalist)
        if table_format != "medflare":
            # the outcome executor refuses DP-SGD there: one case is not one patient
            raise ValueError(f"a {table_format} table holds several images per patient; patient-level DP-SGD is refused on it")
        return count_cases(datalist)["train"]
    training, _ = load_datalist(datalist, root)
    return len(training)


def _check_dp_sgd_budget(meta: dict, client: dict, rounds: Optional[int], site, site_workspace: Optional[str], check: JobCheck) -> None:
    """Patient-level DP-SGD at a fixed noise multiplier (the job's, raised to the site's least, or
    the site's alone when the job names none) spends, per patient, the epsilon of
    ``rounds x steps per round x runs`` steps at ``q = m / N`` (``runs`` 2 with the site-only
    model, whose steps are charged too); that must fit the site's remaining budget. ``N`` is
    the site's training cases, so this needs the site's workspace, not only its profile.

    Notes:
        The steps per round are the trainers' (:func:`medflare.privacy.dp_sgd.planned_steps`):
        ``local_steps`` when given, else ``epochs * ceil(1 / q)``, at most ``max_steps_per_round``. A ``target_epsilon`` job is
        checked against the budget directly (:func:`_check_budget`).
    """
    from medflare.privacy.accounting import epsilon_of_history
    from medflare.privacy.dp_sgd import patient_sample_rate, planned_steps

    policy, budget, spent, source = site
    scope_name = _scope_name(meta, policy)
    required = _site_dp_sgd_requirement(_scopes(policy).get(scope_name, {}))
    for entry in client.get("executors", []) or []:
        component = entry.get("executor") or {}
        args = component.get("args") or {}
        dp = args.get("dp_sgd") if isinstance(args.get("dp_sgd"), dict) else None
        if (dp is None and required is None) or (dp is not None and dp.get("target_epsilon") is not None):
            continue
        if budget is None or rounds is None:
            continue
        if site_workspace is None:
            check.checked.append(
                "per-patient DP-SGD epsilon not estimated: it depends on each site's patients (give --site-workspace)"
            )
            continue
        try:
            executor = ConfigBuilder().build_component(copy.deepcopy(component))
            cases = _training_cases(site_workspace, executor)
        except Exception as e:  # noqa: BLE001 - the job and the site are checked elsewhere; say why not here
            check.checked.append(f"per-patient DP-SGD epsilon not estimated ({type(e).__name__}: {str(e)[:200]})")
            continue
        z = max(float(dp["noise_multiplier"]) if dp else 0.0, required[0] if required else 0.0)
        m = int(dp.get("expected_patients_per_step") or args.get("batch_size", 1)) if dp else int(args.get("batch_size", 1))
        q = patient_sample_rate(m, cases)
        per_round = planned_steps(int(args.get("local_epochs", 1)), q, args.get("local_steps"), args.get("max_steps_per_round"))
        runs = 2 if args.get("local_model") == "site_only" else 1
        remaining = budget.max_epsilon - spent

        def epsilon(r: int) -> float:
            return epsilon_of_history([(z, q, r * per_round * runs)], budget.delta, budget.accountant)

        planned = epsilon(rounds)
        check.checked.append(
            f"DP-SGD at the site: z {z:g}, q {q:.4g} ({m} of {cases} training cases), {per_round} steps x {rounds} rounds"
            f"{' x 2 (site-only model)' if runs == 2 else ''}: per-patient epsilon {planned:.2f} of {remaining:.2f} left"
        )
        if planned > remaining:
            fits = next((r for r in range(rounds - 1, 0, -1) if epsilon(r) <= remaining), 0)
            check.problems.append(
                f"config_fed_server.json num_rounds {rounds}: under scope {scope_name!r} of the {source} the site trains "
                f"with DP-SGD at z {z:g}, q {q:.4g} ({m} of its {cases} training cases per step), {per_round} steps per "
                f"round{', twice (the site-only model is charged too)' if runs == 2 else ''}: per-patient epsilon "
                f"{planned:.2f} at delta {budget.delta:g}, and the site has {remaining:.2f} left (cap "
                f"{budget.max_epsilon:g}, spent {spent:.2f}): its results would be blocked after round {fits}; use at "
                f"most {fits} rounds, fewer local steps or a larger noise multiplier"
            )
