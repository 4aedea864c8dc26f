"""Local training and scoring of an outcome classifier (image, clinical table, or both), without NVFlare.

:class:`OutcomeTrainer` holds one site's cases in memory (radiographs resized once, clinical
values as a matrix), trains an :class:`~medflare.training.outcome_networks.OutcomeNet` with
binary cross-entropy on logits, and scores it on the site's test split:

* **AUC**: area under the ROC curve per label (scikit-learn's ``roc_auc_score``); NaN for a
  label whose test cases are all of one class, since the AUC is undefined there;
* **accuracy**: share of cases with :math:`\\mathbb{1}[\\sigma(z) > 0.5] = y`, per label; this
  is FLamby's Fed-Heart-Disease metric.

With several labels (multi-label), ``auc`` and ``accuracy`` are the means over labels with a
finite value (macro average), and ``auc_<label>`` / ``accuracy_<label>`` are reported too.

Local training takes either whole passes over the data (``epochs``) or a fixed number of
optimizer steps cycling through it (``steps``, FLamby's "num_updates" per round).

With ``dp_sgd`` settings a round is patient-level DP-SGD (:mod:`medflare.privacy.dp_sgd`): each
step Poisson-samples the training cases (one case is one patient: a table with several rows per
patient would void the guarantee), clips each case's gradient, adds Gaussian noise and lets the
optimizer apply it; an epoch is :math:`\\lceil 1/q \\rceil` steps and ``steps`` counts steps as before.

**Images in memory or streamed.** ``data_loading="memory"`` (the default, and what every job
did before) reads and resizes every radiograph once and keeps them as one tensor on the training
device: :math:`N H W \\cdot 4` bytes, 1.3 GB for 5,000 images at 256x256, 52 GB for CheXpert's
200k. ``data_loading="stream"`` keeps only clinical values and labels in memory and reads each
batch's images through a MONAI dataset (:mod:`medflare.training.xray_dataset`; ``cache_rate``,
``cache_dir``) with a torch ``DataLoader`` of ``num_workers`` processes whose seeds come from a
generator seeded by ``seed``. The batches are the same cases in the same order in both modes
(the trainer draws the indices; DP-SGD's Poisson sample is drawn over the dataset's indices and
fetched through it), so with augmentation off both modes train the same model. A streamed
trainer first reads every image once without keeping it (``check_images``), so a corrupt file
is still refused before training, naming the file and the case.

**Augmentation** (``augmentation``, off by default; :mod:`medflare.training.xray_augmentation`)
applies to training batches only, never to validation or prediction. With ``num_workers=0`` it
runs in this process from a state seeded by ``seed`` (memory and stream give the same images);
with workers each worker's copy is seeded from the loader's generator.

**Mixed precision** (``amp``, CUDA only, off by default so existing jobs keep their numbers):
the forward pass runs under ``torch.autocast`` and the loss is scaled by a
``torch.amp.GradScaler``. It is not used for DP-SGD steps: the accountant's guarantee assumes
each patient's gradient is clipped to norm :math:`C` exactly, and per-sample gradients computed
in float16 (and unscaled afterwards) make that norm, and thus the sensitivity, approximate;
a loss-scale overflow would also skip a step whose noise and sampling were already spent.

**Masked labels.** A label of ``-1`` means "ignore this label for this case" (CheXpert's
uncertain labels under the ``ignore`` policy). The loss is the mean binary cross-entropy over
the entries with a label,

.. math::
    L = \\frac{\\sum_{i,k} m_{ik}\\, \\ell(z_{ik}, y_{ik})}{\\max(1, \\sum_{i,k} m_{ik})},
    \\qquad m_{ik} = \\mathbb{1}[y_{ik} \\ne -1],

so a masked entry adds neither loss nor gradient (per patient too, under DP-SGD), and each
label's AUC and accuracy are computed over its cases with a label only.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from medflare.data.data_errors import DataListError
from medflare.data.outcome_table import IGNORE_LABEL, OutcomeCase
from medflare.privacy.dp_sgd import (
    DPSGDSettings,
    dp_sgd_record,
    parse_dp_sgd_settings,
    patient_sample_rate,
    planned_steps,
)
from medflare.training.device import select_device, use_amp
from medflare.training.dp_sgd_step import DPSGDRandomness, DPSGDStep
from medflare.training.model_weights import TrainResult, get_weights, set_weights, weight_diff
from medflare.training.xray_augmentation import XrayAugmentation, parse_augmentation
from medflare.training.xray_dataset import (
    AugmentedDataset,
    StreamedImages,
    check_loading_arguments,
    check_xrays,
    collate_xrays,
    read_resized_xray,
    xray_dataset,
)

__all__ = [
    "OutcomeTrainer",
    "NORMALISATIONS",
    "OPTIMIZERS",
    "check_data_arguments",
    "check_training_arguments",
    "classification_metrics",
    "masked_bce_with_logits",
]

NORMALISATIONS = ("none", "site")
OPTIMIZERS = ("adam", "sgd")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_training_arguments(image_size, batch_size, learning_rate, optimizer, clinical_normalisation) -> None:
    """Refuse out-of-range training arguments, naming the argument, the value and what is allowed
    (the executor calls this when the job is built, before any data is read)."""
    if (
        not isinstance(image_size, (list, tuple))
        or len(image_size) != 2
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 8 for s in image_size)
    ):
        raise ValueError(f"image_size must be a list of two ints >= 8, got {image_size!r}")
    _positive_int("batch_size", batch_size)
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not 0 < learning_rate <= 1:
        raise ValueError(f"learning_rate must be a number in (0, 1], got {learning_rate!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
    if clinical_normalisation not in NORMALISATIONS:
        raise ValueError(f"clinical_normalisation must be one of {list(NORMALISATIONS)}, got {clinical_normalisation!r}")


def check_data_arguments(
    data_loading="memory", cache_rate=0.0, cache_dir=None, num_workers=0, check_images=True, augmentation=None, amp=False
) -> None:
    """Refuse out-of-range data-loading, augmentation and mixed-precision arguments, naming the
    argument, its value and what is allowed (for the executor, when the job is built).

    Raises:
        ValueError: as described; bool is refused for numbers, NaN and inf too.
    """
    check_loading_arguments(data_loading, cache_rate, cache_dir, num_workers, check_images)
    parse_augmentation(augmentation)
    if not isinstance(amp, bool):
        raise ValueError(f"amp must be true or false, got {amp!r}")


def masked_bce_with_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the entries whose label is not :data:`IGNORE_LABEL`.

    :math:`L = \sum m_{ik} \ell(z_{ik}, y_{ik}) / \max(1, \sum m_{ik})` with
    :math:`m_{ik} = 1[y_{ik} \ne -1]`: a masked entry adds zero loss and zero gradient; a batch
    with every entry masked has loss 0. No data-dependent branch, so ``torch.func.vmap`` (DP-SGD's
    per-sample losses) can run it.
    """
    mask = (labels != IGNORE_LABEL).to(logits.dtype)
    per_entry = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.clamp(min=0), reduction="none")
    return (per_entry * mask).sum() / mask.sum().clamp(min=1)


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, label_names: Sequence[str]) -> dict[str, float]:
    """AUC and accuracy per label and their means over labels, as described in the module docstring.

    Args:
        labels: ``(N, K)`` of 0/1, or -1 where a case has no label (left out of that label's scores).
        probabilities: ``(N, K)`` predicted probabilities.
        label_names: the K names.

    Each label is scored over its cases with a label only: its AUC is NaN when those hold one
    class (or none), its accuracy NaN when there are none. ``auc`` and ``accuracy`` are the means
    of the finite per-label values (NaN when none is).
    """
    from sklearn.metrics import accuracy_score, roc_auc_score

    labels = np.asarray(labels).reshape(len(labels), -1)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(len(probabilities), -1)
    aucs, accuracies = [], []
    for k in range(labels.shape[1]):
        kept = labels[:, k] != IGNORE_LABEL
        y, p = labels[kept, k], probabilities[kept, k]
        aucs.append(float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else math.nan)
        accuracies.append(float(accuracy_score(y, (p > 0.5).astype(y.dtype))) if len(y) else math.nan)
    metrics = {}
    if len(label_names) > 1:
        for name, auc, acc in zip(label_names, aucs, accuracies):
            metrics[f"auc_{name}"] = auc
            metrics[f"accuracy_{name}"] = acc
    finite = [a for a in aucs if math.isfinite(a)]
    metrics["auc"] = float(np.mean(finite)) if finite else math.nan
    finite = [a for a in accuracies if math.isfinite(a)]
    metrics["accuracy"] = float(np.mean(finite)) if finite else math.nan
    return metrics


