"""A site-installed MONAI bundle's network, weights and preprocessing, for medflare's trainers.

:func:`load_bundle` takes a job's request (a name, never a path), checks it against the site's
bundle registry (:mod:`medflare.training.bundle_registry`: allow-listed, version, checksum) and
only then parses the bundle's config with ``monai.bundle.ConfigParser``. What is used of it:

- the **network**, the config id ``network_key`` (``network_def``), optionally with the weights
  file loaded (``torch.load(..., weights_only=True)``; a plain state dict or ``{"model": ...}``);
  checked for the job's input and output channels by one forward pass of a zero crop
  (:func:`check_network_channels`) and, against the job's plain network spec (the one the
  server's persistor builds), for the same parameter names and shapes
  (:func:`check_same_architecture`), so the server aggregates a model every site can load;
- with ``use_preprocessing``, the bundle's ``preprocessing`` chain for **validation**
  (:func:`bundle_validation_transforms`): medflare's own chain loads the label and turns it into
  the TC / WT / ET channels (its label conversion is medflare's, whatever the bundle does), then
  the bundle's chain loads and prepares the image from the datalist's image paths, replacing
  medflare's image preparation, and the label is resampled (nearest) onto the grid the bundle's
  chain gave the image. The bundle's chain may only transform ``image`` and must be
  deterministic; it is refused otherwise. Training keeps medflare's chain (random crops and
  augmentation), so a bundle whose intensity normalisation differs from medflare's (z-score over
  the brain, per channel) is trained and scored on different inputs: check that first.

The bundle config's expressions run here: that is why only the site's own, checksummed,
allow-listed bundles are parsed. A config macro that reads another file (``"%/path#id"``) is
refused, since that file is outside the checksum.
"""

from __future__ import annotations

import copy
import io
import os
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from medflare.training.bundle_registry import BundleError, BundleRequest, SiteBundle, read_site_bundle

__all__ = [
    "LoadedBundle",
    "bundle_validation_transforms",
    "check_network_channels",
    "check_same_architecture",
    "load_bundle",
]

PREPROCESSING_KEY = "preprocessing"
_BUNDLE_SOURCE = "_medflare_bundle_image_source"


def _refuse_file_macros(config, bundle: SiteBundle, where: str = "") -> None:
    from monai.bundle import ConfigParser

    if isinstance(config, dict):
        for key, value in config.items():
            _refuse_file_macros(value, bundle, f"{where}#{key}" if where else str(key))
    elif isinstance(config, list):
        for i, value in enumerate(config):
            _refuse_file_macros(value, bundle, f"{where}#{i}")
    elif isinstance(config, str) and config.startswith("%"):
        path, _ = ConfigParser.split_path_id(config[1:])
        if path:
            raise BundleError(
                f"bundle {bundle.name!r} ({bundle.registry}): {bundle.config_file} item {where!r} reads another file by "
                f"macro {config!r}; only the checksummed bundle config is parsed"
            )


