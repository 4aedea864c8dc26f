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
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from medflare.data.outcome_table import OutcomeCase, read_xray
from medflare.privacy.dp_sgd import (
    DPSGDSettings,
    dp_sgd_record,
    parse_dp_sgd_settings,
    patient_sample_rate,
    planned_steps,
)
from medflare.training.device import select_device
from medflare.training.dp_sgd_step import DPSGDRandomness, DPSGDStep
from medflare.training.model_weights import TrainResult, get_weights, set_weights, weight_diff

__all__ = ["OutcomeTrainer", "NORMALISATIONS", "OPTIMIZERS", "check_training_arguments", "classification_metrics"]

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


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, label_names: Sequence[str]) -> dict[str, float]:
    """AUC and accuracy per label and their means over labels, as described in the module docstring.

    Args:
        labels: ``(N, K)`` of 0/1.
        probabilities: ``(N, K)`` predicted probabilities.
        label_names: the K names.
    """
    from sklearn.metrics import accuracy_score, roc_auc_score

    labels = np.asarray(labels).reshape(len(labels), -1)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(len(probabilities), -1)
    aucs, accuracies = [], []
    for k in range(labels.shape[1]):
        y, p = labels[:, k], probabilities[:, k]
        aucs.append(float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else math.nan)
        accuracies.append(float(accuracy_score(y, (p > 0.5).astype(y.dtype))))
    metrics = {}
    if len(label_names) > 1:
        for name, auc, acc in zip(label_names, aucs, accuracies):
            metrics[f"auc_{name}"] = auc
            metrics[f"accuracy_{name}"] = acc
    finite = [a for a in aucs if math.isfinite(a)]
    metrics["auc"] = float(np.mean(finite)) if finite else math.nan
    metrics["accuracy"] = float(np.mean(accuracies))
    return metrics


