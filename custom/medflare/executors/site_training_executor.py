"""What every medflare training executor does with NVFlare's task contract, whatever it trains.

In process with the FLARE client, a subclass supplies a trainer (its data, network and local
training); this class answers the tasks:

- ``train``: take the global ``WEIGHTS``, score them on the local validation/test data
  (reported as ``initial_metrics`` for best-model selection), train locally and return a
  ``WEIGHT_DIFF`` DXO whose meta carries ``NUM_STEPS_CURRENT_ROUND``, ``num_train_cases``,
  the training loss and timings, named as the wire contract declares them
  (:mod:`medflare.wire_contract`; the site's filters decide which of them leave);
- ``validate``: score the model in the task and return a ``METRICS`` DXO; the local model is
  left as it was (cross-site evaluation scores other sites' models here);
- DP-SGD: with ``dp_sgd`` settings, or when the site's own task-data filter puts its requirement
  in the train task's header ``wire_contract.DP_SGD_REQUIRED`` (``{"noise_multiplier": z_min,
  "max_grad_norm": C_max}``), local training is patient-level DP-SGD with at least what the site
  requires: :math:`z = \\max(z_{job}, z_{site})`, :math:`C = \\min(C_{job}, C_{site})` (no job
  settings: the site's values and the job's batch size as the expected patients per step). A
  malformed requirement refuses the task (nothing sent). The result's meta carries the record
  under ``wire_contract.DP_SGD``;
- DP-SGD to a per-patient target: with ``dp_sgd`` giving ``target_epsilon`` instead of a noise
  multiplier, the first train task fixes the run's plan at this site: the rounds from the
  task's header ``AppConstants.NUM_ROUNDS`` (NVFlare's ``ScatterAndGather`` sets it on every
  train task) times the DP-SGD steps a round takes here (:math:`q = m / N` with this site's
  :math:`N`), twice that with ``local_model="site_only"`` (its own DP-SGD run on the same
  patients, charged when ``submit_model`` releases it; counted whether or not cross-site
  evaluation asks, since that is not known at round 1). The noise multiplier solved for that
  plan (:func:`medflare.privacy.dp_sgd.settings_for_target`) is kept for the whole run, and the
  site's requirement still applies on top. A train task without the header, with another
  one than the plan's, or beyond the planned rounds is refused (nothing trained or sent);
- ``submit_model``: return this site's local model, for NVFlare's cross-site evaluation:
  by default (``local_model="last_round"``) the weights of its latest local training, i.e. the
  global model plus one round of local steps; with ``local_model="site_only"`` a model the
  site trains alongside, from the same initial weights and with the same steps each round, on
  its own data alone and never sent during training. That is EXAM's single-site model (Dayan
  et al. 2021), what the federated model is compared against (:mod:`medflare.reporting.cross_site_report`).
  Under DP-SGD the site-only model is trained with the same DP-SGD as the round's update, and
  the ``WEIGHTS`` DXO that ``submit_model`` returns carries under ``wire_contract.DP_SGD`` one
  record of all its rounds (steps summed; when rounds differ, the smallest noise multiplier and
  the largest sample rate, an upper bound on its epsilon: see
  :func:`medflare.privacy.dp_sgd.combined_record`). The ``last_round`` model carries no record:
  it is the global model plus the update already released under DP-SGD.

What the executor must not lose when NVFlare rebuilds the client mid-job (the site-only model,
the latest local weights, the DP-SGD target's rounds trained) is saved in the job's run folder
after every train task and read back when it is built again (:mod:`.executor_state`).

It fails closed: where the data is comes from the site (:mod:`medflare.data.site_data_config`),
never the job, and when the data cannot be found or read, every task fails with an error naming
the file; a diverged update (non-finite loss or weights) is never sent.

A trainer provides ``get_weights()``, ``set_weights(weights)`` (raising
``WeightMismatchError``), ``weight_diff(after, before)``, ``validate(should_abort) -> dict |
None``, ``num_train_cases`` and ``device``; the subclass's :meth:`_train_locally` runs one round.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from medflare.privacy.dp_sgd import (
    DPSGDRequirement,
    DPSGDSettings,
    DPSGDTarget,
    combined_record,
    dp_sgd_epsilon,
    effective_settings,
    parse_dp_sgd_requirement,
    parse_dp_sgd_settings,
    patient_sample_rate,
    settings_for_target,
)
from medflare.training.model_weights import TrainResult, WeightMismatchError
from medflare.wire_contract import (
    CURRENT_ROUND,
    DP_SGD,
    DP_SGD_REQUIRED,
    INITIAL_METRICS,
    LOCAL_MODEL,
    NUM_STEPS,
    NUM_TRAIN_CASES,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    VALIDATE_SECONDS,
)

__all__ = ["SiteTrainingExecutor", "TargetPlan", "check_positive_int", "LOCAL_MODELS"]

LOCAL_MODELS = ("last_round", "site_only")


def check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive int or null" if allow_none else "a positive int"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class TargetPlan:
    """The DP-SGD a run takes at this site under a per-patient target: ``rounds`` x
    ``steps_per_round`` x ``runs`` (2 with the site-only model) steps at ``sample_rate``, all
    with ``settings.noise_multiplier``."""

    settings: DPSGDSettings
    rounds: int
    steps_per_round: int
    runs: int
    sample_rate: float

    @property
    def planned_steps(self) -> int:
        return self.rounds * self.steps_per_round * self.runs


class _PreparationRefusal(Exception):
    """The site's data is not the preparation the job requires; the message is the refusal."""


