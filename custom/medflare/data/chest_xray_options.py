"""How a job reads a public chest X-ray table: label policy, blank labels, views and the patient split.

The pure rules behind :mod:`medflare.data.chest_xray_tables`, apart from any file:

* **Label policy** for CheXpert's uncertain mentions (value ``-1.0``), as compared by
  Irvin et al. [1] section "Uncertainty approaches": ``u_ones`` (uncertain is positive),
  ``u_zeros`` (uncertain is negative), ``ignore`` (U-Ignore: the label is left out of the
  loss and the metrics, written :data:`~medflare.data.outcome_table.IGNORE_LABEL` = -1).
* **Blank** (the observation is not mentioned in the report): ``negative`` (0, as [1] trains)
  or ``ignore``.
* **Views**: ``None`` keeps the frontal images (CheXpert ``Frontal/Lateral == Frontal``;
  MIMIC ``ViewPosition`` PA or AP), ``"all"`` keeps every image, a list keeps those view
  positions (:data:`VIEW_POSITIONS`; a CheXpert lateral image is ``LATERAL``, a frontal one is
  its ``AP/PA`` value).
* **Patient split** where the site has no official one: patients (never images) are permuted
  with ``numpy.random.default_rng(split_seed)`` in sorted-id order and the first
  ``round(test_fraction * P)`` (at least 1, at most P - 1) are the test patients, so no
  patient has images on both sides [2].

References:
    1. Irvin J. et al., CheXpert: a large chest radiograph dataset with uncertainty labels and
       expert comparison, AAAI 2019.
    2. Johnson A. E. W. et al., MIMIC-CXR-JPG, a large publicly available database of labeled
       chest radiographs, arXiv:1901.07042 (2019): the official split is by patient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from medflare.data.outcome_table import IGNORE_LABEL

__all__ = [
    "BLANK_LABELS",
    "CHEXPERT_OBSERVATIONS",
    "ChestXrayTableOptions",
    "LABEL_POLICIES",
    "TABLE_FORMATS",
    "VIEW_POSITIONS",
    "apply_label_policy",
    "split_test_patients",
]

TABLE_FORMATS = ("auto", "medflare", "chexpert", "mimic_cxr")
LABEL_POLICIES = ("u_ones", "u_zeros", "ignore")
BLANK_LABELS = ("negative", "ignore")

#: the 14 observations of the CheXpert labeler, in the tables' column order [1]
CHEXPERT_OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

#: view positions a job may keep: MIMIC-CXR's ``ViewPosition`` values, CheXpert's ``AP/PA``
#: values and ``LATERAL`` for CheXpert's lateral images
VIEW_POSITIONS = (
    "PA", "AP", "LATERAL", "LL", "RL", "LAO", "RAO", "LPO", "AP AXIAL", "PA LLD", "AP LLD",
    "AP RLD", "PA RLD", "XTABLE LATERAL", "SWIMMERS",
)  # fmt: skip
FRONTAL_VIEWS = ("PA", "AP")


@dataclass(frozen=True)
class ChestXrayTableOptions:
    """A job's choices for reading a CheXpert or MIMIC-CXR table (see the module docstring).

    Args:
        table_format: ``auto`` (detect), ``medflare``, ``chexpert`` or ``mimic_cxr``.
        label_policy: ``u_ones``, ``u_zeros`` or ``ignore``; None refuses a CheXpert or MIMIC
            table (the job must choose: [1] shows the choice moves AUC per observation).
        blank_labels: ``negative`` or ``ignore``.
        views: None (frontal), ``"all"``, or a list of :data:`VIEW_POSITIONS`.
        test_fraction: share of patients in the test split, in (0, 1), where the site has no
            official split.
        split_seed: int >= 0 seeding that split.

    Raises:
        ValueError: naming the argument, its value and what is allowed.
    """

    table_format: str = "auto"
    label_policy: Optional[str] = None
    blank_labels: str = "negative"
    views: Union[None, str, tuple[str, ...]] = None
    test_fraction: float = 0.2
    split_seed: int = 0

    def __post_init__(self):
        _one_of("table_format", self.table_format, TABLE_FORMATS)
        if self.label_policy is not None:
            _one_of("label_policy", self.label_policy, LABEL_POLICIES)
        _one_of("blank_labels", self.blank_labels, BLANK_LABELS)
        object.__setattr__(self, "views", _check_views(self.views))
        fraction = self.test_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (math.isfinite(fraction) and 0 < fraction < 1):
            raise ValueError(f"test_fraction must be a number in (0, 1), got {fraction!r}")
        seed = self.split_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"split_seed must be an int >= 0, got {seed!r}")

    def keeps_view(self, view: str, frontal: bool) -> bool:
        """Whether an image of ``view`` (upper case; ``""`` unknown) is kept; ``frontal`` is the
        table's own frontal flag (CheXpert's ``Frontal/Lateral``)."""
        if self.views is None:
            return frontal
        return self.views == "all" or view in self.views

    @property
    def views_text(self) -> str:
        return "frontal (the default)" if self.views is None else repr(self.views if self.views == "all" else list(self.views))


def _one_of(name: str, value, allowed: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check_views(views):
    if views is None or views == "all":
        return views
    if not isinstance(views, (list, tuple)) or not views or any(not isinstance(v, str) for v in views):
        raise ValueError(f"views must be null (frontal), 'all' or a non-empty list of view positions {list(VIEW_POSITIONS)}, got {views!r}")
    upper = tuple(v.strip().upper() for v in views)
    unknown = [v for v, u in zip(views, upper) if u not in VIEW_POSITIONS]
    if unknown:
        raise ValueError(f"views names unknown view position(s) {unknown}; allowed: {list(VIEW_POSITIONS)}, null (frontal) or 'all'")
    if len(set(upper)) != len(upper):
        raise ValueError(f"views names a view twice: {list(views)!r}")
    return upper


#: a label cell as written -> its meaning; anything else is refused
_LABEL_VALUES = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": -1, "-1.0": -1, "": None}


def apply_label_policy(text: Optional[str], options: ChestXrayTableOptions) -> Optional[int]:
    """The training label of one cell: 1, 0 or :data:`IGNORE_LABEL`; None when ``text`` is not a
    CheXpert label value (1.0, 0.0, -1.0 or blank), for the caller to refuse naming the cell.

    ============  ========  =========  ========
    cell          u_ones    u_zeros    ignore
    ============  ========  =========  ========
    ``1.0``       1         1          1
    ``0.0``       0         0          0
    ``-1.0``      1         0          -1
    blank         0 (``blank_labels="negative"``) or -1 (``"ignore"``)
    ============  ========  =========  ========
    """
    key = (text or "").strip()
    if key not in _LABEL_VALUES:
        return None
    value = _LABEL_VALUES[key]
    if value is None:
        return 0 if options.blank_labels == "negative" else IGNORE_LABEL
    if value == -1:
        return {"u_ones": 1, "u_zeros": 0, "ignore": IGNORE_LABEL}[options.label_policy]
    return value


def split_test_patients(patients, test_fraction: float, split_seed: int) -> set:
    """The test patients of a seeded patient-level split (the module docstring's rule).

    Raises:
        ValueError: fewer than 2 patients (no split leaves both sides non-empty).
    """
    ordered = sorted(set(patients))
    if len(ordered) < 2:
        raise ValueError(f"a patient-level split needs at least 2 patients, got {len(ordered)}")
    count = min(max(round(test_fraction * len(ordered)), 1), len(ordered) - 1)
    order = np.random.default_rng(split_seed).permutation(len(ordered))
    return {ordered[i] for i in order[:count]}
