"""Building a network from a JSON-friendly spec, the same way on server and sites.

A job names its network once per side as ``{"path": "monai.networks.nets.SegResNet",
"args": {...}}``: NVFlare's ``PTFileModelPersistor`` takes this form on the server, and the
medflare executors take it on the sites, so both build the same architecture.

A segmentation job may instead name a MONAI bundle the site installed
(:mod:`medflare.training.monai_bundles`): ``{"bundle": "brats_mri_segmentation", "version":
"0.5.3", ..., "network": {"path": ..., "args": ...}}``. The sites build the bundle's network;
``network`` is its plain equivalent, what the server builds and what the sites check the
bundle's network against (same parameter names and shapes). :func:`build_model` builds that
plain equivalent, so a job check or an audit sees the architecture the federation trains.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

import torch

__all__ = ["BUNDLE_KEY", "BUNDLE_NETWORK_KEY", "DEFAULT_SEGRESNET", "build_model", "is_bundle_spec", "split_bundle_spec"]

#: the key of a model spec naming a site bundle, and the key of its plain network equivalent
BUNDLE_KEY = "bundle"
BUNDLE_NETWORK_KEY = "network"

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


def is_bundle_spec(spec) -> bool:
    """Whether ``spec`` names a site bundle (``{"bundle": ...}``) rather than a class."""
    return isinstance(spec, Mapping) and BUNDLE_KEY in spec


def split_bundle_spec(spec: Mapping[str, Any]) -> tuple[dict, dict]:
    """``(bundle request, plain network spec)`` of a bundle model spec.

    Raises:
        ValueError: ``network`` is missing or not ``{"path", "args"}``.
    """
    request = {k: v for k, v in spec.items() if k != BUNDLE_NETWORK_KEY}
    network = spec.get(BUNDLE_NETWORK_KEY)
    if not isinstance(network, Mapping) or not isinstance(network.get("path"), str) or is_bundle_spec(network):
        raise ValueError(
            f"a model naming bundle {spec.get(BUNDLE_KEY)!r} needs {BUNDLE_NETWORK_KEY!r}: {{'path': 'package.module.Class', "
            f"'args': {{...}}}}, the plain network the server builds (the sites check the bundle's network against it), "
            f"got {network!r}"
        )
    return request, dict(network)


def build_model(spec: Mapping[str, Any]) -> torch.nn.Module:
    """Instantiate ``spec["path"]`` with ``spec["args"]``; for a bundle spec, its plain
    ``network`` (see the module docstring).

    Raises:
        ValueError: the spec is malformed, the class cannot be imported, or it is not a
            ``torch.nn.Module``.
        TypeError: the class refuses the arguments.
    """
    if is_bundle_spec(spec):
        spec = split_bundle_spec(spec)[1]
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
