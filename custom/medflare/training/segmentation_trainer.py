"""Local training and validation of a 3D brain-tumour segmentation network, without NVFlare.

:class:`SegmentationTrainer` is what a site runs each round: load the global weights, train on
random crops with MONAI's ``DiceLoss`` on the TC / WT / ET channels, and score whole volumes by
sliding-window inference with ``DiceMetric``. It knows nothing of federated learning, so it can
be tested, profiled and used centrally on its own; the executor adapts it to NVFlare.

With ``dp_sgd`` settings a round is patient-level DP-SGD (:mod:`medflare.privacy.dp_sgd`): each
step Poisson-samples patients, draws ``crops_per_patient`` random crops of each, sums each
patient's per-crop gradients, clips the patient's total, adds Gaussian noise and lets Adam apply
the result. The per-crop loss is the Dice loss of that crop alone; mixed precision is not used
under DP-SGD.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from medflare.data.brats_volume_checks import check_brats_subjects
from medflare.training.brats_transforms import REGIONS, train_transforms, val_transforms
from medflare.training.device import select_device, use_amp
from medflare.privacy.dp_sgd import (
    DPSGDSettings,
    dp_sgd_record,
    parse_dp_sgd_settings,
    patient_sample_rate,
    planned_steps,
)
from medflare.training.model_weights import TrainResult, WeightMismatchError, get_weights, set_weights, weight_diff

__all__ = ["SegmentationTrainer", "TrainResult", "WeightMismatchError"]


def _unreadable_file_error(files: Sequence[Mapping]) -> Optional[ValueError]:
    """A ValueError naming the first image or label that cannot be read, or None if all load."""
    from monai.transforms import LoadImage

    from medflare.data.brats_layout import DataListError, entry_files

    loader = LoadImage(image_only=True)
    for item in files:
        for path in entry_files(item):
            try:
                loader(path)
            except Exception as e:
                cause = e.__cause__ or e
                return DataListError(f"cannot read {path}: {type(cause).__name__}: {cause}")
    return None


def _plain(tensor) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor (torch.func transforms want no subclass)."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else torch.as_tensor(tensor)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class SegmentationTrainer:
    """Trains and validates a segmentation network on one site's BraTS data.

    Args:
        model: the network (4 input channels, 3 output logits: TC, WT, ET).
        train_files: ``[{"image": [t1, t1ce, t2, flair], "label": seg}, ...]``, or one 4-D image
            path with its ``channel_order`` (MSD Task01), each with its ``label_convention``
            (:func:`~medflare.data.brats_layout.load_datalist` entries); every subject is
            checked by :func:`~medflare.data.brats_volume_checks.check_brats_subjects` first.
        val_files: same form, for validation.
        roi_size: training crop size, three ints >= 8.
        val_roi_size: sliding-window size for validation; defaults to ``roi_size``.
        batch_size: training crops per step.
        learning_rate: Adam learning rate, in (0, 1].
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        amp: use mixed precision when on CUDA.
        cache_rate: fraction of the pre-processed data kept in memory, in [0, 1].
        pixdim: resample to this voxel size (mm) when given; None keeps the data's grid.
        seed: seed of crops and augmentation.
        sw_batch_size: windows per forward pass during validation.
        crops_per_patient: random crops drawn from each subject per step (without DP-SGD a step
            has ``batch_size`` subjects, so ``batch_size * crops_per_patient`` crops).
        dp_sgd: :class:`~medflare.privacy.dp_sgd.DPSGDSettings` (or its JSON mapping) to train
            with patient-level DP-SGD by default; ``train(dp_sgd=...)`` may give other settings.
        val_transform: the validation chain, giving ``image`` (4 channels) and ``label`` (TC, WT,
            ET) on one grid; None: medflare's ``val_transforms(pixdim)`` (a site bundle's
            preprocessing: :func:`medflare.training.monai_bundles.bundle_validation_transforms`).

    Raises:
        ValueError: an argument out of range.
        DPIncompatibleNetworkError: ``dp_sgd`` is given and the network cannot be trained
            with it (BatchNorm, in-place operations), naming the layer and the fix.
        DataListError: a subject's volume is unreadable or fails a check, naming the file.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_files: Sequence[Mapping],
        val_files: Sequence[Mapping],
        roi_size: Sequence[int] = (48, 48, 48),
        val_roi_size: Optional[Sequence[int]] = None,
        batch_size: int = 2,
        learning_rate: float = 1e-3,
        device: str = "auto",
        amp: bool = True,
        cache_rate: float = 1.0,
        pixdim: Optional[Sequence[float]] = None,
        seed: int = 0,
        sw_batch_size: int = 2,
        crops_per_patient: int = 1,
        dp_sgd: Optional[DPSGDSettings] = None,
        val_transform: Optional[Callable] = None,
    ):
        from monai.data import CacheDataset, DataLoader
        from monai.utils import set_determinism

        val_roi_size = roi_size if val_roi_size is None else val_roi_size
        for name, roi in (("roi_size", roi_size), ("val_roi_size", val_roi_size)):
            if len(roi) != 3 or any(isinstance(r, bool) or not isinstance(r, int) or r < 8 for r in roi):
                raise ValueError(f"{name} must be three ints >= 8, got {roi!r}")
        _positive_int("batch_size", batch_size)
        _positive_int("sw_batch_size", sw_batch_size)
        _positive_int("crops_per_patient", crops_per_patient)
        dp_sgd = parse_dp_sgd_settings(dp_sgd)
        if not (isinstance(learning_rate, (int, float)) and 0 < learning_rate <= 1):
            raise ValueError(f"learning_rate must be in (0, 1], got {learning_rate!r}")
        if not (isinstance(cache_rate, (int, float)) and 0 <= cache_rate <= 1):
            raise ValueError(f"cache_rate must be in [0, 1], got {cache_rate!r}")
        if val_transform is not None and not callable(val_transform):
            raise ValueError(f"val_transform must be None or a callable transform chain, got {val_transform!r}")
        if not train_files or not val_files:
            raise ValueError("train_files and val_files must both be non-empty")
        # labels, grids and finiteness of every volume, before any step; each file once per process
        check_brats_subjects(list(train_files) + list(val_files))

        self.roi_size = tuple(roi_size)
        self.val_roi_size = tuple(val_roi_size)
        self.sw_batch_size = sw_batch_size
        self.crops_per_patient = crops_per_patient
        self.dp_sgd = dp_sgd
        if dp_sgd is not None:
            from medflare.training.dp_networks import check_dp_compatible

            check_dp_compatible(model)  # before any data is read
        self.device = select_device(device)
        self.amp = use_amp(self.device, amp)
        set_determinism(seed=seed)
        self.model = model.to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=learning_rate)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

        from monai.losses import DiceLoss

        self.loss_fn = DiceLoss(smooth_nr=0.0, smooth_dr=1e-5, squared_pred=True, sigmoid=True, batch=True)
        try:
            train_ds = CacheDataset(list(train_files), train_transforms(roi_size, pixdim, crops_per_patient), cache_rate=cache_rate, progress=False)
            val_chain = val_transforms(pixdim) if val_transform is None else val_transform
            val_ds = CacheDataset(list(val_files), val_chain, cache_rate=cache_rate, progress=False)
        except Exception as e:
            # MONAI's message names the transform, not the file: find the file that does not load
            raise _unreadable_file_error(list(train_files) + list(val_files)) or e
        generator = torch.Generator().manual_seed(seed)
        self.train_loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, num_workers=0, generator=generator)
        self.val_loader = DataLoader(val_ds, batch_size=1, shuffle=False, num_workers=0)
        self.num_train_cases = len(train_ds)
        self.num_val_cases = len(val_ds)
        self._train_ds = train_ds
        from medflare.training.dp_sgd_step import DPSGDRandomness

        self._dp_randomness = DPSGDRandomness(seed, self.device)

    # weights -------------------------------------------------------------------------------

    def get_weights(self) -> dict[str, np.ndarray]:
        """The model's state as numpy arrays on the CPU (copies)."""
        return get_weights(self.model)

    def set_weights(self, weights: Mapping[str, object]) -> None:
        """Load a full state; raises :class:`WeightMismatchError` when it does not fit exactly."""
        set_weights(self.model, weights)

    weight_diff = staticmethod(weight_diff)

    # training ------------------------------------------------------------------------------

    def train(
        self,
        epochs: int = 1,
        max_steps: Optional[int] = None,
        should_abort: Callable[[], bool] = lambda: False,
        dp_sgd: Optional[DPSGDSettings] = None,
    ) -> TrainResult:
        """Train for ``epochs`` passes over the training data, or ``max_steps`` steps if fewer.

        ``should_abort`` is asked before every batch; when it answers True training stops and
        the result says so. With ``dp_sgd`` (default: the constructor's) an epoch is
        :math:`\\lceil 1/q \\rceil` DP-SGD steps and the result carries the DP-SGD record.
        """
        _positive_int("epochs", epochs)
        if max_steps is not None:
            _positive_int("max_steps", max_steps)
        dp_sgd = parse_dp_sgd_settings(dp_sgd) if dp_sgd is not None else self.dp_sgd
        if dp_sgd is not None:
            return self._train_dp_sgd(dp_sgd, epochs, max_steps, should_abort)
        start = time.perf_counter()
        self.model.train()
        steps, total = 0, 0.0
        for _ in range(epochs):
            for batch in self.train_loader:
                if should_abort():
                    return TrainResult(steps, total / steps if steps else math.nan, time.perf_counter() - start, True)
                if max_steps is not None and steps >= max_steps:
                    break
                images = batch["image"].to(self.device)
                labels = batch["label"].to(self.device)
                self.optimizer.zero_grad(set_to_none=True)
                with torch.autocast(self.device.type, enabled=self.amp):
                    loss = self.loss_fn(self.model(images), labels)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                steps += 1
                total += float(loss.detach())
        return TrainResult(steps, total / steps if steps else math.nan, time.perf_counter() - start, False)

    def _crops_of(self, patients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, labels, patient of each crop) of ``crops_per_patient`` fresh crops per patient."""
        images, labels, owner = [], [], []
        for position, index in enumerate(patients.tolist()):
            crops = self._train_ds[index]
            for crop in crops if isinstance(crops, list) else [crops]:
                images.append(_plain(crop["image"]))
                labels.append(_plain(crop["label"]))
                owner.append(position)
        return (
            torch.stack(images).to(self.device),
            torch.stack(labels).to(self.device),
            torch.tensor(owner, dtype=torch.int64, device=self.device),
        )

    def dp_sgd_steps(self, epochs: int, max_steps: Optional[int], expected_patients_per_step: int) -> int:
        """The DP-SGD steps ``train(epochs, max_steps, dp_sgd)`` takes unless aborted, for settings
        of ``expected_patients_per_step``: ``epochs * ceil(1 / q)``, at most ``max_steps``."""
        q = patient_sample_rate(expected_patients_per_step, self.num_train_cases)
        cap = None if max_steps is None else _positive_int("max_steps", max_steps)
        return planned_steps(_positive_int("epochs", epochs), q, max_steps=cap)

    def _train_dp_sgd(
        self, settings: DPSGDSettings, epochs: int, max_steps: Optional[int], should_abort: Callable[[], bool]
    ) -> TrainResult:
        from medflare.training.dp_sgd_step import DPSGDStep

        step = DPSGDStep(self.model, self.loss_fn, settings, self.num_train_cases, self._dp_randomness)
        planned = self.dp_sgd_steps(epochs, max_steps, settings.expected_patients_per_step)
        start = time.perf_counter()
        self.model.train()
        total, crops = 0.0, 0

        def result(aborted: bool) -> TrainResult:
            record = dp_sgd_record(settings, step.sample_rate, step.steps) if step.steps else None
            mean = total / crops if crops else math.nan
            return TrainResult(step.steps, mean, time.perf_counter() - start, aborted, record)

        for _ in range(planned):
            if should_abort():
                return result(True)
            patients = step.sample_patients()
            batch = self._crops_of(patients) if len(patients) else (None, None, None)
            self.optimizer.zero_grad(set_to_none=True)
            losses = step.apply(*batch, num_patients=len(patients))
            self.optimizer.step()
            total += float(losses.sum())
            crops += losses.numel()
        return result(False)

    # validation ----------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self, should_abort: Callable[[], bool] = lambda: False) -> Optional[dict[str, float]]:
        """Dice per region on the validation volumes, by sliding-window inference.

        Returns:
            ``{"dice_tc", "dice_wt", "dice_et", "dice_mean", "num_cases"}``, or None when
            ``should_abort`` stopped it. A region absent from every validation label is NaN.
        """
        from monai.inferers import sliding_window_inference
        from monai.metrics import DiceMetric

        metric = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=True)
        self.model.eval()
        for batch in self.val_loader:
            if should_abort():
                return None
            images = batch["image"].to(self.device)
            with torch.autocast(self.device.type, enabled=self.amp):
                logits = sliding_window_inference(
                    images, self.val_roi_size, self.sw_batch_size, self.model, overlap=0.25, mode="gaussian"
                )
            prediction = (torch.sigmoid(logits.float()) > 0.5).float()
            metric(y_pred=prediction, y=batch["label"].to(self.device))
        per_region = metric.aggregate().cpu().numpy().astype(float)
        result = {f"dice_{r}": float(v) for r, v in zip(REGIONS, per_region)}
        finite = [v for v in per_region if np.isfinite(v)]
        result["dice_mean"] = float(np.mean(finite)) if finite else math.nan
        result["num_cases"] = self.num_val_cases
        return result
