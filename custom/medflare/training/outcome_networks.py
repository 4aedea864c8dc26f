"""Outcome prediction from a chest X-ray, a table of clinical values, or both, as in EXAM.

EXAM (Dayan et al. 2021) fed a chest X-ray and the patient's vital signs and laboratory values
to one network and predicted the oxygen need; the plain chest X-ray classifier and the
clinical-table model are the two halves of it. :class:`OutcomeNet` is all three:

* **fusion**: a MONAI image network (e.g. ``DenseNet121`` or a ``ResNet``) maps the image to
  ``image_features`` numbers, a small MLP maps the table to its hidden width, and a linear head
  maps their concatenation to the outputs;
* **image only** (``clinical_features = 0``): the head sees the image embedding;
* **table only** (``image_network = None``): the head sees the table's MLP; with no hidden
  layer this is logistic regression, the model of FLamby's Fed-Heart-Disease benchmark.

Outputs are logits: one for a binary outcome, ``K`` for ``K`` independent labels
(multi-label, a sigmoid each).
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from medflare.training.model_spec import build_model

__all__ = ["OutcomeNet", "IMAGE_NETWORK_PREFIXES", "NORMS"]

#: normalisation of the image network: as built, or GroupNorm for DP-SGD
NORMS = ("batch", "group")

#: where an image network may come from
IMAGE_NETWORK_PREFIXES = ("monai.networks.nets.", "medflare.")


class OutcomeNet(nn.Module):
    """Args:
        num_outputs: logits out: 1 for a binary outcome, K >= 2 for K labels.
        clinical_features: number of table inputs; 0 for image only.
        image_network: ``{"path", "args"}`` of an image network from MONAI
            (``monai.networks.nets.*``) or medflare; its output width is its ``num_classes``
            argument when given (MONAI's ResNet), else ``out_channels``, set to
            ``image_features`` when absent (MONAI's DenseNet121). None for table only. In a job
            config the spec carries ``"config_type": "dict"`` so that NVFlare passes it on
            as written instead of building it.
        image_features: width of the image embedding when the network's args do not give it.
        clinical_hidden: widths of the table MLP's hidden layers ([] : the table goes straight
            to the head).
        dropout: dropout before the head, in [0, 1).
        seed: when an int, the weights are initialised from it, so the server and every site
            build the same initial model.
        norm: ``"batch"`` keeps the image network as built; ``"group"`` makes it trainable by
            DP-SGD (:func:`~medflare.training.dp_networks.make_dp_compatible`: every BatchNorm
            replaced by GroupNorm with ``gcd(32, channels)`` groups, activations and residual
            additions out of place). The state dict differs (no running statistics), so the
            server's persistor must name the same ``norm``.

    Raises:
        ValueError: for an empty model (no image and no table) or out-of-range arguments.
    """

    def __init__(
        self,
        num_outputs: int = 1,
        clinical_features: int = 0,
        image_network: Optional[Mapping[str, Any]] = None,
        image_features: int = 64,
        clinical_hidden: Sequence[int] = (32,),
        dropout: float = 0.0,
        seed: Optional[int] = None,
        norm: str = "batch",
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
        for name, value, low in (("num_outputs", num_outputs, 1), ("clinical_features", clinical_features, 0), ("image_features", image_features, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        hidden = list(clinical_hidden or [])
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"clinical_hidden must be a list of ints >= 1, got {clinical_hidden!r}")
        if image_network is None and clinical_features == 0:
            raise ValueError("an OutcomeNet needs an image_network, clinical_features > 0, or both")
        if image_network is not None:
            path = image_network.get("path") if isinstance(image_network, Mapping) else None
            if not isinstance(path, str) or not path.startswith(IMAGE_NETWORK_PREFIXES):
                # the spec is built here, not by NVFlare, so the site's class allow-list does not
                # see it: only MONAI's and medflare's networks are accepted
                raise ValueError(
                    f"image_network must be {{'path': one of {list(IMAGE_NETWORK_PREFIXES)}..., 'args': {{...}}, "
                    f"'config_type': 'dict'}}, got {image_network!r}"
                )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be an int >= 0 or null, got {seed!r}")
        # as SeededSegResNet: a seed fixes the initial weights and leaves the global generator alone
        with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            self.image_net = None
            width = 0
            if image_network is not None:
                spec = {"path": image_network["path"], "args": dict(image_network.get("args", {}))}
                # MONAI's DenseNet/EfficientNet name their output width out_channels, its ResNet num_classes
                key = "num_classes" if "num_classes" in spec["args"] else "out_channels"
                spec["args"].setdefault(key, image_features)
                self.image_net = build_model(spec)
                if norm == "group":
                    from medflare.training.dp_networks import make_dp_compatible

                    self.image_net = make_dp_compatible(self.image_net)
                width += spec["args"][key]
            self.clinical_net = None
            if clinical_features:
                layers: list[nn.Module] = []
                previous = clinical_features
                for h in hidden:
                    layers += [nn.Linear(previous, h), nn.ReLU()]
                    previous = h
                self.clinical_net = nn.Sequential(*layers) if layers else nn.Identity()
                width += previous
            self.dropout = nn.Dropout(dropout)
            self.head = nn.Linear(width, num_outputs)
        self.num_outputs = num_outputs
        self.clinical_features = clinical_features
        self.norm = norm

    @property
    def uses_image(self) -> bool:
        return self.image_net is not None

    @property
    def uses_clinical(self) -> bool:
        return self.clinical_net is not None

    def forward(self, image: Optional[torch.Tensor] = None, clinical: Optional[torch.Tensor] = None) -> torch.Tensor:
        parts = []
        if self.image_net is not None:
            if image is None:
                raise ValueError("this OutcomeNet takes an image")
            parts.append(self.image_net(image))
        if self.clinical_net is not None:
            if clinical is None:
                raise ValueError("this OutcomeNet takes clinical values")
            if clinical.shape[-1] != self.clinical_features:
                raise ValueError(f"expected {self.clinical_features} clinical values per case, got {clinical.shape[-1]}")
            parts.append(self.clinical_net(clinical))
        return self.head(self.dropout(torch.cat(parts, dim=1)))