class OutcomeTrainer:
    """Trains and scores an outcome network on one site's cases.

    Args:
        model: an ``OutcomeNet`` (or any module ``model(image=..., clinical=...) -> logits``
            with ``uses_image`` / ``uses_clinical`` attributes).
        train_cases, test_cases: the site's split, from :func:`load_outcome_table`.
        label_names: the label columns, for per-label metrics.
        image_size: ``(H, W)`` the radiographs are resized to.
        batch_size: cases per step.
        learning_rate: in (0, 1].
        optimizer: ``"adam"`` or ``"sgd"`` (plain SGD, as FLamby's federated strategies).
        clinical_normalisation: ``"none"`` (values used as given) or ``"site"``
            (standardised with this site's training mean and standard deviation; a constant
            column is only centred).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        seed: seed of the shuffling (and of DP-SGD's sampling and noise when not secure).
        dp_sgd: :class:`~medflare.privacy.dp_sgd.DPSGDSettings` (or its JSON mapping) to train
            with patient-level DP-SGD by default; ``train(dp_sgd=...)`` may give other settings.

    Raises:
        ValueError: an argument out of range.
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
    ):
        check_training_arguments(image_size, batch_size, learning_rate, optimizer, clinical_normalisation)
        dp_sgd = parse_dp_sgd_settings(dp_sgd)
        if dp_sgd is not None:
            from medflare.training.dp_networks import check_dp_compatible

            check_dp_compatible(model)  # before any image is read
        if not train_cases or not test_cases:
            raise ValueError("train_cases and test_cases must both be non-empty")
        self.label_names = list(label_names)
        self.uses_image = bool(getattr(model, "uses_image", True))
        self.uses_clinical = bool(getattr(model, "uses_clinical", False))
        num_outputs = getattr(model, "num_outputs", len(self.label_names))
        for split, cases in (("train", train_cases), ("test", test_cases)):
            widths = {len(c.labels) for c in cases}
            if widths != {len(self.label_names)} or num_outputs != len(self.label_names):
                raise ValueError(
                    f"{split} cases carry {sorted(widths)} label(s) and the model {num_outputs} output(s); "
                    f"label_names has {len(self.label_names)}"
                )
            if self.uses_image and any(c.image is None for c in cases):
                raise ValueError(f"the model takes an image but {split} cases have none (no image column?)")
        self.image_size = tuple(image_size)
        self.device = select_device(device)
        self.model = model.to(self.device)
        self.batch_size = batch_size
        self.seed = seed
        self._optimizer_class = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
        self._learning_rate = learning_rate
        self.optimizer = self._optimizer_class(self.model.parameters(), lr=learning_rate)
        self.loss_fn = torch.nn.BCEWithLogitsLoss()

        self.train_data = self._tensors(train_cases)
        self.test_data = self._tensors(test_cases)
        if self.uses_clinical and clinical_normalisation == "site":
            clinical = self.train_data["clinical"]
            mean = clinical.mean(dim=0)
            std = clinical.std(dim=0, unbiased=False)
            std = torch.where(std > 0, std, torch.ones_like(std))
            for data in (self.train_data, self.test_data):
                data["clinical"] = (data["clinical"] - mean) / std
        for data in (self.train_data, self.test_data):  # on the device once, not batch by batch
            for key, tensor in data.items():
                if tensor is not None:
                    data[key] = tensor.to(self.device)
        self.num_train_cases = len(train_cases)
        self.num_test_cases = len(test_cases)
        self._generator = torch.Generator().manual_seed(seed)
        self._order: list[int] = []
        self.dp_sgd = dp_sgd
        self._dp_randomness = DPSGDRandomness(seed, self.device)

    def sibling(self, model: torch.nn.Module) -> "OutcomeTrainer":
        """A trainer for another ``model`` of the same inputs and outputs on the same cases, which
        are shared, not read again, with its own optimizer and a fresh shuffling from the seed
        (the executor's site-only model)."""
        for name in ("uses_image", "uses_clinical", "num_outputs", "clinical_features"):
            if getattr(model, name, None) != getattr(self.model, name, None):
                raise ValueError(f"a sibling model must match the trainer's model in {name}")
        twin = copy.copy(self)
        twin.model = model.to(self.device)
        twin.optimizer = self._optimizer_class(twin.model.parameters(), lr=self._learning_rate)
        twin._generator = torch.Generator().manual_seed(self.seed)
        twin._order = []
        twin._dp_randomness = DPSGDRandomness(self.seed, self.device)
        return twin

    def _tensors(self, cases: Sequence[OutcomeCase]) -> dict[str, Optional[torch.Tensor]]:
        data: dict[str, Optional[torch.Tensor]] = {
            "labels": torch.tensor([c.labels for c in cases], dtype=torch.float32),
            "clinical": torch.tensor([c.clinical for c in cases], dtype=torch.float32) if self.uses_clinical else None,
            "image": None,
        }
        if self.uses_clinical and data["clinical"].shape[1] != getattr(self.model, "clinical_features", data["clinical"].shape[1]):
            raise ValueError(
                f"cases carry {data['clinical'].shape[1]} clinical values, the model takes {self.model.clinical_features}"
            )
        if self.uses_image:
            data["image"] = torch.stack([self._load_image(c.image) for c in cases])
        return data

    def _load_image(self, path: str) -> torch.Tensor:
        pixels = torch.from_numpy(read_xray(path))[None, None]
        resized = torch.nn.functional.interpolate(pixels, size=self.image_size, mode="area")
        return resized[0]  # (1, H, W)

    # weights -------------------------------------------------------------------------------

    def get_weights(self) -> dict[str, np.ndarray]:
        """The model's state as numpy arrays on the CPU (copies)."""
        return get_weights(self.model)

    def set_weights(self, weights: Mapping[str, object]) -> None:
        """Load a full state; raises ``WeightMismatchError`` when it does not fit exactly."""
        set_weights(self.model, weights)

    weight_diff = staticmethod(weight_diff)

    # training ------------------------------------------------------------------------------

    def _batch(self, data, index) -> tuple[dict, torch.Tensor]:
        inputs = {}
        index = index.to(self.device)
        for key in ("image", "clinical"):
            if data[key] is not None:
                inputs[key] = data[key][index]
        return inputs, data["labels"][index]

    def _next_indices(self) -> torch.Tensor:
        """The next batch of a shuffled pass; a new permutation starts when one is used up."""
        if not self._order:
            self._order = torch.randperm(self.num_train_cases, generator=self._generator).tolist()
        batch, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return torch.tensor(batch)

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
        for step in range(steps):
            if should_abort():
                return TrainResult(step, total / step if step else math.nan, time.perf_counter() - start, True)
            inputs, labels = self._batch(self.train_data, self._next_indices())
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model(**inputs), labels)
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach())
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
        step = DPSGDStep(self.model, self.loss_fn, settings, self.num_train_cases, self._dp_randomness)
        planned = self.dp_sgd_steps(epochs, steps, settings.expected_patients_per_step)
        start = time.perf_counter()
        self.model.train()
        total, seen = 0.0, 0

        def result(aborted: bool) -> TrainResult:
            record = dp_sgd_record(settings, step.sample_rate, step.steps) if step.steps else None
            return TrainResult(step.steps, total / seen if seen else math.nan, time.perf_counter() - start, aborted, record)

        for _ in range(planned):
            if should_abort():
                return result(True)
            patients = step.sample_patients()
            if len(patients):
                inputs, labels = self._batch(self.train_data, patients)
                owner = torch.arange(len(patients), device=self.device)
            else:
                inputs, labels, owner = None, None, None
            self.optimizer.zero_grad(set_to_none=True)
            losses = step.apply(inputs, labels, owner, len(patients))
            self.optimizer.step()
            total += float(losses.sum())
            seen += losses.numel()
        return result(False)

    # scoring -------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, data: Optional[dict] = None, batch_size: int = 64) -> np.ndarray:
        """Probabilities ``(N, K)`` for ``data`` (default: the test split)."""
        data = self.test_data if data is None else data
        self.model.eval()
        n = len(data["labels"])
        out = []
        for start in range(0, n, batch_size):
            inputs, _ = self._batch(data, torch.arange(start, min(n, start + batch_size)))
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
