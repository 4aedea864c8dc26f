"""NVFlare executor that trains and validates a 3D segmentation network at a site.

It adapts :class:`medflare.training.segmentation_trainer.SegmentationTrainer` to NVFlare's task
contract, in process with the FLARE client:

- ``train``: take the global ``WEIGHTS``, score them on the local validation set (reported as
  ``initial_metrics`` for best-model selection), train locally and return a ``WEIGHT_DIFF`` DXO
  whose meta carries ``NUM_STEPS_CURRENT_ROUND``, the training loss and timings;
- ``validate``: score the model in the task and return a ``METRICS`` DXO with per-region Dice;
- ``submit_model``: return the latest locally trained weights (for cross-site evaluation).

Where the data is comes from the site (:mod:`medflare.data.site_data_config`), never the job.
When the data cannot be found or read, every task fails with an error naming the file and
nothing is sent.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Optional, Sequence

import numpy as np
import torch

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from medflare.training.model_spec import DEFAULT_SEGRESNET

__all__ = ["SegmentationExecutor"]


def _check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive int or null" if allow_none else "a positive int"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_roi(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 8 for v in value)
    ):
        raise ValueError(f"{name} must be a list of three ints >= 8, got {value!r}")


class SegmentationExecutor(Executor):
    """Site-side 3D segmentation training for NVFlare (BraTS TC / WT / ET by default).

    Args:
        model: ``{"path": "...", "args": {...}}`` of the network; must match the server's
            persistor. Defaults to a small SegResNet. (NVFlare builds such a dict into the
            module before it reaches here; a module is accepted as such.)
        local_epochs: passes over the local training data per round.
        max_steps_per_round: cap on optimizer steps per round, or None.
        batch_size: training crops per step.
        learning_rate: Adam learning rate, in (0, 1].
        roi_size: training crop size, three ints >= 8.
        val_roi_size: sliding-window size for validation (default ``roi_size``).
        pixdim: resample to this voxel size in mm, or None to keep the data's grid.
        device: ``"auto"`` (the site's GPU when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        amp: mixed precision on CUDA.
        cache_rate: fraction of pre-processed data kept in memory, in [0, 1].
        seed: seed of crops and augmentation.
        validate_global_model: score the received global model before training each round.
        train_task_name, validate_task_name, submit_model_task_name: task names to answer.
    """

    def __init__(
        self,
        model=None,
        local_epochs: int = 1,
        max_steps_per_round: Optional[int] = None,
        batch_size: int = 2,
        learning_rate: float = 1e-3,
        roi_size: Sequence[int] = (48, 48, 48),
        val_roi_size: Optional[Sequence[int]] = None,
        pixdim: Optional[Sequence[float]] = None,
        device: str = "auto",
        amp: bool = True,
        cache_rate: float = 1.0,
        seed: int = 0,
        validate_global_model: bool = True,
        train_task_name: str = AppConstants.TASK_TRAIN,
        validate_task_name: str = AppConstants.TASK_VALIDATION,
        submit_model_task_name: str = AppConstants.TASK_SUBMIT_MODEL,
    ):
        super().__init__()
        model = copy.deepcopy(DEFAULT_SEGRESNET) if model is None else model
        if not isinstance(model, torch.nn.Module) and not (isinstance(model, dict) and isinstance(model.get("path"), str)):
            raise ValueError(f"model must be {{'path': 'package.module.Class', 'args': {{...}}}}, got {model!r}")
        _check_positive_int("local_epochs", local_epochs)
        _check_positive_int("max_steps_per_round", max_steps_per_round, allow_none=True)
        _check_positive_int("batch_size", batch_size)
        if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not 0 < learning_rate <= 1:
            raise ValueError(f"learning_rate must be a number in (0, 1], got {learning_rate!r}")
        _check_roi("roi_size", roi_size)
        _check_roi("val_roi_size", val_roi_size, allow_none=True)
        if pixdim is not None and (
            not isinstance(pixdim, (list, tuple))
            or len(pixdim) != 3
            or any(isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0 for p in pixdim)
        ):
            raise ValueError(f"pixdim must be null or three positive numbers (mm), got {pixdim!r}")
        if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        if isinstance(cache_rate, bool) or not isinstance(cache_rate, (int, float)) or not 0 <= cache_rate <= 1:
            raise ValueError(f"cache_rate must be a number in [0, 1], got {cache_rate!r}")
        for name, value in (("amp", amp), ("validate_global_model", validate_global_model)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be true or false, got {value!r}")
        for name, value in (
            ("train_task_name", train_task_name),
            ("validate_task_name", validate_task_name),
            ("submit_model_task_name", submit_model_task_name),
        ):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")

        self.model = model
        self.local_epochs = local_epochs
        self.max_steps_per_round = max_steps_per_round
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.roi_size = list(roi_size)
        self.val_roi_size = None if val_roi_size is None else list(val_roi_size)
        self.pixdim = None if pixdim is None else list(pixdim)
        self.device = device
        self.amp = amp
        self.cache_rate = cache_rate
        self.seed = seed
        self.validate_global_model = validate_global_model
        self.train_task_name = train_task_name
        self.validate_task_name = validate_task_name
        self.submit_model_task_name = submit_model_task_name

        self._trainer = None
        self._setup_error: Optional[str] = None
        self._local_weights: Optional[dict] = None

    # lifecycle -----------------------------------------------------------------------------

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self._setup(fl_ctx)
        elif event_type == EventType.END_RUN:
            self._trainer = None

    def _setup(self, fl_ctx: FLContext) -> None:
        """Find the site's data and build the trainer; remember the reason if that fails."""
        from medflare.data.brats_layout import load_datalist
        from medflare.data.site_data_config import resolve_site_data_config
        from medflare.training.model_spec import build_model
        from medflare.training.segmentation_trainer import SegmentationTrainer

        site = fl_ctx.get_identity_name()
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
        local_dir = workspace.get_site_config_dir() if workspace is not None else None
        source = "site data configuration"
        try:
            config = resolve_site_data_config(site, local_dir)
            source = config.source
            train_files, val_files = load_datalist(config.datalist, config.data_root)
            self._trainer = SegmentationTrainer(
                self.model if isinstance(self.model, torch.nn.Module) else build_model(self.model),
                train_files,
                val_files,
                roi_size=self.roi_size,
                val_roi_size=self.val_roi_size,
                batch_size=self.batch_size,
                learning_rate=self.learning_rate,
                device=self.device,
                amp=self.amp,
                cache_rate=self.cache_rate,
                pixdim=self.pixdim,
                seed=self.seed,
            )
            self._setup_error = None
            self.log_info(
                fl_ctx,
                f"{site}: {len(train_files)} training / {len(val_files)} validation cases from {config.datalist}, "
                f"device {self._trainer.device}, amp {self._trainer.amp}",
            )
        except Exception as e:  # any failure here must stop the site from sending anything
            self._trainer = None
            self._setup_error = f"{site}: cannot load the site's data ({source}): {e}"
            self.log_error(fl_ctx, self._setup_error)

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
        from medflare.training.segmentation_trainer import WeightMismatchError

        weights = self._global_weights(shareable, fl_ctx)
        if weights is None:
            return make_reply(ReturnCode.BAD_TASK_DATA)
        current_round = shareable.get_header(AppConstants.CURRENT_ROUND)
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
            meta[MetaKey.INITIAL_METRICS] = metrics

        result = self._trainer.train(self.local_epochs, self.max_steps_per_round, should_abort)
        if result.aborted:
            self.log_info(fl_ctx, f"round {current_round}: training aborted after {result.steps} steps")
            return make_reply(ReturnCode.TASK_ABORTED)
        if result.steps == 0:
            self.log_error(fl_ctx, "no training step was taken (empty training set?); nothing sent")
            return make_reply(ReturnCode.EXECUTION_RESULT_ERROR)
        local_weights = self._trainer.get_weights()
        diff = self._trainer.weight_diff(local_weights, global_weights)
        bad = [k for k, v in diff.items() if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v))]
        if bad or not math.isfinite(result.mean_loss):
            self.log_error(fl_ctx, f"training diverged (loss {result.mean_loss}, non-finite {bad[:3]}); nothing sent")
            return make_reply(ReturnCode.EXECUTION_RESULT_ERROR)
        self._local_weights = local_weights

        meta.update(
            {
                MetaKey.NUM_STEPS_CURRENT_ROUND: result.steps,
                "train_loss": result.mean_loss,
                "train_seconds": result.seconds,
                "validate_seconds": validate_seconds,
                "num_train_cases": self._trainer.num_train_cases,
            }
        )
        initial = meta.get(MetaKey.INITIAL_METRICS, {})
        self.log_info(
            fl_ctx,
            f"round {current_round}: {result.steps} steps, loss {result.mean_loss:.4f} in {result.seconds:.1f}s; "
            f"global model dice {initial.get('dice_mean', float('nan')):.4f}",
        )
        result = DXO(data_kind=DataKind.WEIGHT_DIFF, data=diff, meta=meta).to_shareable()
        result.set_header(AppConstants.CURRENT_ROUND, current_round)  # filters and ledgers name the round
        return result

    def _validate(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        from medflare.training.segmentation_trainer import WeightMismatchError

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

    def _submit_model(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self._local_weights is None:
            self.log_error(fl_ctx, "no local model to submit: this site has not trained in this run")
            return make_reply(ReturnCode.EXECUTION_RESULT_ERROR)
        return DXO(data_kind=DataKind.WEIGHTS, data=self._local_weights).to_shareable()
