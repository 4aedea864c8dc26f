"""Tiny MONAI bundles built in tmp_path, and the site registry that allows them.

:func:`make_bundle` writes a bundle folder as MONAI lays one out (``configs/metadata.json``,
``configs/inference.json`` with ``network_def`` and ``preprocessing``, ``models/model.pt``);
:func:`make_hostile_bundle` one whose config writes a file when it is parsed;
:func:`write_registry` what a site admin writes to allow bundles (with their digests).
"""

from __future__ import annotations

import copy
import json
import os
from typing import Optional

import torch

from medflare.training.bundle_registry import bundle_digest

#: the tiny network of the test bundle, as its config and as the job's plain spec
TINY_BUNDLE_ARGS = {
    "spatial_dims": 3,
    "in_channels": 4,
    "out_channels": 3,
    "init_filters": 4,
    "blocks_down": [1, 1],
    "blocks_up": [1],
    "norm": ["GROUP", {"num_groups": 2}],
}
TINY_BUNDLE_SPEC = {"path": "monai.networks.nets.SegResNet", "args": TINY_BUNDLE_ARGS}

#: the bundle's own validation preprocessing: image only, deterministic, a 2 mm grid
PREPROCESSING = {
    "_target_": "Compose",
    "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [8.0, 8.0, 8.0], "mode": "bilinear"},
        {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True},
        {"_target_": "EnsureTyped", "keys": "image"},
    ],
}


def _write_json(path, content) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(content, f, indent=2)


def make_bundle(
    root,
    name: str = "tiny_brats",
    version: str = "0.1.0",
    network_args: Optional[dict] = None,
    preprocessing: Optional[dict] = PREPROCESSING,
    weights: bool = True,
    seed: int = 7,
    extra_config: Optional[dict] = None,
) -> str:
    """A bundle folder ``root/name``; its weights are a seeded SegResNet's state dict."""
    from monai.networks.nets import SegResNet

    folder = os.path.join(str(root), name)
    args = copy.deepcopy(TINY_BUNDLE_ARGS if network_args is None else network_args)
    config = {"bundle_root": ".", "network_def": {"_target_": "SegResNet", **args}}
    if preprocessing is not None:
        config["preprocessing"] = copy.deepcopy(preprocessing)
    config.update(extra_config or {})
    metadata = {
        "version": version,
        "monai_version": "1.6.1",
        "name": name,
        "network_data_format": {
            "inputs": {"image": {"type": "image", "num_channels": args["in_channels"]}},
            "outputs": {"pred": {"type": "image", "num_channels": args["out_channels"]}},
        },
    }
    _write_json(os.path.join(folder, "configs", "metadata.json"), metadata)
    _write_json(os.path.join(folder, "configs", "inference.json"), config)
    with open(os.path.join(folder, "LICENSE"), "w") as f:
        f.write("test bundle\n")
    if weights:
        torch.manual_seed(seed)
        net = SegResNet(**{k: tuple(v) if k == "norm" else v for k, v in args.items()})
        os.makedirs(os.path.join(folder, "models"), exist_ok=True)
        torch.save(net.state_dict(), os.path.join(folder, "models", "model.pt"))
    return folder


def make_hostile_bundle(root, marker, name: str = "hostile") -> str:
    """A bundle whose ``network_def`` and another item write ``marker`` when evaluated."""
    folder = make_bundle(root, name=name)
    path = os.path.join(folder, "configs", "inference.json")
    with open(path) as f:
        config = json.load(f)
    write = f"$open({str(marker)!r}, 'w').write('evaluated')"
    config["network_def"] = write
    config["imports"] = [write]
    _write_json(path, config)
    return folder


def write_registry(path, bundles: dict, versions: Optional[dict] = None, digests: Optional[dict] = None, **entry_extra) -> str:
    """A registry file at ``path`` allowing ``{name: folder}`` with each folder's version
    (from its metadata unless given) and digest (computed unless given)."""
    entries = {}
    for name, folder in bundles.items():
        try:
            with open(os.path.join(folder, "configs", "metadata.json")) as f:
                version = json.load(f)["version"]
        except (OSError, ValueError):  # a test breaking the metadata on purpose
            version = "0.1.0"
        entries[name] = {
            "path": str(folder),
            "version": (versions or {}).get(name, version),
            "sha256": (digests or {}).get(name) or bundle_digest(str(folder)),
            **entry_extra,
        }
    _write_json(str(path), {"bundles": entries})
    return str(path)
