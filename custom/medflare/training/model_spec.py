"""Building a network from a JSON-friendly spec, the same way on server and sites.

A job names its network once per side as ``{"path": "monai.networks.nets.SegResNet",
"args": {...}}``: NVFlare's ``PTFileModelPersistor`` takes this form on the server, and the
medflare executors take it on the sites, so both build the same architecture.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

import torch

__all__ = ["DEFAULT_SEGRESNET", "build_model"]

#: A SegResNet small enough to train on a CPU, with BraTS's 4 input and 3 output channels.
DEFAULT_SEGRESNET = {
    "path": "monai.networks.nets.SegResNet",
    "args": {
        "spatial_dims": 3,
        "in_channels": 4,
        "out_channels": 3,
        "init_filters": 8,
        "blocks_down": [1, 2, 2, 4],
        "blocks_up": [1, 1, 1],
        "dropout_prob": 0.0,
    },
}


def build_model(spec: Mapping[str, Any]) -> torch.nn.Module:
    """Instantiate ``spec["path"]`` with ``spec["args"]``.

    Raises:
        ValueError: the spec is malformed, the class cannot be imported, or it is not a
            ``torch.nn.Module``.
        TypeError: the class refuses the arguments.
    """
    if not isinstance(spec, Mapping) or not isinstance(spec.get("path"), str):
        raise ValueError(f"model must be {{'path': 'package.module.Class', 'args': {{...}}}}, got {spec!r}")
    path = spec["path"]
    args = spec.get("args", {})
    if not isinstance(args, Mapping):
        raise ValueError(f"model args must be a JSON object, got {args!r}")
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"model path {path!r} cannot be imported: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"model path {path!r} is not a torch.nn.Module class")
    return cls(**dict(args))