def _non_finite_keys(weights: dict) -> list[str]:
    """Keys of the floating-point entries holding a NaN or an infinity."""
    return [k for k, v in weights.items() if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v))]


class SiteTrainingExecutor(Executor):
    """Base of the medflare executors; see the module docstring.

    Args:
        model: ``{"path": "...", "args": {...}}`` of the network (must match the server's
            persistor), or a module (NVFlare builds such a dict into the module before it
            reaches here).
        device: ``"auto"`` (the site's GPU when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        seed: seed of the local training's randomness.
        validate_global_model: score the received global model before training each round.
        local_model: what ``submit_model`` returns: ``"last_round"`` or ``"site_only"`` (see
            the module docstring; doubles the local training time).
        dp_sgd: null, or ``{"noise_multiplier": z > 0, "max_grad_norm": C > 0,
            "expected_patients_per_step": m >= 1[, "secure_noise": true]}`` for patient-level
            DP-SGD (:class:`~medflare.privacy.dp_sgd.DPSGDSettings`; ``secure_noise`` false is
            reproducible and insecure, for tests only), or the same with ``"target_epsilon": E >
            0[, "target_delta": 1e-5]`` instead of ``noise_multiplier``: each site solves z so
            that its patients spend at most E over the run's planned steps (see the module
            docstring; :class:`~medflare.privacy.dp_sgd.DPSGDTarget`). The network is checked
            when the job is built.
        train_task_name, validate_task_name, submit_model_task_name: task names to answer.
        dataset: the name of the site's data set this job trains on, looked up in the site's
            data configuration (:mod:`medflare.data.site_data_config`); the job still names no
            path. Null: the name of the executor's kind (:attr:`kind_dataset`).
        required_preparation: null, or ``{"name": "medflare-brats-prep", "version": ">=1.0,<2"
            [, "parameters_hash": "<sha256>"]}``: the site's data set must have been prepared by
            ``medflare prepare`` with that preparation, and be unchanged since. Checked when the
            data is first loaded, against ``medflare_preparation.json`` in the data set's
            ``data_root`` (:func:`medflare.preparation.verification.verify_preparation`, every
            file the datalist names, full sha256 once per process and file state); a site that
            fails refuses every task, nothing trained or sent, and its log says what to re-run.
    """

    #: the metric logged after each round (a key of the trainer's ``validate`` result)
    key_metric = ""

    def __init__(
        self,
        model,
        device: str = "auto",
        seed: int = 0,
        validate_global_model: bool = True,
        local_model: str = "last_round",
        train_task_name: str = AppConstants.TASK_TRAIN,
        validate_task_name: str = AppConstants.TASK_VALIDATION,
        submit_model_task_name: str = AppConstants.TASK_SUBMIT_MODEL,
        dp_sgd: Optional[dict] = None,
        dataset: Optional[str] = None,
        required_preparation: Optional[dict] = None,
    ):
        super().__init__()
        if not isinstance(model, torch.nn.Module) and not (isinstance(model, dict) and isinstance(model.get("path"), str)):
            raise ValueError(f"model must be {{'path': 'package.module.Class', 'args': {{...}}}}, got {model!r}")
        if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if not isinstance(validate_global_model, bool):
            raise TypeError(f"validate_global_model must be true or false, got {validate_global_model!r}")
        if local_model not in LOCAL_MODELS:
            raise ValueError(f"local_model must be one of {list(LOCAL_MODELS)}, got {local_model!r}")
        for name, value in (
            ("train_task_name", train_task_name),
            ("validate_task_name", validate_task_name),
            ("submit_model_task_name", submit_model_task_name),
        ):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if dataset is not None:
            from medflare.data.site_data_config import check_dataset_name

            check_dataset_name(dataset, "dataset (the site's data set name, or null for the executor kind's)")
        self.dataset = dataset
        from medflare.preparation.verification import check_required_preparation

        check_required_preparation(required_preparation, "required_preparation")
        self.required_preparation = required_preparation
        self.model = model
        self.device = device
        self.seed = seed
        self.validate_global_model = validate_global_model
        self.local_model = local_model
        self.train_task_name = train_task_name
        self.validate_task_name = validate_task_name
        self.submit_model_task_name = submit_model_task_name
        self.dp_sgd = dp_sgd
        parsed = parse_dp_sgd_settings(dp_sgd, "dp_sgd", allow_target=True)
        #: a fixed noise multiplier (also the trainers' default), or a target solved at round 1
        self._dp_settings = parsed if isinstance(parsed, DPSGDSettings) else None
        self._dp_target = parsed if isinstance(parsed, DPSGDTarget) else None
        if parsed is not None:
            from medflare.training.dp_networks import check_dp_compatible

            check_dp_compatible(self._build_network())  # refused when the job is built, not in round 1
        self._target_plan: Optional[TargetPlan] = None
        self._target_rounds_trained = 0

        self._trainer = None
        self._site_only_dp_records: list = []
        self._site_only_unprivate = False
        self._site_only_trainer = None  # local_model="site_only": trained on this site's data alone
        self._site_only_started = False
        self._setup_error: Optional[str] = None
        self._local_weights: Optional[dict] = None
        self._state_path: Optional[str] = None

    # what a subclass supplies ------------------------------------------------------------------

    @property
    def kind_dataset(self) -> str:
        """The data set name of this executor's kind (one of
        :data:`medflare.data.site_data_config.DATASET_KINDS`), asked for when the job names none."""
        raise NotImplementedError

    @property
    def dataset_name(self) -> str:
        """The key of the site's data configuration this job trains on: the job's ``dataset``
        argument, else :attr:`kind_dataset`."""
        return self.dataset if self.dataset is not None else self.kind_dataset

    @property
    def dataset_origin(self) -> str:
        """Where :attr:`dataset_name` came from, for the message when the site lacks it."""
        if self.dataset is not None:
            return "the job's executor argument 'dataset'"
        return f"the executor kind, {type(self).__name__}"

    def _build_trainer(self, config, network: torch.nn.Module):
        """The trainer for the site's data (``config``: a ``SiteDataConfig``) and ``network``."""
        raise NotImplementedError

    def _train_locally(
        self, trainer, should_abort: Callable[[], bool], dp_sgd: Optional[DPSGDSettings] = None
    ) -> TrainResult:
        """One round of local training with ``trainer``, under DP-SGD when ``dp_sgd`` is given."""
        raise NotImplementedError

    def _dp_sgd_steps_per_round(self, trainer, expected_patients_per_step: int) -> int:
        """The DP-SGD steps :meth:`_train_locally` takes with ``trainer`` in a round (unless
        aborted), for settings of ``expected_patients_per_step``."""
        raise NotImplementedError

    def _expected_patients_per_step(self) -> int:
        """Patients per DP-SGD step when only the site asks for DP-SGD: the job's batch size."""
        return int(getattr(self, "batch_size", 1))

    def _build_site_only_trainer(self, config):
        """The trainer of the site-only model; a subclass whose trainer can share its loaded
        data (``OutcomeTrainer.sibling``) overrides this to avoid reading the data twice."""
        return self._build_trainer(config, self._build_network())

    def _build_network(self) -> torch.nn.Module:
        """A fresh network for a trainer (a copy when NVFlare handed over a built module)."""
        from medflare.training.model_spec import build_model

        return copy.deepcopy(self.model) if isinstance(self.model, torch.nn.Module) else build_model(self.model)

    # lifecycle -----------------------------------------------------------------------------

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self._setup(fl_ctx)
        elif event_type == EventType.END_RUN:
            self._trainer = None
            self._site_only_trainer = None

    def _setup(self, fl_ctx: FLContext) -> None:
        """Find the site's data and build the trainer; remember the reason if that fails."""
        from medflare.data.site_data_config import resolve_site_data_config

        site = fl_ctx.get_identity_name()
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
        local_dir = workspace.get_site_config_dir() if workspace is not None else None
        source = "site data configuration"
        try:
            config = resolve_site_data_config(site, local_dir, dataset=self.dataset_name, dataset_from=self.dataset_origin)
            source = config.source
            self._verify_preparation(config, site)
            self._trainer = self._build_trainer(config, self._build_network())
            if self.local_model == "site_only":
                self._site_only_trainer = self._build_site_only_trainer(config)
                self._site_only_started = False
                self._site_only_dp_records = []
                self._site_only_unprivate = False
            self._target_plan, self._target_rounds_trained = None, 0
            self._local_weights = None
            self._setup_error = None
            self.log_info(
                fl_ctx,
                f"{site}: data set {self.dataset_name}: {self._trainer.num_train_cases} training cases from {config.datalist}, "
                f"device {self._trainer.device}",
            )
        except Exception as e:  # any failure here must stop the site from sending anything
            self._trainer = None
            self._setup_error = str(e) if isinstance(e, _PreparationRefusal) else f"{site}: cannot load the site's data ({source}): {e}"
            self.log_error(fl_ctx, self._setup_error)
            return
        try:
            self._restore_state(fl_ctx)
        except Exception as e:  # a site that cannot tell how far it trained trains no further
            self._trainer = None
            self._setup_error = f"{site}: {e}"
            self.log_error(fl_ctx, self._setup_error)

    def _verify_preparation(self, config, site: str) -> None:
        """Refuse (:class:`_PreparationRefusal`) data that is not the job's ``required_preparation``."""
        if self.required_preparation is None:
            return
        from medflare.preparation.verification import PreparationMismatch, verify_preparation

        try:
            verify_preparation(config.data_root, self.required_preparation, datalist=config.datalist)
        except PreparationMismatch as e:
            raise _PreparationRefusal(
                f"{site}: data set {self.dataset_name!r} does not meet the job's required_preparation "
                f"{self.required_preparation}: {e}. Every task is refused, nothing trained or sent"
            ) from None

    def _restore_state(self, fl_ctx: FLContext) -> None:
        """Take back what this executor saved in this job before it was rebuilt, if anything."""
        from medflare.executors.executor_state import load_state, state_path

        self._state_path = state_path(fl_ctx)
        state = load_state(self._state_path)
        if state is None:
            return
        self._local_weights = state["local_weights"]
        self._target_rounds_trained = int(state.get("target_rounds_trained", 0))
        site_only = state["site_only_weights"]
        if self._site_only_trainer is not None and site_only is not None:
            self._site_only_trainer.set_weights(site_only)
            self._site_only_started = True
            self._site_only_dp_records = list(state.get("site_only_dp_records", []))
            self._site_only_unprivate = bool(state.get("site_only_unprivate", False))
        self.log_info(
            fl_ctx,
            f"resumed this job's executor state from {self._state_path} (site-only model: "
            f"{'yes' if self._site_only_started else 'no'}, target rounds trained: {self._target_rounds_trained})",
        )

    def _save_state(self) -> None:
        """Write what a rebuilt executor needs (see :mod:`.executor_state`); nothing outside a FLARE client."""
        if self._state_path is None:
            return
        from medflare.executors.executor_state import save_state

        started = self._site_only_trainer is not None and self._site_only_started
        save_state(
            self._state_path,
            {
                "local_weights": self._local_weights,
                "site_only_weights": self._site_only_trainer.get_weights() if started else None,
                "site_only_dp_records": list(self._site_only_dp_records),
                "site_only_unprivate": self._site_only_unprivate,
                "target_rounds_trained": self._target_rounds_trained,
            },
        )

    # tasks ---------------------------------------------------------------------------------

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        handlers = {
            self.train_task_name: self._train,
            self.validate_task_name: self._validate,
            self.submit_model_task_name: self._submit_model,
        }
        handler = handlers.get(task_name)
        if handler is None:
            self.log_error(fl_ctx, f"unknown task {task_name!r}; this executor answers {sorted(handlers)}")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        if self._trainer is None:
            if self._setup_error is None:
                self._setup(fl_ctx)
            if self._trainer is None:
                self.log_error(fl_ctx, f"task {task_name!r} refused, nothing sent: {self._setup_error}")
                return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        try:
            return handler(shareable, fl_ctx, abort_signal)
        except Exception as e:
            self.log_exception(fl_ctx, f"task {task_name!r} failed, nothing sent: {e}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def _global_weights(self, shareable: Shareable, fl_ctx: FLContext) -> Optional[dict]:
        """The WEIGHTS in the task, or None (logged) when the task carries anything else."""
        try:
            dxo = from_shareable(shareable)
        except Exception as e:
            self.log_error(fl_ctx, f"task data is not a DXO: {e}")
            return None
        if dxo.data_kind != DataKind.WEIGHTS or not isinstance(dxo.data, dict) or not dxo.data:
            self.log_error(fl_ctx, f"task data must be a non-empty {DataKind.WEIGHTS} DXO, got {dxo.data_kind}")
            return None
        return dxo.data

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        weights = self._global_weights(shareable, fl_ctx)
        if weights is None:
            return make_reply(ReturnCode.BAD_TASK_DATA)
        current_round = shareable.get_header(CURRENT_ROUND)
        try:
            required = parse_dp_sgd_requirement(shareable.get_header(DP_SGD_REQUIRED), f"header {DP_SGD_REQUIRED}")
        except (TypeError, ValueError) as e:
            self.log_error(fl_ctx, f"round {current_round}: the site's DP-SGD requirement is malformed, task refused, nothing sent: {e}")
            return make_reply(ReturnCode.BAD_TASK_DATA)
        try:
            job_dp_sgd = self._job_dp_sgd(shareable, required, fl_ctx)
        except ValueError as e:
            self.log_error(fl_ctx, f"round {current_round}: {e}")
            return make_reply(ReturnCode.BAD_TASK_DATA)
        dp_sgd = effective_settings(job_dp_sgd, required, self._expected_patients_per_step())
        if dp_sgd is not None and job_dp_sgd is None:
            refusal = self._dp_sgd_refusal(dp_sgd)
            if refusal:
                self.log_error(fl_ctx, f"round {current_round}: {refusal}")
                return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        try:
            self._trainer.set_weights(weights)
        except WeightMismatchError as e:
            self.log_error(fl_ctx, f"global model does not fit the local network: {e}")
            return make_reply(ReturnCode.BAD_TASK_DATA)
        global_weights = self._trainer.get_weights()

        def should_abort() -> bool:
            return abort_signal.triggered

        meta = {}
        validate_seconds = 0.0
        if self.validate_global_model:
            start = time.perf_counter()
            metrics = self._trainer.validate(should_abort)
            validate_seconds = time.perf_counter() - start
            if metrics is None:
                return make_reply(ReturnCode.TASK_ABORTED)
            meta[INITIAL_METRICS] = metrics

        if self._target_plan is not None:
            self._target_rounds_trained += 1  # counted when begun: an aborted round's steps were taken
            self._save_state()
        result = self._train_locally(self._trainer, should_abort, dp_sgd)
        if result.aborted:
            self.log_info(fl_ctx, f"round {current_round}: training aborted after {result.steps} steps")
            return make_reply(ReturnCode.TASK_ABORTED)
        if result.steps == 0:
            self.log_error(fl_ctx, "no training step was taken (empty training set?); nothing sent")
            return make_reply(ReturnCode.EXECUTION_RESULT_ERROR)
        local_weights = self._trainer.get_weights()
        diff = self._trainer.weight_diff(local_weights, global_weights)
        bad = _non_finite_keys(diff)
        # under DP-SGD a round may sample no patient at all: its loss is NaN, its update pure noise
        loss_ok = math.isfinite(result.mean_loss) or (dp_sgd is not None and math.isnan(result.mean_loss))
        if bad or not loss_ok:
            self.log_error(fl_ctx, f"training diverged (loss {result.mean_loss}, non-finite {bad[:3]}); nothing sent")
            return make_reply(ReturnCode.EXECUTION_RESULT_ERROR)
        self._local_weights = local_weights
        if self._site_only_trainer is not None and not self._train_site_only(global_weights, should_abort, fl_ctx, dp_sgd):
            return make_reply(ReturnCode.TASK_ABORTED)
        self._save_state()  # before anything is sent: a rebuilt executor resumes from here

        meta.update(
            {
                NUM_STEPS: int(result.steps),
                TRAIN_LOSS: float(result.mean_loss),
                TRAIN_SECONDS: float(result.seconds),
                VALIDATE_SECONDS: float(validate_seconds),
                NUM_TRAIN_CASES: int(self._trainer.num_train_cases),
            }
        )
        if dp_sgd is not None:
            meta[DP_SGD] = dict(result.dp_sgd)
        initial = meta.get(INITIAL_METRICS, {})
        self.log_info(
            fl_ctx,
            f"round {current_round}: {result.steps} {'DP-SGD ' if dp_sgd else ''}steps, loss {result.mean_loss:.4f} "
            f"in {result.seconds:.1f}s; "
            f"global model {self.key_metric} {initial.get(self.key_metric, float('nan')):.4f}",
        )
        result = DXO(data_kind=DataKind.WEIGHT_DIFF, data=diff, meta=meta).to_shareable()
        result.set_header(CURRENT_ROUND, current_round)  # filters and ledgers name the round
        return result

    def _job_dp_sgd(
        self, shareable: Shareable, required: Optional[DPSGDRequirement], fl_ctx: FLContext
    ) -> Optional[DPSGDSettings]:
        """The job's DP-SGD for this train task: its fixed settings, or under a target the plan
        made at the first train task (the same noise multiplier every round).

        Raises:
            ValueError: the task cannot be trained within the target: no ``NUM_ROUNDS`` header
                at the first train task, another one later, or more rounds than planned.
        """
        target = self._dp_target
        if target is None:
            return self._dp_settings
        rounds = shareable.get_header(AppConstants.NUM_ROUNDS)
        if self._target_plan is None:
            self._target_plan = self._plan_for_target(target, rounds)
            self._log_target_plan(self._target_plan, required, fl_ctx)
        plan = self._target_plan
        if rounds != plan.rounds:
            raise ValueError(
                f"the train task's {AppConstants.NUM_ROUNDS!r} header is {rounds!r}, but this site solved its "
                f"noise multiplier for {plan.rounds} rounds at the first train task; task refused, nothing "
                "trained or sent (the per-patient target_epsilon holds only for the planned steps)"
            )
        if self._target_rounds_trained >= plan.rounds:
            raise ValueError(
                f"this site has trained the {plan.rounds} rounds its noise multiplier was solved for; another "
                f"would spend more than target_epsilon {target.target_epsilon:g} per patient. Task refused, "
                "nothing trained or sent"
            )
        return plan.settings

    def _plan_for_target(self, target: DPSGDTarget, rounds) -> TargetPlan:
        """Solve the noise multiplier for ``rounds`` rounds of this site's DP-SGD (see the module docstring)."""
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(
                f"dp_sgd asks for target_epsilon {target.target_epsilon:g} per patient over the run, and the train "
                f"task carries no valid {AppConstants.NUM_ROUNDS!r} header (got {rounds!r}; NVFlare's "
                "ScatterAndGather sets it on every train task): without the run's rounds the planned steps, and "
                "so the noise multiplier, are unknown. Task refused, nothing trained or sent, no budget spent; "
                "run the job under ScatterAndGather or give dp_sgd a noise_multiplier"
            )
        m = target.expected_patients_per_step
        sample_rate = patient_sample_rate(m, self._trainer.num_train_cases)
        per_round = self._dp_sgd_steps_per_round(self._trainer, m)
        runs = 2 if self.local_model == "site_only" else 1
        settings = settings_for_target(target, sample_rate, rounds * per_round * runs)
        return TargetPlan(settings, rounds, per_round, runs, sample_rate)

    def _log_target_plan(self, plan: TargetPlan, required: Optional[DPSGDRequirement], fl_ctx: FLContext) -> None:
        target, z = self._dp_target, plan.settings.noise_multiplier
        self.log_info(
            fl_ctx,
            f"DP-SGD to per-patient epsilon {target.target_epsilon:g} (delta {target.target_delta:g}, RDP): "
            f"{plan.planned_steps} planned steps ({plan.rounds} rounds x {plan.steps_per_round} steps"
            f"{' x 2: the update and the site-only model' if plan.runs == 2 else ''}) at q={plan.sample_rate:.4g} "
            f"({target.expected_patients_per_step} of {self._trainer.num_train_cases} patients per step): "
            f"noise multiplier z={z:.4g} for the whole run",
        )
        if required is not None and required.noise_multiplier > z:
            spent = dp_sgd_epsilon(required.noise_multiplier, plan.sample_rate, plan.planned_steps, target.target_delta)
            self.log_info(
                fl_ctx,
                f"this site requires z >= {required.noise_multiplier:g}: training at that, per-patient epsilon "
                f"{spent:.4g} over the planned steps, below the target",
            )

    def _dp_sgd_refusal(self, dp_sgd: DPSGDSettings) -> Optional[str]:
        """Why a job without DP-SGD settings cannot meet the site's DP-SGD requirement, or None.
        Checked before anything is scored or trained, so nothing is computed, sent or charged."""
        from medflare.training.dp_networks import dp_incompatibilities

        problems = dp_incompatibilities(self._trainer.model)
        if not problems:
            return None
        layers_by_problem: dict[str, list[str]] = {}  # "(BatchNorm2d) mixes ...: use GroupNorm" -> layer names
        for line in problems:
            where, _, what = line.partition(" ")
            layers_by_problem.setdefault(what, []).append(where)
        shown = "; ".join(
            f"{len(names)} layer(s) {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            for what, names in layers_by_problem.items()
        )
        return (
            f"this site's privacy scope requires patient-level DP-SGD (noise multiplier >= {dp_sgd.noise_multiplier:g}, "
            f"clipping norm <= {dp_sgd.max_grad_norm:g}) and this job's network cannot be trained with it: "
            f"{shown}. Task refused: nothing trained, nothing sent, no privacy budget "
            "spent. Submit the job's DP-SGD variant instead (jobs/brats_dpsgd, jobs/cxr_emr_dpsgd, "
            "jobs/heart_disease_dpsgd: GroupNorm networks), or a job naming a scope of this site without DP-SGD"
        )

    def _validate(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        weights = self._global_weights(shareable, fl_ctx)
        if weights is None:
            return make_reply(ReturnCode.BAD_TASK_DATA)
        owner = shareable.get_header(AppConstants.MODEL_OWNER, "?")
        keep = self._trainer.get_weights()  # scoring another model must not disturb local training
        try:
            self._trainer.set_weights(weights)
        except WeightMismatchError as e:
            self.log_error(fl_ctx, f"model from {owner} does not fit the local network: {e}")
            return make_reply(ReturnCode.BAD_TASK_DATA)
        try:
            metrics = self._trainer.validate(lambda: abort_signal.triggered)
        finally:
            self._trainer.set_weights(keep)
        if metrics is None:
            return make_reply(ReturnCode.TASK_ABORTED)
        self.log_info(fl_ctx, f"model of {owner}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return DXO(data_kind=DataKind.METRICS, data=metrics).to_shareable()

    def _train_site_only(
        self, global_weights: dict, should_abort: Callable[[], bool], fl_ctx: FLContext, dp_sgd: Optional[DPSGDSettings]
    ) -> bool:
        """One round of the site-only model: it starts from the first global model received and
        is never sent during training; under DP-SGD its round's record is kept for submit_model.
        False when aborted."""
        trainer = self._site_only_trainer
        if not self._site_only_started:
            trainer.set_weights(global_weights)
            self._site_only_started = True
        result = self._train_locally(trainer, should_abort, dp_sgd)
        if result.aborted:
            return False
        if dp_sgd is None:
            self._site_only_unprivate = True
        else:
            self._site_only_dp_records.append(result.dp_sgd)
        self.log_info(fl_ctx, f"site-only model: {result.steps} steps, loss {result.mean_loss:.4f} in {result.seconds:.1f}s")
        return True

    def _submit_model(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self._site_only_trainer is not None:
            if not self._site_only_started:
                self.log_error(fl_ctx, "no site-only model to submit: this site has not trained in this run")
                return make_reply(ReturnCode.EXECUTION_RESULT_ERROR)
            weights = self._site_only_trainer.get_weights()
            bad = _non_finite_keys(weights)
            if bad:
                self.log_error(fl_ctx, f"the site-only model diverged (non-finite {bad[:3]}); nothing sent")
                return make_reply(ReturnCode.EXECUTION_RESULT_ERROR)
            meta = {LOCAL_MODEL: "site_only"}
            record = combined_record(self._site_only_dp_records)
            if record is not None and not self._site_only_unprivate:
                meta[DP_SGD] = record
            elif record is not None:
                self.log_warning(fl_ctx, "the site-only model had rounds without DP-SGD: it is submitted without a DP-SGD record")
            return DXO(data_kind=DataKind.WEIGHTS, data=weights, meta=meta).to_shareable()
        if self._local_weights is None:
            self.log_error(fl_ctx, "no local model to submit: this site has not trained in this run")
            return make_reply(ReturnCode.EXECUTION_RESULT_ERROR)
        return DXO(data_kind=DataKind.WEIGHTS, data=self._local_weights, meta={LOCAL_MODEL: "last_round"}).to_shareable()