@dataclass
class LoadedBundle:
    """A checked site bundle with its parser; see the module docstring."""

    bundle: SiteBundle
    request: BundleRequest
    parser: object  # monai.bundle.ConfigParser

    @property
    def name(self) -> str:
        return self.bundle.name

    def _where(self) -> str:
        return f"bundle {self.bundle.name!r} ({self.bundle.folder}/{self.bundle.config_file})"

    def build_network(self) -> torch.nn.Module:
        """A new instance of the config's ``network_key``, with the bundle's weights when asked.

        Raises:
            BundleError: the config lacks the id, it is not a ``torch.nn.Module``, it cannot be
                built, or the weights file does not load into it exactly.
        """
        key = self.request.network_key
        if key not in self.parser:
            raise BundleError(f"{self._where()} has no {key!r}; its top-level ids: {sorted(self.bundle.config)}")
        try:
            network = self.parser.get_parsed_content(key, lazy=False)
        except Exception as e:
            raise BundleError(f"{self._where()}: {key!r} cannot be built: {type(e).__name__}: {e}") from None
        if not isinstance(network, torch.nn.Module):
            raise BundleError(f"{self._where()}: {key!r} is a {type(network).__name__}, not a torch.nn.Module")
        if self.request.load_weights:
            self._load_weights(network)
        return network

    def _load_weights(self, network: torch.nn.Module) -> None:
        where = f"bundle {self.bundle.name!r}: weights {os.path.join(self.bundle.folder, self.bundle.weights_file)}"
        try:
            state = torch.load(io.BytesIO(self.bundle.weights), map_location="cpu", weights_only=True)
        except Exception as e:
            raise BundleError(f"{where} is not a readable weights-only torch file: {type(e).__name__}: {e}") from None
        if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
            state = state["model"]
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise BundleError(f"{where} must hold a state dict of tensors (or {{'model': state dict}})")
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise BundleError(f"{where} does not fit its {self.request.network_key!r}: {e}") from None

    def preprocessing(self):
        """The config's ``preprocessing`` chain, built (a MONAI ``Compose``), checked to transform
        only ``image`` and to draw no random numbers.

        Raises:
            BundleError: not declared, cannot be built, or a transform touches another key, is
                not a dictionary transform, or is random.
        """
        from monai.transforms import Compose, MapTransform, Randomizable

        if PREPROCESSING_KEY not in self.parser:
            raise BundleError(f"{self._where()} declares no {PREPROCESSING_KEY!r}; ask for use_preprocessing false")
        try:
            chain = self.parser.get_parsed_content(PREPROCESSING_KEY, lazy=False)
        except Exception as e:
            raise BundleError(f"{self._where()}: {PREPROCESSING_KEY!r} cannot be built: {type(e).__name__}: {e}") from None
        transforms = list(chain.flatten().transforms) if isinstance(chain, Compose) else None
        if not transforms:
            raise BundleError(f"{self._where()}: {PREPROCESSING_KEY!r} must be a non-empty Compose, got {chain!r}")
        for i, t in enumerate(transforms):
            name = type(t).__name__
            if not isinstance(t, MapTransform):
                raise BundleError(f"{self._where()}: {PREPROCESSING_KEY} transform {i} ({name}) is not a dictionary transform")
            if set(t.keys) != {"image"}:
                raise BundleError(
                    f"{self._where()}: {PREPROCESSING_KEY} transform {i} ({name}) transforms keys {list(t.keys)}; "
                    "only 'image' is taken from a bundle (the label is medflare's)"
                )
            if isinstance(t, Randomizable):
                raise BundleError(f"{self._where()}: {PREPROCESSING_KEY} transform {i} ({name}) is random; validation must be deterministic")
        return Compose(transforms)


def load_bundle(
    request: BundleRequest, site_name: str, local_dir: Optional[str], environ: Optional[Mapping[str, str]] = None
) -> LoadedBundle:
    """Check ``request`` against the site's registry, then parse the bundle's config.

    Raises:
        BundleError: everything :func:`~medflare.training.bundle_registry.read_site_bundle`
            refuses, and a config macro that reads another file.
    """
    from monai.bundle import ConfigParser

    bundle = read_site_bundle(request, site_name, local_dir, environ)
    config = copy.deepcopy(bundle.config)
    _refuse_file_macros(config, bundle)
    config["bundle_root"] = bundle.folder  # as MONAI's bundle workflows override it
    parser = ConfigParser(config)
    parser.read_meta(copy.deepcopy(bundle.metadata))
    return LoadedBundle(bundle, request, parser)


