"""Moving a network's weights in and out as numpy arrays, the form NVFlare's DXOs carry.

Every medflare trainer speaks this language with its executor: the global model arrives as a
``{name: ndarray}`` dict, is loaded only if it fits the local network exactly, and the update
that leaves is ``after - before`` per entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch

__all__ = ["TrainResult", "WeightMismatchError", "get_weights", "set_weights", "weight_diff"]


class WeightMismatchError(ValueError):
    """Weights that do not fit the model: missing or unexpected keys, or wrong shapes."""


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training did.

    Attributes:
        steps: optimizer steps taken.
        mean_loss: mean training loss over those steps (NaN when no step was taken).
        seconds: wall time spent.
        aborted: True when ``should_abort`` stopped training early.
        dp_sgd: under DP-SGD, the record of the round (``medflare.privacy.dp_sgd.dp_sgd_record``:
            the fields the executor writes of ``wire_contract.DP_SGD_RECORD``); None otherwise.
    """

    steps: int
    mean_loss: float
    seconds: float
    aborted: bool
    dp_sgd: Optional[dict] = None


def get_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's state as numpy arrays on the CPU (copies)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_weights(model: torch.nn.Module, weights: Mapping[str, object]) -> None:
    """Load a full state (numpy arrays or tensors), refusing anything that does not fit exactly.

    A flat vector with exactly an entry's number of values is reshaped to it (NVFlare's HE
    decryptor returns each parameter flat, as ``HEPTModelReaderWriter`` expects); an integer
    entry (a BatchNorm counter) sent as reals is rounded.

    Raises:
        WeightMismatchError: naming missing keys, unexpected keys or the first bad shape.
    """
    state = model.state_dict()
    missing = sorted(set(state) - set(weights))
    unexpected = sorted(set(weights) - set(state))
    if missing or unexpected:
        raise WeightMismatchError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    new_state = {}
    for key, ref in state.items():
        value = torch.as_tensor(np.asarray(weights[key]) if not torch.is_tensor(weights[key]) else weights[key])
        if value.ndim == 1 and value.numel() == ref.numel() and tuple(value.shape) != tuple(ref.shape):
            # a flat vector of exactly the entry's size: how a decrypted CKKS vector arrives
            value = value.reshape(ref.shape)
        if tuple(value.shape) != tuple(ref.shape):
            raise WeightMismatchError(f"weight {key!r} has shape {tuple(value.shape)}, the model needs {tuple(ref.shape)}")
        if value.is_floating_point() and not ref.is_floating_point():
            value = torch.round(value)  # a counter that travelled as an approximate real (CKKS)
        new_state[key] = value.to(dtype=ref.dtype)
    model.load_state_dict(new_state, strict=True)


def weight_diff(after: Mapping[str, np.ndarray], before: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``after - before`` per key, each an array in its entry's own dtype (float32 for
    parameters; a 0-d array for a scalar entry such as BatchNorm's ``num_batches_tracked``,
    where numpy's subtraction alone would give a numpy scalar that NVFlare's checks refuse)."""
    return {k: np.asarray(np.subtract(after[k], before[k]), dtype=np.asarray(after[k]).dtype) for k in after}
