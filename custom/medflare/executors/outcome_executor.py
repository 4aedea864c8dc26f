"""NVFlare executor that trains an outcome classifier at a site: chest X-ray, clinical table, or both.

It adapts :class:`medflare.training.outcome_trainer.OutcomeTrainer` to NVFlare's task contract
(``train``, ``validate`` with AUC and accuracy, ``submit_model``; see
:class:`~medflare.executors.site_training_executor.SiteTrainingExecutor`). EXAM's fused model,
the plain chest X-ray classifier and a clinical-table model (FLamby's Fed-Heart-Disease
logistic regression) differ only in the job's ``model`` and column arguments.

The job names the columns, which are the model's inputs and outputs; the site's data
configuration names the table, whose ``train`` cases are trained on and whose ``test`` cases
are scored, locally and in cross-site evaluation. The table is medflare's own
(:mod:`medflare.data.outcome_table`), CheXpert's or MIMIC-CXR-JPG's as they ship
(:mod:`medflare.data.chest_xray_tables`); the job's table arguments say how the latter two are
read (label policy, views, split).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from nvflare.app_common.app_constant import AppConstants

from medflare.data.chest_xray_options import ChestXrayTableOptions
from medflare.data.data_errors import DataListError
from medflare.data.outcome_table import check_columns
from medflare.data.site_data_config import OUTCOME_IMAGE, OUTCOME_TABLE
from medflare.executors.site_training_executor import SiteTrainingExecutor, check_positive_int
from medflare.training.model_weights import TrainResult
from medflare.training.outcome_trainer import check_data_arguments, check_training_arguments

__all__ = ["OutcomeExecutor"]


class OutcomeExecutor(SiteTrainingExecutor):
    """Site-side outcome prediction for NVFlare.

    Args:
        model: ``{"path": "medflare.training.outcome_networks.OutcomeNet", "args": {...}}``
            (or another module called as ``model(image=..., clinical=...)``); must match the
            server's persistor and the columns below.
        label_columns: the outcome columns (one: binary; several: multi-label).
        clinical_columns: the clinical inputs in the model's order ([] for image only).
        image_column: the column of image paths, or null for table only.
        image_size: ``[H, W]`` radiographs are resized to.
        local_epochs: passes over the local training cases per round (when ``local_steps`` is null).
        local_steps: exactly this many optimizer steps per round, cycling through the data
            (FLamby's ``num_updates``), or null.
        batch_size: cases per step.
        learning_rate: in (0, 1].
        optimizer: ``"adam"`` or ``"sgd"``.
        clinical_normalisation: ``"none"`` or ``"site"`` (standardise with the site's own
            training mean and standard deviation, as FLamby prepares Fed-Heart-Disease).
        device, seed, validate_global_model, local_model, task names: as for every medflare
            executor (:class:`~medflare.executors.site_training_executor.SiteTrainingExecutor`);
            ``local_model="site_only"`` gives cross-site evaluation EXAM's single-site models.
        dp_sgd: null or patient-level DP-SGD settings (see
            :class:`~medflare.executors.site_training_executor.SiteTrainingExecutor`); an image
            network needs ``OutcomeNet(norm="group")``. ``local_steps`` steps of Poisson-sampled
            patients per round, or ``ceil(1 / q)`` per epoch; with ``target_epsilon`` those are
            the steps per round the site's noise multiplier is solved for.
        dataset: the name of the site's data set this job trains on, looked up in the site's
            data configuration; the job still names no path. Null: ``"outcome_image"`` with an
            ``image_column``, else ``"outcome_table"``.
        required_preparation: null, or ``{"name", "version"[, "parameters_hash"]}`` the site's
            ``medflare prepare`` manifest must meet (:mod:`medflare.preparation.verification`;
            checked when the run starts, every task refused when it does not).
        table_format: ``"auto"`` (default: detect the site's table), ``"medflare"``,
            ``"chexpert"`` or ``"mimic_cxr"`` (the site's table must be that one).
        label_policy: for CheXpert and MIMIC tables, uncertain labels become ``"u_ones"`` 1,
            ``"u_zeros"`` 0, or ``"ignore"``: left out of the loss and metrics (Irvin et al.
            2019). Null: such a table is refused, the job must choose.
        blank_labels: an observation not mentioned: ``"negative"`` (0, default) or ``"ignore"``.
        views: null (frontal: CheXpert Frontal, MIMIC PA/AP), ``"all"``, or a list such as
            ``["PA"]`` (see :data:`~medflare.data.chest_xray_options.VIEW_POSITIONS`).
        test_fraction, split_seed: the seeded patient-level split (default 0.2 and 0) of a
            CheXpert or MIMIC table without its official split file.

        The table arguments are :class:`~medflare.data.chest_xray_options.ChestXrayTableOptions`;
        they leave medflare's own tables alone (those are already the site's selection), and
        with ``table_format="medflare"`` giving one is refused as a contradiction.

    Raises:
        ValueError: when an argument is out of range, or the model's declared inputs and
            outputs do not match the columns (checked when the job is built).
    """

    key_metric = "auc"

    def __init__(
        self,
        model,
        label_columns: Sequence[str] = ("label",),
        clinical_columns: Sequence[str] = (),
        image_column: Optional[str] = None,
        image_size: Sequence[int] = (64, 64),
        local_epochs: int = 1,
        local_steps: Optional[int] = None,
        batch_size: int = 4,
        learning_rate: float = 1e-3,
        optimizer: str = "adam",
        clinical_normalisation: str = "none",
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
        table_format: str = "auto",
        label_policy: Optional[str] = None,
        blank_labels: str = "negative",
        views=None,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        data_loading: str = "memory",
        cache_rate: float = 0.0,
        num_workers: int = 0,
        check_images: bool = True,
        augmentation=None,
        amp: bool = False,
    ):
        super().__init__(
            model,
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
        check_columns("label_columns", label_columns, allow_empty=False)
        check_columns("clinical_columns", clinical_columns, allow_empty=True)
        if image_column is not None and (not isinstance(image_column, str) or not image_column):
            raise ValueError(f"image_column must be a column name or null, got {image_column!r}")
        if image_column is None and not clinical_columns:
            raise ValueError("the model needs inputs: give image_column, clinical_columns, or both")
        check_positive_int("local_epochs", local_epochs)
        check_positive_int("local_steps", local_steps, allow_none=True)
        check_training_arguments(image_size, batch_size, learning_rate, optimizer, clinical_normalisation)
        # no cache_dir from the job: a job must not choose where a site writes files
        check_data_arguments(data_loading, cache_rate, None, num_workers, check_images, augmentation, amp)
        if augmentation not in (None, False) and image_column is None:
            raise ValueError(f"augmentation {augmentation!r} needs an image: this job has no image_column")
        self._check_model_fits(len(label_columns), len(clinical_columns), image_column is not None)
        self._table_options = _check_table_options(
            len(label_columns), table_format, label_policy, blank_labels, views, test_fraction, split_seed
        )

        self.label_columns = list(label_columns)
        self.clinical_columns = list(clinical_columns)
        self.image_column = image_column
        self.image_size = list(image_size)
        self.local_epochs = local_epochs
        self.local_steps = local_steps
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.optimizer = optimizer
        self.clinical_normalisation = clinical_normalisation
        self.table_format = table_format
        self.label_policy = label_policy
        self.blank_labels = blank_labels
        self.views = views
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.data_loading = data_loading
        self.cache_rate = cache_rate
        self.num_workers = num_workers
        self.check_images = check_images
        self.augmentation = augmentation
        self.amp = amp

    @property
    def kind_dataset(self) -> str:
        return OUTCOME_TABLE if self.image_column is None else OUTCOME_IMAGE

    @property
    def dataset_origin(self) -> str:
        if self.dataset is not None:
            return super().dataset_origin
        with_image = "without image_column" if self.image_column is None else f"with image_column {self.image_column!r}"
        return f"the executor kind, OutcomeExecutor {with_image}"

    def _check_model_fits(self, num_labels: int, num_clinical: int, uses_image: bool) -> None:
        """Refuse, before the job runs, a model whose inputs or outputs contradict the columns.

        NVFlare builds a ``{"path", "args"}`` model into the module before it reaches the
        executor; either form of an ``OutcomeNet`` is checked, another module when it first runs.
        """
        import torch

        if isinstance(self.model, torch.nn.Module):
            if not all(hasattr(self.model, a) for a in ("num_outputs", "clinical_features", "uses_image")):
                return
            declared = (self.model.num_outputs, self.model.clinical_features, self.model.uses_image)
        elif self.model["path"].endswith("OutcomeNet"):
            args = self.model.get("args", {}) or {}
            declared = (args.get("num_outputs", 1), args.get("clinical_features", 0), args.get("image_network") is not None)
        else:
            return
        num_outputs, clinical_features, has_image = declared
        if num_outputs != num_labels:
            raise ValueError(f"the model has num_outputs={num_outputs!r} but label_columns names {num_labels} column(s)")
        if clinical_features != num_clinical:
            raise ValueError(
                f"the model has clinical_features={clinical_features!r} but clinical_columns names {num_clinical} column(s)"
            )
        if has_image != uses_image:
            raise ValueError(
                f"the model {'has an' if has_image else 'has no'} image_network but image_column is "
                f"{'null' if not uses_image else 'set'}; they must agree"
            )

    def _build_trainer(self, config, network):
        from medflare.data.chest_xray_tables import load_site_table
        from medflare.training.outcome_trainer import OutcomeTrainer

        table = load_site_table(
            config.datalist, config.data_root, self.clinical_columns, self.label_columns, self.image_column, self._table_options
        )
        self.logger.info(f"{table.description}: cases per split after each step {table.counts}")
        cases = table.cases
        # kept for a round a site's privacy scope puts under DP-SGD (dp_sgd in _train_locally)
        self._several_images_per_patient = _several_images_per_patient(cases["train"], table.description)
        if self.dp_sgd is not None and self._several_images_per_patient:
            raise DataListError(self._several_images_per_patient)
        return OutcomeTrainer(
            network,
            cases["train"],
            cases["test"],
            self.label_columns,
            image_size=self.image_size,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            optimizer=self.optimizer,
            clinical_normalisation=self.clinical_normalisation,
            device=self.device,
            seed=self.seed,
            dp_sgd=self._dp_settings,
            data_loading=self.data_loading,
            cache_rate=self.cache_rate,
            num_workers=self.num_workers,
            check_images=self.check_images,
            augmentation=None if self.augmentation is False else self.augmentation,
            amp=self.amp,
        )

    def _build_site_only_trainer(self, config):
        return self._trainer.sibling(self._build_network())  # the cases are already loaded

    def _train_locally(self, trainer, should_abort: Callable[[], bool], dp_sgd=None) -> TrainResult:
        if (dp_sgd is not None or getattr(trainer, "dp_sgd", None) is not None) and getattr(self, "_several_images_per_patient", None):
            raise DataListError(self._several_images_per_patient)
        return trainer.train(self.local_epochs, self.local_steps, should_abort, dp_sgd=dp_sgd)

    def _dp_sgd_steps_per_round(self, trainer, expected_patients_per_step: int) -> int:
        return trainer.dp_sgd_steps(self.local_epochs, self.local_steps, expected_patients_per_step)


def _check_table_options(num_labels, table_format, label_policy, blank_labels, views, test_fraction, split_seed):
    """The job's table arguments as options, refused (ValueError naming the argument, its value
    and what is allowed) before any data is read."""
    options = ChestXrayTableOptions(table_format, label_policy, blank_labels, views, test_fraction, split_seed)
    if table_format == "medflare":
        given = {
            name: value
            for name, value, default in (
                ("label_policy", label_policy, None),
                ("blank_labels", blank_labels, "negative"),
                ("views", views, None),
                ("test_fraction", test_fraction, 0.2),
                ("split_seed", split_seed, 0),
            )
            if value != default
        }
        if given:
            raise ValueError(
                f"table_format 'medflare' takes no CheXpert/MIMIC table arguments (its table already holds the site's "
                f"split, views and 0/1 labels), got {given!r}"
            )
    return options


def _several_images_per_patient(cases, description: str) -> Optional[str]:
    """Why patient-level DP-SGD cannot train on ``cases`` (several training images of one
    patient: CheXpert, MIMIC), or None when one case is one patient."""
    counts: dict = {}
    for case in cases:
        if case.patient_id is not None:
            counts[case.patient_id] = counts.get(case.patient_id, 0) + 1
    repeated = {patient: n for patient, n in counts.items() if n > 1}
    if not repeated:
        return None
    patient, n = next(iter(repeated.items()))
    return (
        f"{description}: patient-level DP-SGD counts one training case as one patient, but {len(repeated)} patient(s) "
        f"have several images (e.g. {patient}: {n}); the guarantee would not hold. Keep one image per patient "
        "(e.g. views ['PA'] and one study) in a medflare table, or train without dp_sgd"
    )
