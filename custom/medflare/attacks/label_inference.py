"""Which labels a site's batch held, read off the sign of its output layer's update.

No optimisation and no images: the bias of the output layer (or the row sums of its weights)
moves against the labels that were present. Pure numpy/torch; works on any released update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from medflare.attacks.gradient_matching import UPDATE_KINDS
from medflare.privacy.argument_checks import check_int

__all__ = ["ACTIVATIONS", "LabelInference", "infer_labels", "label_presence", "label_accuracy", "infer_regions_dice"]

#: the output layer's activation in the site's loss: a sigmoid per output (binary or multi-label,
#: BCE) or a softmax over classes (cross-entropy)
ACTIVATIONS = ("sigmoid", "softmax")

ArrayLike = Union[torch.Tensor, np.ndarray]


def _as_array(name: str, value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite; it holds NaN or infinite values")
    return array


@dataclass(frozen=True)
class LabelInference:
    """The attacker's reading, per output.

    Attributes:
        present: predicted presence: for a sigmoid output, some case of the batch had label 1
            (for one case: its label); for a softmax class, some case was of that class.
        released: whether the entry was released; a withheld one (exactly 0) is guessed absent.
        gradient: the per-output gradient signal read (``-Delta`` for a weight difference).
    """

    present: np.ndarray
    released: np.ndarray
    gradient: np.ndarray


def infer_labels(
    output_update: ArrayLike,
    activation: str = "sigmoid",
    update_kind: str = "gradient",
    single_sample: bool = False,
) -> LabelInference:
    """Infer the labels present in a batch from the output layer's released update.

    Args:
        output_update: the output layer's bias update ``(K,)``, or its weight update ``(K, D)``
            (rows are summed; sound when the layer's inputs are non-negative, e.g. after a ReLU).
        activation: one of :data:`ACTIVATIONS`.
        update_kind: ``"gradient"``, or ``"weight_difference"`` (new minus sent weights after
            SGD: only the sign matters, ``g`` has the sign of ``-Delta``).
        single_sample: the update is from one case; with a softmax, exactly one class is then
            predicted (the most negative, iDLG).

    Notes:
        With logits ``z = W h + b`` and a mean loss over ``B`` cases, ``dL/db_k = (1/B) sum_i
        (p_ik - y_ik)`` and ``dL/dW_k = (1/B) sum_i (p_ik - y_ik) h_i``, where ``p`` is the
        sigmoid (BCE) or the softmax (cross-entropy) of ``z``. Since ``0 < p < 1``:

        * one case (Zhao et al. 2020, iDLG): ``y_k = 1`` iff ``dL/db_k < 0``; for a softmax the
          true class is the only negative entry;
        * a batch (Wainakh et al. 2022): a label no case holds has ``dL/db_k > 0``, so a negative
          entry proves the label present; a present label may still read positive when the model
          already predicts it well (a missed label, never a false one).

        With ``h >= 0`` the weight rows' sums have the same sign. After ``S`` SGD steps the sum of
        the steps' gradients is read: a label absent from every step's batch still reads positive,
        so a negative entry still proves the label present. Weight
        decay, momentum or Adam, gradient clipping to a small norm plus noise, and withholding
        the entry (partial sharing) weaken or void it.

    References:
        1. Zhao B., Mopuri K. R., Bilen H., "iDLG: Improved Deep Leakage from Gradients",
           arXiv:2001.02610 (2020), Sec. 3.
        2. Wainakh A., Ventola F., Müßig T., Keim J., Cordero C. G., Zimmer E., Grube T.,
           Kersting K., Mühlhäuser M., "User-Level Label Leakage from Gradients in Federated
           Learning", PoPETs 2022(2), Sec. 4.

    Raises:
        ValueError: an unknown activation or update kind, a tensor of another rank, non-finite values.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if update_kind not in UPDATE_KINDS:
        raise ValueError(f"update_kind must be one of {list(UPDATE_KINDS)}, got {update_kind!r}")
    if not isinstance(single_sample, bool):
        raise TypeError(f"single_sample must be a bool, got {single_sample!r}")
    array = _as_array("output_update", output_update)
    if array.ndim not in (1, 2) or array.shape[0] == 0:
        raise ValueError(f"output_update must be a bias (K,) or a weight (K, D), got shape {array.shape}")
    signal = array if array.ndim == 1 else array.sum(axis=1)
    released = (array != 0) if array.ndim == 1 else (array != 0).any(axis=1)
    gradient = -signal if update_kind == "weight_difference" else signal
    if activation == "softmax" and single_sample:
        present = np.zeros(gradient.shape, dtype=bool)
        if released.any():
            candidates = np.where(released, gradient, np.inf)
            present[int(np.argmin(candidates))] = True
    else:
        present = released & (gradient < 0)
    return LabelInference(present, released, gradient)


def label_presence(labels: ArrayLike, num_classes: Optional[int] = None) -> np.ndarray:
    """Which labels a batch held: ``(K,)`` booleans.

    Args:
        labels: ``(B, K)`` 0/1 labels (sigmoid outputs: any case with 1), or ``(B,)`` class
            indices with ``num_classes`` (softmax).
        num_classes: ``K`` for class indices.
    """
    array = _as_array("labels", labels)
    if num_classes is None:
        if array.ndim != 2 or not np.isin(array, (0.0, 1.0)).all():
            raise ValueError(f"labels must be (B, K) of 0/1, or class indices with num_classes, got shape {array.shape}")
        return (array > 0.5).any(axis=0)
    check_int("num_classes", num_classes, low=2)
    if array.ndim != 1 or (array != np.round(array)).any() or array.min() < 0 or array.max() >= num_classes:
        raise ValueError(f"labels must be (B,) class indices in [0, {num_classes - 1}], got {labels!r}")
    present = np.zeros(num_classes, dtype=bool)
    present[array.astype(int)] = True
    return present


def label_accuracy(predicted: Union[LabelInference, ArrayLike], truth: ArrayLike) -> float:
    """The fraction of outputs whose predicted presence equals the truth (both ``(K,)`` booleans)."""
    guess = np.asarray(predicted.present if isinstance(predicted, LabelInference) else predicted, dtype=bool)
    real = np.asarray(truth.detach().cpu().numpy() if isinstance(truth, torch.Tensor) else truth, dtype=bool)
    if guess.shape != real.shape or guess.ndim != 1:
        raise ValueError(f"predicted and truth must both be (K,), got {guess.shape} and {real.shape}")
    return float((guess == real).mean())


def infer_regions_dice(output_update: ArrayLike) -> LabelInference:
    """Which output channels (tumour regions) a segmentation batch held, under a Dice loss.

    Args:
        output_update: the segmentation head's bias update ``(K,)`` (or its weight update, whose
            leading axis is the channel), a gradient or a weight difference.

    Notes:
        MONAI's ``DiceLoss(sigmoid=True, smooth_nr=0, batch=True)``, as the segmentation trainer
        uses, is per channel ``1 - 2 sum(p y) / (sum(p^2) + sum(y^2) + eps)``. For a channel with
        no foreground voxel in the whole batch (``y = 0``) the numerator is 0 for every ``p``, so
        the loss is constant and every gradient of that channel's logits is exactly 0; its output
        bias and weights do not move under SGD or Adam (whose first moment stays 0). A channel that
        moved was present; one that did not was absent, or withheld (partial sharing sends it as
        0), or present but already perfectly segmented. DP-SGD's noise moves every channel.

    Raises:
        ValueError: a tensor of rank 0 or non-finite values.
    """
    array = _as_array("output_update", output_update)
    if array.ndim < 1 or array.shape[0] == 0:
        raise ValueError(f"output_update must have a channel axis, got shape {array.shape}")
    moved = (array != 0) if array.ndim == 1 else (array.reshape(array.shape[0], -1) != 0).any(axis=1)
    signal = array if array.ndim == 1 else array.reshape(array.shape[0], -1).sum(axis=1)
    return LabelInference(moved, moved, signal)
