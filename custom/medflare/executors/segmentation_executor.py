"""NVFlare executor that trains and validates a 3D segmentation network at a site.

It adapts :class:`medflare.training.segmentation_trainer.SegmentationTrainer` to NVFlare's task
contract (``train``, ``validate`` with per-region Dice, ``submit_model``), which
:class:`~medflare.executors.site_training_executor.SiteTrainingExecutor` implements: the site's
data from the site's configuration, never the job, and nothing sent when anything fails.

A job may name a MONAI bundle the site installed instead of a network class: ``"model":
{"bundle": "brats_mri_segmentation", "version": "0.5.3", "network_key": "network_def",
"use_preprocessing": true, "load_weights": false, "network": {"path": ..., "args": ...}}``.
When the run starts the site resolves the name in its bundle registry
(:mod:`medflare.training.bundle_registry`: allow-listed, version, checksum), builds the
bundle's network (:mod:`medflare.training.monai_bundles`) and checks it: 4 input and 3 output
channels on a ``roi_size`` crop, and the same parameter names and shapes as ``network``, the
plain spec the server's persistor builds. With ``use_preprocessing`` validation uses the
bundle's preprocessing (``pixdim`` then does not apply to validation). Any refusal stops every
task of the run, naming the bundle, the registry file and what differs; nothing is sent.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

from nvflare.app_common.app_constant import AppConstants

from medflare.data.site_data_config import SEGMENTATION
from medflare.executors.site_training_executor import SiteTrainingExecutor, check_positive_int
from medflare.training.model_spec import DEFAULT_SEGRESNET, build_model, is_bundle_spec, split_bundle_spec
from medflare.training.model_weights import TrainResult

__all__ = ["SegmentationExecutor"]


def _check_roi(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 8 for v in value)
    ):
        raise ValueError(f"{name} must be a list of three ints >= 8, got {value!r}")


class SegmentationExecutor(SiteTrainingExecutor):
    """Site-side 3D segmentation training for NVFlare (BraTS TC / WT / ET by default).

    Args:
        model: ``{"path": "...", "args": {...}}`` of the network; must match the server's
            persistor. Defaults to a small SegResNet. (NVFlare builds such a dict into the
            module before it reaches here; a module is accepted as such.) Or a site bundle's
            name: ``{"bundle": name, "version": null, "network_key": "network_def",
            "use_preprocessing": false, "load_weights": false, "network": {"path", "args"}}``
            (see the module docstring; ``network`` is what the server's persistor builds).
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
        local_model: what ``submit_model`` returns, ``"last_round"`` or ``"site_only"`` (see
            :class:`~medflare.executors.site_training_executor.SiteTrainingExecutor`).
        train_task_name, validate_task_name, submit_model_task_name: task names to answer.
        dp_sgd: null or patient-level DP-SGD settings (see
            :class:`~medflare.executors.site_training_executor.SiteTrainingExecutor`); the
            network must be DP-compatible (``medflare.training.seeded_networks.SeededDPSegResNet``).
            Under DP-SGD an epoch is ``ceil(1 / q)`` steps of Poisson-sampled patients (at most
            ``max_steps_per_round`` a round); with ``target_epsilon`` those are the steps per
            round the site's noise multiplier is solved for.
        crops_per_patient: random crops of each patient per step (a patient's crops are summed
            before clipping under DP-SGD).
        dataset: the name of the site's data set this job trains on, looked up in the site's
            data configuration; the job still names no path. Null: ``"segmentation"``.
        required_preparation: null, or ``{"name", "version"[, "parameters_hash"]}`` the site's
            ``medflare prepare`` manifest must meet (:mod:`medflare.preparation.verification`;
            checked when the run starts, every task refused when it does not).
    """

    key_metric = "dice_mean"

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
        local_model: str = "last_round",
        train_task_name: str = AppConstants.TASK_TRAIN,
        validate_task_name: str = AppConstants.TASK_VALIDATION,
        submit_model_task_name: str = AppConstants.TASK_SUBMIT_MODEL,
        dp_sgd: Optional[dict] = None,
        crops_per_patient: int = 1,
        dataset: Optional[str] = None,
        required_preparation: Optional[dict] = None,
    ):
        from medflare.training.bundle_registry import parse_bundle_request

        self._bundle_request = None
        self._bundle_network_spec = None
        self._loaded_bundle = None  # resolved at START_RUN, at the site
        self._bundle_network = None
        if is_bundle_spec(model):
            request, self._bundle_network_spec = split_bundle_spec(model)
            self._bundle_request = parse_bundle_request(request, "model")
        super().__init__(
            copy.deepcopy(DEFAULT_SEGRESNET) if model is None else (self._bundle_network_spec or model),
            device=device,
            seed=seed,
            validate_global_model=validate_global_model,
            local_model=local_model,
            train_task_name=train_task_name,
            validate_task_name=validate_task_name,
            submit_model_task_name=submit_model_task_name,
            dp_sgd=dp_sgd,
            dataset=dataset,
            required_preparation=required_preparation,
        )
        check_positive_int("local_epochs", local_epochs)
        check_positive_int("max_steps_per_round", max_steps_per_round, allow_none=True)
        check_positive_int("batch_size", batch_size)
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
        if isinstance(cache_rate, bool) or not isinstance(cache_rate, (int, float)) or not 0 <= cache_rate <= 1:
            raise ValueError(f"cache_rate must be a number in [0, 1], got {cache_rate!r}")
        if not isinstance(amp, bool):
            raise TypeError(f"amp must be true or false, got {amp!r}")

        self.local_epochs = local_epochs
        self.max_steps_per_round = max_steps_per_round
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.roi_size = list(roi_size)
        self.val_roi_size = None if val_roi_size is None else list(val_roi_size)
        self.pixdim = None if pixdim is None else list(pixdim)
        self.amp = amp
        self.cache_rate = cache_rate
        check_positive_int("crops_per_patient", crops_per_patient)
        self.crops_per_patient = crops_per_patient
        if self._bundle_request is not None:
            self.model = model  # as the job gave it; the plain network is self._bundle_network_spec

    @property
    def kind_dataset(self) -> str:
        return SEGMENTATION

    # a site bundle ------------------------------------------------------------------------------

    def _build_network(self):
        """The site bundle's network once resolved (a copy), else the job's plain network."""
        if self._bundle_network is not None:
            return copy.deepcopy(self._bundle_network)
        if self._bundle_request is not None:
            return build_model(self._bundle_network_spec)
        return super()._build_network()

    def _setup(self, fl_ctx) -> None:
        """Resolve and check the job's bundle at this site (when it names one), then set up as usual."""
        if self._bundle_request is not None:
            try:
                self._resolve_bundle(fl_ctx)
            except Exception as e:  # a bundle the site cannot vouch for trains nothing
                self._trainer = None
                self._loaded_bundle = self._bundle_network = None
                self._setup_error = f"{fl_ctx.get_identity_name()}: cannot use the job's bundle {self._bundle_request.name!r}: {e}"
                self.log_error(fl_ctx, self._setup_error)
                return
        super()._setup(fl_ctx)

    def _resolve_bundle(self, fl_ctx) -> None:
        from nvflare.apis.fl_constant import FLContextKey

        from medflare.data.brats_layout import MODALITIES
        from medflare.training.brats_transforms import REGIONS
        from medflare.training.monai_bundles import check_network_channels, check_same_architecture, load_bundle

        site = fl_ctx.get_identity_name()
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
        local_dir = workspace.get_site_config_dir() if workspace is not None else None
        loaded = load_bundle(self._bundle_request, site, local_dir)
        network = loaded.build_network()
        what = f"bundle {loaded.name!r}'s {self._bundle_request.network_key!r}"
        check_network_channels(network, len(MODALITIES), len(REGIONS), self.roi_size, what)
        check_same_architecture(network, build_model(self._bundle_network_spec), what, f"the job's network {self._bundle_network_spec['path']}")
        if self._bundle_request.use_preprocessing:
            loaded.preprocessing()  # refused now, not when the data is cached
        self._loaded_bundle, self._bundle_network = loaded, network
        self.log_info(
            fl_ctx,
            f"{site}: bundle {loaded.name!r} version {loaded.bundle.version} from {loaded.bundle.folder} "
            f"(registry {loaded.bundle.registry}; weights {'loaded' if self._bundle_request.load_weights else 'not loaded'}, "
            f"preprocessing {'used for validation' if self._bundle_request.use_preprocessing else 'not used'})",
        )

    def _bundle_val_transform(self):
        if self._loaded_bundle is None or not self._bundle_request.use_preprocessing:
            return None
        from medflare.data.brats_layout import MODALITIES
        from medflare.training.brats_transforms import val_transforms
        from medflare.training.monai_bundles import bundle_validation_transforms

        return bundle_validation_transforms(self._loaded_bundle, val_transforms(None), len(MODALITIES))

    def _build_trainer(self, config, network):
        from medflare.data.brats_layout import load_datalist
        from medflare.training.segmentation_trainer import SegmentationTrainer

        train_files, val_files = load_datalist(config.datalist, config.data_root)
        return SegmentationTrainer(
            network,
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
            dp_sgd=self._dp_settings,
            crops_per_patient=self.crops_per_patient,
            val_transform=self._bundle_val_transform(),
        )

    def _train_locally(self, trainer, should_abort: Callable[[], bool], dp_sgd=None) -> TrainResult:
        return trainer.train(self.local_epochs, self.max_steps_per_round, should_abort, dp_sgd=dp_sgd)

    def _dp_sgd_steps_per_round(self, trainer, expected_patients_per_step: int) -> int:
        return trainer.dp_sgd_steps(self.local_epochs, self.max_steps_per_round, expected_patients_per_step)