def check_network_channels(
    network: torch.nn.Module, in_channels: int, out_channels: int, spatial_size: Sequence[int], what: str
) -> None:
    """One forward pass of a zero ``(1, in_channels, *spatial_size)`` crop must give a
    ``(1, out_channels, *spatial_size)`` tensor (the network is left in training mode).

    Raises:
        BundleError: naming ``what``, the channels asked for and what the network did.
    """
    need = f"{in_channels} input and {out_channels} output channels on a {tuple(spatial_size)} crop"
    probe = torch.zeros((1, in_channels, *spatial_size))
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            out = network(probe.to(next(network.parameters(), probe).device))
    except Exception as e:
        first = next((m for m in network.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
        seen = f"; its first convolution takes {first.in_channels} channels" if first is not None else ""
        raise BundleError(f"{what}: the job needs {need}, and the network fails on it{seen}: {type(e).__name__}: {e}") from None
    finally:
        network.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, out_channels, *spatial_size):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BundleError(f"{what}: the job needs {need}; the network's output is {got}")


def check_same_architecture(network: torch.nn.Module, reference: torch.nn.Module, what: str, reference_what: str) -> None:
    """``network`` and ``reference`` must have the same state-dict names and shapes.

    Raises:
        BundleError: listing (up to 5 of each) the names only one has and the shapes that differ.
    """
    mine = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if mine == theirs:
        return
    only_mine = sorted(set(mine) - set(theirs))
    only_theirs = sorted(set(theirs) - set(mine))
    shapes = [f"{k}: {mine[k]} vs {theirs[k]}" for k in sorted(set(mine) & set(theirs)) if mine[k] != theirs[k]]
    parts = []
    for label, items in ((f"only in {what}", only_mine), (f"only in {reference_what}", only_theirs), ("shapes differ", shapes)):
        if items:
            parts.append(f"{label} ({len(items)}): {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}")
    raise BundleError(
        f"{what} and {reference_what} are not the same architecture (the server aggregates the latter): " + "; ".join(parts)
    )


class _KeepImageSource:
    """Remember the datalist's image paths before medflare's chain loads them. A single 4-D
    image file whose channels medflare reorders (``channel_order``) is refused: the bundle's
    chain would see its channels in the file's order."""

    def __call__(self, data):
        d = dict(data)
        if d.get("channel_order") is not None:
            from medflare.data.data_errors import DataListError

            raise DataListError(
                f"{d['image']}: a 4-D image file with a channel order is not supported with a bundle's preprocessing; "
                "use four modality files, or use_preprocessing false"
            )
        d[_BUNDLE_SOURCE] = copy.deepcopy(d["image"])
        return d


class _RestoreImageSource:
    """Put the image paths back (dropping medflare's image) for the bundle's chain."""

    def __call__(self, data):
        d = dict(data)
        d["image"] = d.pop(_BUNDLE_SOURCE)
        d.pop("image_meta_dict", None)
        return d


class _CheckImage:
    """The bundle's chain must give a ``(channels, x, y, z)`` image."""

    def __init__(self, channels: int, bundle: str):
        self.channels = channels
        self.bundle = bundle

    def __call__(self, data):
        image = data["image"]
        shape = tuple(getattr(image, "shape", ()))
        if len(shape) != 4 or shape[0] != self.channels:
            from medflare.data.data_errors import DataListError

            source = getattr(image, "meta", {}).get("filename_or_obj", "?")
            raise DataListError(
                f"bundle {self.bundle!r}'s preprocessing gave an image of shape {shape} for {source}; "
                f"the network takes ({self.channels}, x, y, z)"
            )
        return data


def bundle_validation_transforms(loaded: LoadedBundle, medflare_val_chain, in_channels: int):
    """The validation chain with the bundle's preprocessing (see the module docstring):
    medflare's ``medflare_val_chain`` (label loading and conversion), then the bundle's image
    chain from the datalist's paths, then the label resampled onto the image's grid."""
    from monai import transforms as T

    return T.Compose(
        [
            _KeepImageSource(),
            medflare_val_chain,
            _RestoreImageSource(),
            loaded.preprocessing(),
            _CheckImage(in_channels, loaded.name),
            T.ResampleToMatchd(keys="label", key_dst="image", mode="nearest"),
        ]
    )
