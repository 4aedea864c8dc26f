"""The QC report of a prepared folder: summary counts, ranges, histograms with and without matplotlib."""

import json
import os

import pytest

from medflare import optional_dependencies
from medflare.data.data_errors import DataListError
from medflare.preparation.prepare_segmentation import prepare_segmentation
from medflare.preparation.qc_report import BINS, write_qc_report
from medflare.preparation.recipe import SegmentationPreparation
from tests.unit.preparation.preparation_fixtures import brats_site


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    datalist, root = brats_site(tmp / "in")
    return prepare_segmentation(datalist, root, str(tmp / "out"), SegmentationPreparation())


def test_the_summary_counts_reasons_and_ranges(prepared):
    report = write_qc_report(prepared.out)
    summary = report["summary"]
    assert summary["counts"]["failed_by_reason"] == {"modality_count": 1, "non_finite": 1, "unreadable_file": 1}
    assert summary["failed"] == [
        {"case_id": "corrupt", "codes": ["unreadable_file"]},
        {"case_id": "three-modalities", "codes": ["modality_count"]},
        {"case_id": "with-nan", "codes": ["non_finite"]},
    ]
    assert summary["shape_range"] == [[12, 12]] * 3 and summary["spacing_range"] == [[1.0, 1.0]] * 3


def test_histograms_per_modality_count_every_brain_voxel(prepared):
    report = write_qc_report(prepared.out)
    with open(report["histograms_json"]) as f:
        histograms = json.load(f)
    assert list(histograms) == ["t1", "t1ce", "t2", "flair"]
    t1 = histograms["t1"]
    assert len(t1["counts"]) == BINS and t1["edges"][0] == -5.0 and t1["edges"][-1] == 5.0
    assert sum(t1["counts"]) == 3 * 10 * 12 * 12  # 3 passing cases, 10 brain slices of 12x12
    if optional_dependencies.available("matplotlib"):
        assert report["histograms_png"] and os.path.getsize(report["histograms_png"]) > 1000 and report["note"] is None


def test_without_matplotlib_the_counts_are_written_and_a_note_says_why(prepared, monkeypatch):
    monkeypatch.setattr(optional_dependencies, "available", lambda module: False)
    report = write_qc_report(prepared.out)
    assert report["histograms_png"] is None
    assert "matplotlib is not installed" in report["note"] and "pip install 'medflare[demo]'" in report["note"]
    assert os.path.isfile(report["histograms_json"])


def test_a_folder_without_a_manifest_is_refused(tmp_path):
    with pytest.raises(DataListError, match="this site has not prepared its data with medflare prepare"):
        write_qc_report(str(tmp_path))