class OutcomeTrainer:
    """Trains and scores an outcome network on one site's cases.

    Args:
        model: an ``OutcomeNet`` (or any module ``model(image=..., clinical=...) -> logits``
            with ``uses_image`` / ``uses_clinical`` attributes).
        train_cases, test_cases: the site's split, from :func:`load_outcome_table`; a label may
            be -1 (no label: ignored by the loss and the metrics).
        label_names: the label columns, for per-label metrics.
        image_size: ``(H, W)`` the radiographs are resized to.
        batch_size: cases per step.
        learning_rate: in (0, 1].
        optimizer: ``"adam"`` or ``"sgd"`` (plain SGD, as FLamby's federated strategies).
        clinical_normalisation: ``"none"`` (values used as given) or ``"site"``
            (standardised with this site's training mean and standard deviation; a constant
            column is only centred).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        seed: seed of the shuffling (and of DP-SGD's sampling and noise when not secure, of
            the augmentation and of the loader workers).
        dp_sgd: :class:`~medflare.privacy.dp_sgd.DPSGDSettings` (or its JSON mapping) to train
            with patient-level DP-SGD by default; ``train(dp_sgd=...)`` may give other settings.
        data_loading: ``"memory"`` (default: every image read once, kept on the device) or
            ``"stream"`` (images read per batch through a MONAI dataset).
        cache_rate: streamed only: share in [0, 1] of each split's images kept resized in RAM
            (MONAI ``CacheDataset``), 0 for none.
        cache_dir: streamed only: a folder for MONAI ``PersistentDataset``'s cache of resized
            images, or None. A site-side path: not to be taken from a job.
        num_workers: streamed only: loader processes in [0, 64] (0: read in this process).
        check_images: streamed only: read every image once when built, without keeping it, so
            a bad file is refused before training (default); False defers that to its batch.
        augmentation: None/False (off), True (defaults) or a mapping
            (:func:`~medflare.training.xray_augmentation.parse_augmentation`); training only.
        amp: mixed precision on CUDA (a no-op on the CPU); never under DP-SGD.

    Raises:
        ValueError: an argument out of range.
        DataListError: an image cannot be read (naming the file and case), a label is not 0, 1 or -1.
        DPIncompatibleNetworkError: ``dp_sgd`` is given and the network cannot be trained with
            it (BatchNorm: use ``OutcomeNet(norm="group")``), naming the layer and the fix.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_cases: Sequence[OutcomeCase],
        test_cases: Sequence[OutcomeCase],
        label_names: Sequence[str],
        image_size: Sequence[int] = (64, 64),
        batch_size: int = 4,
        learning_rate: float = 1e-3,
        optimizer: str = "adam",
        clinical_normalisation: str = "none",
        device: str = "auto",
        seed: int = 0,
        dp_sgd: Optional[DPSGDSettings] = None,
        data_loading: str = "memory",
        cache_rate: float = 0.0,
        cache_dir: Optional[str] = None,
        num_workers: int = 0,
        check_images: bool = True,
        augmentation=None,
        amp: bool = False,
    ):
        check_training_arguments(image_size, batch_size, learning_rate, optimizer, clinical_normalisation)
        check_data_arguments(data_loading, cache_rate, cache_dir, num_workers, check_images, augmentation, amp)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        dp_sgd = parse_dp_sgd_settings(dp_sgd)
        if dp_sgd is not None:
            from medflare.training.dp_networks import check_dp_compatible

            check_dp_compatible(model)  # before any image is read
        if not train_cases or not test_cases:
            raise ValueError("train_cases and test_cases must both be non-empty")
        self.label_names = list(label_names)
        self.uses_image = bool(getattr(model, "uses_image", True))
        self.uses_clinical = bool(getattr(model, "uses_clinical", False))
        augmentation = parse_augmentation(augmentation)
        if augmentation is not None and not self.uses_image:
            raise ValueError("augmentation is given but the model takes no image: there is nothing to augment")
        num_outputs = getattr(model, "num_outputs", len(self.label_names))
        for split, cases in (("train", train_cases), ("test", test_cases)):
            widths = {len(c.labels) for c in cases}
            if widths != {len(self.label_names)} or num_outputs != len(self.label_names):
                raise ValueError(
                    f"{split} cases carry {sorted(widths)} label(s) and the model {num_outputs} output(s); "
                    f"label_names has {len(self.label_names)}"
                )
            for case in cases:
                if any(isinstance(v, bool) or v not in (0, 1, IGNORE_LABEL) for v in case.labels):
                    raise DataListError(f"{split} case {case.case_id!r}: labels must be 0, 1 or -1 (no label), got {case.labels!r}")
            if self.uses_image and any(c.image is None for c in cases):
                raise ValueError(f"the model takes an image but {split} cases have none (no image column?)")
        self.image_size = tuple(image_size)
        self.device = select_device(device)
        self.model = model.to(self.device)
        self.batch_size = batch_size
        self.seed = seed
        self.data_loading = data_loading
        self.cache_rate = cache_rate
        self.cache_dir = cache_dir
        self.num_workers = num_workers
        self.check_images = check_images
        self.augmentation = augmentation
        self.amp = use_amp(self.device, amp)
        self._optimizer_class = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
        self._learning_rate = learning_rate
        self.optimizer = self._optimizer_class(self.model.parameters(), lr=learning_rate)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

        streamed = self.uses_image and data_loading == "stream"
        if streamed and check_images:
            for split, cases in (("train", train_cases), ("test", test_cases)):
                check_xrays(cases, split, num_workers)
        self.train_data = self._tensors(train_cases, streamed)
        self.test_data = self._tensors(test_cases, streamed)
        # the (shared, possibly cached) datasets of a streamed trainer; None in memory
        self._sources = {
            "train": self.train_data["image"].dataset if streamed else None,
            "test": self.test_data["image"].dataset if streamed else None,
        }
        # an unmasked table keeps the exact loss it always had (bit for bit)
        masked = bool((self.train_data["labels"] == IGNORE_LABEL).any())
        self.loss_fn = masked_bce_with_logits if masked else torch.nn.BCEWithLogitsLoss()
        if self.uses_clinical and clinical_normalisation == "site":
            clinical = self.train_data["clinical"]
            mean = clinical.mean(dim=0)
            std = clinical.std(dim=0, unbiased=False)
            std = torch.where(std > 0, std, torch.ones_like(std))
            for data in (self.train_data, self.test_data):
                data["clinical"] = (data["clinical"] - mean) / std
        for data in (self.train_data, self.test_data):  # on the device once, not batch by batch
            for key, tensor in data.items():
                if torch.is_tensor(tensor):
                    data[key] = tensor.to(self.device)
        self.num_train_cases = len(train_cases)
        self.num_test_cases = len(test_cases)
        self._fresh_randomness()
        self.dp_sgd = dp_sgd

    def _fresh_randomness(self) -> None:
        """Shuffling, DP-SGD, augmentation and loader-worker randomness, all from ``seed``."""
        self._generator = torch.Generator().manual_seed(self.seed)
        self._order: list[int] = []
        self._dp_randomness = DPSGDRandomness(self.seed, self.device)
        self._loader_generator = torch.Generator().manual_seed(self.seed + 2)
        self._augment = None if self.augmentation is None else XrayAugmentation(self.augmentation, self.image_size, self.seed + 3)

    def sibling(self, model: torch.nn.Module) -> "OutcomeTrainer":
        """A trainer for another ``model`` of the same inputs and outputs on the same cases, which
        are shared, not read again, with its own optimizer and a fresh shuffling (and augmentation)
        from the seed (the executor's site-only model)."""
        for name in ("uses_image", "uses_clinical", "num_outputs", "clinical_features"):
            if getattr(model, name, None) != getattr(self.model, name, None):
                raise ValueError(f"a sibling model must match the trainer's model in {name}")
        twin = copy.copy(self)
        twin.model = model.to(self.device)
        twin.optimizer = self._optimizer_class(twin.model.parameters(), lr=self._learning_rate)
        twin.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        twin._fresh_randomness()
        return twin

    def _tensors(self, cases: Sequence[OutcomeCase], streamed: bool) -> dict:
        data: dict = {
            "labels": torch.tensor([c.labels for c in cases], dtype=torch.float32),
            "clinical": torch.tensor([c.clinical for c in cases], dtype=torch.float32) if self.uses_clinical else None,
            "image": None,
        }
        if self.uses_clinical and data["clinical"].shape[1] != getattr(self.model, "clinical_features", data["clinical"].shape[1]):
            raise ValueError(
                f"cases carry {data['clinical'].shape[1]} clinical values, the model takes {self.model.clinical_features}"
            )
        if self.uses_image and streamed:
            dataset = xray_dataset(cases, self.image_size, self.cache_rate, self.cache_dir)
            data["image"] = StreamedImages(dataset, self.image_size)
        elif self.uses_image:
            images = torch.empty((len(cases), 1, *self.image_size))  # filled in place: no second copy
            for i, case in enumerate(cases):
                try:
                    images[i] = read_resized_xray(case.image, self.image_size)
                except DataListError as e:
                    raise DataListError(f"{case.split} case {case.case_id!r}: {e}") from None
            data["image"] = images
        return data

    # weights -------------------------------------------------------------------------------

    def get_weights(self) -> dict[str, np.ndarray]:
        """The model's state as numpy arrays on the CPU (copies)."""
        return get_weights(self.model)

    def set_weights(self, weights: Mapping[str, object]) -> None:
        """Load a full state; raises ``WeightMismatchError`` when it does not fit exactly."""
        set_weights(self.model, weights)

    weight_diff = staticmethod(weight_diff)

    # batches -------------------------------------------------------------------------------

    def _batch(self, data, index, images: Optional[torch.Tensor] = None) -> tuple[dict, torch.Tensor]:
        inputs = {}
        index = index.to(self.device)
        for key in ("image", "clinical"):
            if key == "image" and images is not None:
                inputs[key] = images.to(self.device, non_blocking=True)
            elif data[key] is not None:
                inputs[key] = data[key][index].to(self.device)
        return inputs, data["labels"][index]

    def _batches(self, split: str, index_lists: Iterable, augment: bool) -> Iterator[tuple[dict, torch.Tensor, int]]:
        """``(inputs, labels, n)`` on the device for each list of case indices of ``split``, read
        lazily (in memory: sliced; streamed: through the dataset and a DataLoader), augmented
        when ``augment`` and the trainer has an augmentation. An empty list gives ``n = 0``."""
        data = self.train_data if split == "train" else self.test_data
        augment = augment and self._augment is not None
        source = self._sources[split]
        if source is None:
            for indices in index_lists:
                index = torch.as_tensor(indices, dtype=torch.long)
                inputs, labels = self._batch(data, index)
                if augment and len(index):
                    inputs["image"] = torch.stack([self._augment(image) for image in inputs["image"]])
                yield inputs, labels, len(index)
            return
        from monai.data.utils import worker_init_fn  # seeds each worker's augmentation from its torch seed

        loader = torch.utils.data.DataLoader(
            AugmentedDataset(source, self._augment) if augment else source,
            batch_sampler=index_lists,
            num_workers=self.num_workers,
            collate_fn=collate_xrays,
            generator=self._loader_generator,
            worker_init_fn=worker_init_fn if self.num_workers else None,
            pin_memory=self.device.type == "cuda",
        )
        for index, images in loader:
            inputs, labels = self._batch(data, index, images)
            yield inputs, labels, len(index)

    def read_images(self, split: str, indices: Sequence[int]) -> Optional[torch.Tensor]:
        """The images (as trained on before augmentation) of cases ``indices`` of ``split``
        (``"train"`` or ``"test"``), ``(n, 1, H, W)`` on the CPU; None for a model without image."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        data = self.train_data if split == "train" else self.test_data
        if data["image"] is None:
            return None
        return data["image"][torch.as_tensor(list(indices), dtype=torch.long)].detach().cpu()

    # training ------------------------------------------------------------------------------

    def _next_indices(self) -> list[int]:
        """The next batch of a shuffled pass; a new permutation starts when one is used up."""
        if not self._order:
            self._order = torch.randperm(self.num_train_cases, generator=self._generator).tolist()
        batch, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return batch

    def train(
        self,
        epochs: int = 1,
        steps: Optional[int] = None,
        should_abort: Callable[[], bool] = lambda: False,
        dp_sgd: Optional[DPSGDSettings] = None,
    ) -> TrainResult:
        """``epochs`` shuffled passes over the training cases, or exactly ``steps`` steps when given.

        A step takes the next ``batch_size`` cases of the current shuffled pass (the last batch
        of a pass may be smaller); ``steps`` runs across passes. ``should_abort`` is asked
        before every step. With ``dp_sgd`` (default: the constructor's) each step is a DP-SGD
        step of Poisson-sampled cases and the result carries the DP-SGD record.
        """
        _positive_int("epochs", epochs)
        if steps is not None:
            _positive_int("steps", steps)
        dp_sgd = parse_dp_sgd_settings(dp_sgd) if dp_sgd is not None else self.dp_sgd
        if dp_sgd is not None:
            return self._train_dp_sgd(dp_sgd, epochs, steps, should_abort)
        if steps is None:
            self._order = []  # whole passes start fresh
            steps = epochs * math.ceil(self.num_train_cases / self.batch_size)
        start = time.perf_counter()
        self.model.train()
        total = 0.0
        # lazy: a batch's indices are drawn (and, without workers, its images read) when it is due
        batches = self._batches("train", (self._next_indices() for _ in range(steps)), augment=True)
        try:
            for step in range(steps):
                if should_abort():
                    return TrainResult(step, total / step if step else math.nan, time.perf_counter() - start, True)
                inputs, labels, _ = next(batches)
                self.optimizer.zero_grad(set_to_none=True)
                with torch.autocast(self.device.type, enabled=self.amp):
                    logits = self.model(**inputs)
                loss = self.loss_fn(logits.float(), labels)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                total += float(loss.detach())
        finally:
            batches.close()
        return TrainResult(steps, total / steps, time.perf_counter() - start, False)

    def dp_sgd_steps(self, epochs: int, steps: Optional[int], expected_patients_per_step: int) -> int:
        """The DP-SGD steps ``train(epochs, steps, dp_sgd)`` takes unless aborted, for settings of
        ``expected_patients_per_step``: ``steps`` when given, else ``epochs * ceil(1 / q)``."""
        if steps is not None:
            return _positive_int("steps", steps)
        q = patient_sample_rate(expected_patients_per_step, self.num_train_cases)
        return planned_steps(_positive_int("epochs", epochs), q)

    def _train_dp_sgd(
        self, settings: DPSGDSettings, epochs: int, steps: Optional[int], should_abort: Callable[[], bool]
    ) -> TrainResult:
        # full precision: the clipping norm C bounds the sensitivity only if computed exactly
        step = DPSGDStep(self.model, self.loss_fn, settings, self.num_train_cases, self._dp_randomness)
        planned = self.dp_sgd_steps(epochs, steps, settings.expected_patients_per_step)
        start = time.perf_counter()
        self.model.train()
        total, seen = 0.0, 0

        def result(aborted: bool) -> TrainResult:
            record = dp_sgd_record(settings, step.sample_rate, step.steps) if step.steps else None
            return TrainResult(step.steps, total / seen if seen else math.nan, time.perf_counter() - start, aborted, record)

        # the Poisson sample is drawn over the dataset's indices and fetched through it
        batches = self._batches("train", (step.sample_patients().tolist() for _ in range(planned)), augment=True)
        try:
            for _ in range(planned):
                if should_abort():
                    return result(True)
                inputs, labels, n = next(batches)
                owner = torch.arange(n, device=self.device) if n else None
                if not n:
                    inputs, labels = None, None
                self.optimizer.zero_grad(set_to_none=True)
                losses = step.apply(inputs, labels, owner, n)
                self.optimizer.step()
                total += float(losses.sum())
                seen += losses.numel()
        finally:
            batches.close()
        return result(False)

    # scoring -------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, data: Optional[dict] = None, batch_size: int = 64) -> np.ndarray:
        """Probabilities ``(N, K)`` for ``data`` (default: the test split; ``self.train_data`` for
        the training split), never augmented."""
        _positive_int("batch_size", batch_size)
        split = "train" if data is self.train_data else "test" if data is None or data is self.test_data else None
        self.model.eval()
        n = len(data["labels"]) if data is not None else self.num_test_cases
        ranges = (list(range(start, min(n, start + batch_size))) for start in range(0, n, batch_size))
        if split is None:  # another mapping of tensors, sliced as given
            batches = ((*self._batch(data, torch.tensor(r)), len(r)) for r in ranges)
        else:
            batches = self._batches(split, ranges, augment=False)
        out = []
        for inputs, _, _ in batches:
            with torch.autocast(self.device.type, enabled=self.amp):
                out.append(torch.sigmoid(self.model(**inputs).float()).cpu())
        return torch.cat(out).numpy()

    def validate(self, should_abort: Callable[[], bool] = lambda: False) -> Optional[dict[str, float]]:
        """AUC and accuracy on the test split, plus ``num_cases``; None when aborted."""
        if should_abort():
            return None
        probabilities = self.predict()
        if not np.all(np.isfinite(probabilities)):
            raise FloatingPointError("the model predicts non-finite probabilities")
        metrics = classification_metrics(self.test_data["labels"].cpu().numpy().astype(np.int64), probabilities, self.label_names)
        metrics["num_cases"] = self.num_test_cases
        return metrics
