"""Brain-tumour label conventions: which label values make up the evaluation regions.

The BraTS challenges and the Medical Segmentation Decathlon number the same tumour parts
differently, so a label volume means nothing without its convention:

=============  ==========================================  ===================  ==========  ==========
convention     labels                                      TC (tumour core)     WT (whole)  ET
=============  ==========================================  ===================  ==========  ==========
``brats2021``  1 necrotic core, 2 oedema, 4 enhancing      1, 4                 1, 2, 4     4
``brats2023``  1 necrotic core, 2 oedema (SNFH), 3 enh.    1, 3                 1, 2, 3     3
``msd_task01`` 1 oedema, 2 non-enhancing, 3 enhancing      2, 3                 1, 2, 3     3
=============  ==========================================  ===================  ==========  ==========

(BraTS 2018-2021 [1]: TC = NCR + ET, WT = every tumour label, ET = ET; BraTS 2023 [2] renumbered
ET from 4 to 3; MSD Task01 [3] numbers oedema first.) A datalist records its convention
(``"label_convention"``) and its ``"labels"`` map; :func:`convention_from_labels_map` names
the convention a map describes, so a datalist written by another tool is read by its map, not
by a guess. Pure: numpy or torch arrays in, no MONAI, no files.

References:
    1. Menze et al., "The Multimodal Brain Tumor Image Segmentation Benchmark (BRATS)", IEEE TMI
       34(10), 2015; Baid et al., "The RSNA-ASNR-MICCAI BraTS 2021 Benchmark", arXiv:2107.02314.
    2. Karargyris et al. / BraTS 2023 challenge, "The Brain Tumor Segmentation (BraTS) Challenge
       2023: Glioma Segmentation in Sub-Saharan Africa", arXiv:2305.19369, Sec. 2 (labels 1, 2, 3).
    3. Antonelli et al., "The Medical Segmentation Decathlon", Nat. Commun. 13, 4128 (2022);
       Task01_BrainTumour ``dataset.json``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from medflare.data.data_errors import DataListError

__all__ = [
    "CONVENTIONS",
    "DEFAULT_CONVENTION",
    "REGION_NAMES",
    "LabelConvention",
    "convention_from_labels_map",
    "get_convention",
    "tumour_regions",
    "values_outside",
]

#: The three evaluation regions, in output-channel order.
REGION_NAMES = ("tc", "wt", "et")

#: The convention of a datalist that names none (every datalist medflare wrote before 2023 data).
DEFAULT_CONVENTION = "brats2021"


@dataclass(frozen=True)
class LabelConvention:
    """A label numbering: ``labels`` ``{value: name}`` (0 is background) and, per region of
    :data:`REGION_NAMES`, the label values it is the union of."""

    name: str
    labels: tuple  # ((value, name), ...), background first
    regions: tuple  # ((tc values), (wt values), (et values))
    aliases: tuple  # per label value: the names (normalised) a datalist's "labels" map may use

    @property
    def values(self) -> tuple:
        """Every label value allowed in a volume, background included, ascending."""
        return tuple(v for v, _ in self.labels)

    def labels_map(self) -> dict:
        """The ``"labels"`` map a datalist of this convention records: ``{"0": "background", ...}``."""
        return {str(v): n for v, n in self.labels}


_BACKGROUND = ("background", "bg", "normal", "healthy")
_NCR = ("necrotic core", "necrotic tumour core", "ncr", "ncr net", "netc", "necrosis",
        "necrotic and non enhancing tumour core", "non enhancing tumour core", "necrotic tumour")
_OEDEMA = ("oedema", "peritumoural oedema", "ed", "snfh", "surrounding non enhancing flair hyperintensity",
           "whole tumour oedema")
_ET = ("enhancing tumour", "et", "enhancing tumour core", "gd enhancing tumour", "enhancing")
_NON_ENHANCING = ("non enhancing tumour", "net", "non enhancing", "non enhancing tumour core")

CONVENTIONS: dict[str, LabelConvention] = {
    "brats2021": LabelConvention(
        "brats2021",
        ((0, "background"), (1, "necrotic core"), (2, "oedema"), (4, "enhancing tumour")),
        ((1, 4), (1, 2, 4), (4,)),
        (_BACKGROUND, _NCR, _OEDEMA, _ET),
    ),
    "brats2023": LabelConvention(
        "brats2023",
        ((0, "background"), (1, "necrotic core"), (2, "oedema"), (3, "enhancing tumour")),
        ((1, 3), (1, 2, 3), (3,)),
        (_BACKGROUND, _NCR, _OEDEMA, _ET),
    ),
    "msd_task01": LabelConvention(
        "msd_task01",
        ((0, "background"), (1, "edema"), (2, "non-enhancing tumor"), (3, "enhancing tumour")),
        ((2, 3), (1, 2, 3), (3,)),
        (_BACKGROUND, _OEDEMA, _NON_ENHANCING, _ET),
    ),
}


def get_convention(name) -> LabelConvention:
    """The convention called ``name``.

    Raises:
        ValueError: ``name`` is not a string naming one of :data:`CONVENTIONS`.
    """
    if not isinstance(name, str) or name not in CONVENTIONS:
        raise ValueError(f"label_convention must be one of {sorted(CONVENTIONS)}, got {name!r}")
    return CONVENTIONS[name]


def _normalise(name: str) -> str:
    text = re.sub(r"[^a-z0-9]+", " ", name.lower()).strip()
    text = re.sub(r"\bedema\b", "oedema", text)
    text = re.sub(r"\btumor\b", "tumour", text)
    text = re.sub(r"\bperitumoral\b", "peritumoural", text)
    return re.sub(r"\bnonenhancing\b", "non enhancing", text)


def convention_from_labels_map(labels, where: str) -> str:
    """The name of the convention whose values and names a ``"labels"`` map matches.

    Names are compared case-insensitively, with punctuation, "edema"/"oedema" and
    "tumor"/"tumour" spellings ignored; the values must be exactly the convention's.

    Args:
        labels: ``{"0": "background", "1": "edema", ...}`` as a datalist or ``dataset.json`` holds it.
        where: names the file in the message, e.g. ``"datalist /d/datalist.json"``.

    Raises:
        DataListError: ``labels`` is not a map of integer keys to names, or matches no convention
            (the message says what was found and what each convention expects).
    """
    if not isinstance(labels, Mapping) or not labels:
        raise DataListError(f"{where}: 'labels' must be a non-empty map {{value: name}}, got {labels!r}")
    found = {}
    for key, name in labels.items():
        if not isinstance(key, str) or not re.fullmatch(r"\d+", key.strip()) or not isinstance(name, str):
            raise DataListError(f"{where}: 'labels' must map integer values to names, got {key!r}: {name!r}")
        found[int(key)] = _normalise(name)
    for convention in CONVENTIONS.values():
        if set(found) != set(convention.values):
            continue
        if all(found[v] in aliases for v, aliases in zip(convention.values, convention.aliases)):
            return convention.name
    expected = "; ".join(f"{c.name}: {c.labels_map()}" for c in CONVENTIONS.values())
    raise DataListError(
        f"{where}: the 'labels' map {dict(labels)!r} matches no known tumour label convention "
        f"(expected one of {expected}); write 'label_convention' and a matching 'labels' map"
    )


def values_outside(values, convention: LabelConvention) -> list:
    """The label values in ``values`` (any iterable of numbers) that ``convention`` does not allow."""
    allowed = set(convention.values)
    return sorted({int(v) if float(v).is_integer() else float(v) for v in values} - allowed)


def tumour_regions(label, convention: LabelConvention):
    """The TC, WT and ET masks of a label volume, stacked as the first axis.

    ``region_c = OR_{v in regions[c]} (label == v)`` for ``c`` in TC, WT, ET. A leading channel
    axis of size 1 is dropped first, as MONAI's ``ConvertToMultiChannelBasedOnBratsClasses``
    does, so ``(x, y, z)`` and ``(1, x, y, z)`` both give ``(3, x, y, z)``.

    Args:
        label: a numpy array or torch tensor of label values.
        convention: the numbering of ``label``.

    Returns:
        Boolean masks of the same array type, shape ``(3, *spatial)``.
    """
    if label.ndim == 4 and label.shape[0] == 1:
        label = label[0]
    masks = []
    for values in convention.regions:
        mask = label == values[0]
        for v in values[1:]:
            mask = mask | (label == v)
        masks.append(mask)
    if isinstance(label, np.ndarray):
        return np.stack(masks)
    import torch

    return torch.stack(masks)
