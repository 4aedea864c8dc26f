"""A saved global model read back into its network, and exported from there.

NVFlare's ``PTFileModelPersistor`` saves ``{"model": state_dict, "train_conf": ...}``.
:func:`load_global_weights` reads it with ``torch.load(weights_only=True)`` (a checkpoint is
data: nothing in it is run) and refuses, naming the file, one that is missing, not a
checkpoint, encrypted (the CKKS ciphertexts of a secure-aggregation job: decrypt it at a site
first, ``medflare model decrypt``), or not this network's (names, shapes, non-finite values).
:func:`export_checkpoint` exports the loaded network next to the checkpoint with
:func:`medflare.training.model_export.export_model`.
"""

from __future__ import annotations

import inspect
import os
from typing import Mapping, Optional, Sequence

import torch

from medflare.export.job_model import check_input_shapes
from medflare.training.model_export import DEFAULT_ATOL, DEFAULT_RTOL, ExportReport, export_model, random_inputs

__all__ = ["CheckpointError", "EncryptedCheckpointError", "load_global_weights", "export_checkpoint"]


class CheckpointError(ValueError):
    """A global model file that cannot be exported; the message names the file."""


class EncryptedCheckpointError(CheckpointError):
    """The global model is CKKS ciphertexts (secure aggregation): only a site can decrypt it."""


def load_global_weights(model_path: str, network: torch.nn.Module) -> torch.nn.Module:
    """Load the checkpoint ``model_path`` into ``network`` (in place) and return it.

    Raises:
        EncryptedCheckpointError: its parameters are ciphertexts.
        CheckpointError: missing, unreadable, or not ``network``'s weights.
    """
    try:
        saved = torch.load(model_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{model_path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{model_path}: is a folder, not a checkpoint") from None
    except Exception as e:
        raise CheckpointError(f"{model_path}: not a PyTorch checkpoint of weights ({type(e).__name__}: {str(e)[:200]})") from None
    weights = saved.get("model", saved) if isinstance(saved, Mapping) else None
    if not isinstance(weights, Mapping) or not weights:
        raise CheckpointError(f"{model_path}: holds no state dict (expected {{'model': {{name: tensor}}}})")
    if any(isinstance(v, (bytes, bytearray)) for v in weights.values()):
        raise EncryptedCheckpointError(
            f"{model_path} is encrypted (CKKS ciphertexts of a secure-aggregation job): decrypt it at a site first with "
            "`medflare model decrypt MODEL_PT --key <site kit>/startup/client_context.tenseal --job JOB_DIR`, "
            "then export the decrypted checkpoint"
        )
    bad = sorted(str(k) for k, v in weights.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"{model_path}: parameters that are not tensors: {bad[:5]}")
    state = network.state_dict()
    missing, unexpected = sorted(set(state) - set(weights)), sorted(set(weights) - set(state))
    if missing or unexpected:
        raise CheckpointError(
            f"{model_path} does not fit the network {type(network).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, ref in state.items():
        value = weights[name]
        if tuple(value.shape) != tuple(ref.shape):
            raise CheckpointError(f"{model_path}: {name!r} has shape {list(value.shape)}, the network's is {list(ref.shape)}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{model_path}: {name!r} holds NaN or infinite values")
    network.load_state_dict({name: weights[name].to(ref.dtype) for name, ref in state.items()})
    return network


def export_checkpoint(
    model_path: str,
    network: torch.nn.Module,
    input_shapes: Mapping[str, Sequence[int]],
    out_dir: Optional[str] = None,
    formats: Sequence[str] = ("torchscript", "onnx"),
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    seed: int = 0,
) -> ExportReport:
    """Load ``model_path`` into ``network`` and export it as ``<checkpoint stem>.*`` in
    ``out_dir`` (default: the checkpoint's folder), the sample input standard normal of
    ``input_shapes`` (:mod:`medflare.export.job_model`), seeded with ``seed``.

    Raises:
        CheckpointError: as :func:`load_global_weights`; nothing written.
        ValueError, MissingDependency: as :func:`~medflare.training.model_export.export_model`.
    """
    shapes = check_input_shapes(input_shapes)
    load_global_weights(model_path, network)
    tensors = random_inputs(list(shapes.values()), next(iter(shapes.values()))[0], torch.float32, seed)
    stem = os.path.splitext(os.path.basename(model_path))[0]
    out_dir = out_dir if out_dir is not None else os.path.dirname(os.path.abspath(model_path))
    # OutcomeNet takes image= and clinical= by name (either may be absent); SegResNet's forward(x) by position
    parameters = inspect.signature(network.forward).parameters
    sample = dict(zip(shapes, tensors)) if all(n in parameters for n in shapes) else tensors
    return export_model(
        network, sample, out_dir, stem, formats, rtol=rtol, atol=atol, seed=seed + 1, input_names=list(shapes)
    )
