"""verify_preparation: a site's prepared data is the job's preparation, unchanged, or a refusal that says what to do."""

import json
import os

import pytest

from medflare.preparation import file_hashes
from medflare.preparation.prepare_segmentation import prepare_segmentation
from medflare.preparation.prepare_xray import prepare_xray
from medflare.preparation.recipe import SegmentationPreparation, XrayPreparation
from medflare.preparation.verification import (
    PreparationMismatch,
    check_required_preparation,
    version_satisfies,
    verify_preparation,
)
from tests.unit.preparation.preparation_fixtures import brats_site, xray_site

REQUIRED = {"name": "medflare-brats-prep", "version": ">=1.0,<2"}


@pytest.fixture()
def site(tmp_path):
    datalist, root = brats_site(tmp_path / "in")
    file_hashes.forget_file_hashes()
    return prepare_segmentation(datalist, root, str(tmp_path / "out"), SegmentationPreparation())


def test_an_unchanged_preparation_passes_by_folder_by_manifest_and_by_datalist(site):
    manifest = verify_preparation(site.out, REQUIRED, datalist=site.datalist)
    assert manifest["counts"]["passed"] == 3
    assert verify_preparation(site.manifest_path, {**REQUIRED, "parameters_hash": SegmentationPreparation().parameters_hash()})
    assert verify_preparation(site.out, {"name": "medflare-brats-prep", "version": "1.0.0"}, files=["good-1/good-1_t1.nii.gz"])


def _refusal(*args, **kwargs) -> str:
    with pytest.raises(PreparationMismatch) as refused:
        verify_preparation(*args, **kwargs)
    return str(refused.value)


def test_missing_and_unreadable_manifests_are_refused(tmp_path, site):
    assert "this site has not prepared its data with medflare prepare: no medflare_preparation.json in" in _refusal(str(tmp_path), REQUIRED)
    with open(site.manifest_path, "w") as f:
        f.write('{"format": 1')
    assert "is unreadable (JSONDecodeError" in _refusal(site.out, REQUIRED)
    with open(site.manifest_path, "w") as f:
        json.dump({"format": 1, "name": "x"}, f)
    assert "lacks ['version', 'parameters', 'parameters_hash', 'cases', 'counts']" in _refusal(site.out, REQUIRED)


def test_another_version_name_or_parameters_is_refused_with_what_to_rerun(site):
    message = _refusal(site.out, {"name": "medflare-brats-prep", "version": ">=1.1"})
    assert message.startswith("site prepared with version 1.0.0 of medflare-brats-prep, the job requires >=1.1; re-run `medflare prepare`")
    assert "site prepared its data with 'medflare-brats-prep', the job requires 'medflare-xray-prep'" in _refusal(
        site.out, {"name": "medflare-xray-prep", "version": "1"}
    )
    other = SegmentationPreparation(target_spacing=(1, 1, 1)).parameters_hash()
    message = _refusal(site.out, {**REQUIRED, "parameters_hash": other})
    assert f"the job requires parameters hash {other[:12]}" in message and '"normalise": "zscore"' in message


def test_a_manifest_edited_by_hand_is_refused(site):
    with open(site.manifest_path) as f:
        manifest = json.load(f)
    manifest["version"] = "0.9.0"
    with open(site.manifest_path, "w") as f:
        json.dump(manifest, f)
    assert "site prepared with version 0.9.0 of medflare-brats-prep, the job requires >=1.0,<2" in _refusal(site.out, REQUIRED)
    manifest["version"] = "1.0.0"
    manifest["parameters"]["normalise"] = "none"  # claims other parameters than it was hashed with
    with open(site.manifest_path, "w") as f:
        json.dump(manifest, f)
    assert "its parameters do not hash to its parameters_hash" in _refusal(site.out, REQUIRED)


def test_a_changed_file_or_a_file_not_in_the_manifest_is_refused(site):
    path = os.path.join(site.out, "good-2", "good-2_flair.nii.gz")
    verify_preparation(site.out, REQUIRED, datalist=site.datalist)
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    message = _refusal(site.out, REQUIRED, datalist=site.datalist)
    assert f"{path} changed after preparation (sha256" in message and "re-run `medflare prepare`" in message
    assert "not in the preparation manifest" in _refusal(site.out, REQUIRED, files=["../in/good-1/good-1_t1.nii.gz"])
    with open(site.datalist) as f:
        listing = json.load(f)
    listing["training"][0]["label"] = "extra/added_seg.nii.gz"
    edited = os.path.join(site.out, "edited.json")
    with open(edited, "w") as f:
        json.dump(listing, f)
    message = _refusal(site.out, REQUIRED, datalist=edited)
    assert "extra/added_seg.nii.gz is named by the site's datalist but is not in the preparation manifest" in message
    with open(site.datalist, "w") as f:
        json.dump(listing, f)
    assert f"{site.datalist} changed after preparation" in _refusal(site.out, REQUIRED, datalist=site.datalist)


def test_the_checksum_is_read_once_per_file_state(site, monkeypatch):
    reads = []
    real = file_hashes.sha256_file
    monkeypatch.setattr(file_hashes, "sha256_file", lambda p: reads.append(p) or real(p))
    verify_preparation(site.out, REQUIRED, datalist=site.datalist)
    assert len(reads) == 16  # the datalist, and 3 cases x (4 modalities + label)
    verify_preparation(site.out, REQUIRED, datalist=site.datalist)
    assert len(reads) == 16  # remembered by (path, inode, size, mtime)
    path = os.path.join(site.out, "good-1", "good-1_t1.nii.gz")
    os.utime(path, ns=(1, 1))
    verify_preparation(site.out, REQUIRED, datalist=site.datalist)
    assert reads[16:] == [path]  # a touched file is read again


def test_an_xray_preparation_is_verified_through_its_table(tmp_path):
    table, root = xray_site(tmp_path / "in")
    result = prepare_xray(table, root, str(tmp_path / "out"), XrayPreparation(size=16))
    required = {"name": "medflare-xray-prep", "version": "1.0"}
    assert verify_preparation(result.out, required, datalist=result.datalist)["counts"]["passed"] == 2
    with open(result.datalist) as f:
        text = f.read()
    with open(result.datalist, "w") as f:
        f.write(text.replace("p1,train,images/p1.png,71,1", "p1,train,images/p1.png,71,0"))  # a label edited
    assert f"{result.datalist} changed after preparation" in _refusal(result.out, required, datalist=result.datalist)
    other = os.path.join(result.out, "subset.csv")  # a datalist of its own naming prepared files is checked file by file
    with open(other, "w") as f:
        f.write(text.splitlines()[0] + "\n" + text.splitlines()[1] + "\n")
    assert verify_preparation(result.out, required, datalist=other)
    with open(other, "a") as f:
        f.write("p9,train,images/p9.png,1,1\n")
    assert "images/p9.png is named by the site's datalist but is not in the preparation manifest" in _refusal(result.out, required, datalist=other)


@pytest.mark.parametrize(
    "value, message",
    [
        ("medflare-brats-prep", "required_preparation must be null or {'name': ..., 'version': ..."),
        ({"name": "x"}, "required_preparation['version'] must be a version ('1.0.0') or a range ('>=1.0,<2'), got None"),
        ({"name": "", "version": "1"}, "required_preparation['name'] must be a preparation name"),
        ({"name": "x", "version": "~=1.0"}, "must be a version MAJOR[.MINOR[.PATCH]] (e.g. 1.0.0), got '~=1.0'"),
        ({"name": "x", "version": ">=1.0,"}, "or a range ('>=1.0,<2'), got '>=1.0,'"),
        ({"name": "x", "version": 1}, "required_preparation['version'] must be a version ('1.0.0') or a range ('>=1.0,<2'), got 1"),
        ({"name": "x", "version": "1", "parameters_hash": "abc"}, "must be 64 lower-case hex digits (sha256), got 'abc'"),
        ({"name": "x", "version": "1", "params": {}}, "required_preparation has unknown key(s) ['params']"),
    ],
)
def test_a_malformed_requirement_is_the_jobs_fault(value, message):
    with pytest.raises(ValueError) as refused:
        check_required_preparation(value)
    assert message in str(refused.value)
    assert not isinstance(refused.value, PreparationMismatch)


@pytest.mark.parametrize(
    "version, spec, expected",
    [
        ("1.0.0", ">=1.0,<2", True),
        ("2.0.0", ">=1.0,<2", False),
        ("0.9.0", ">=1.0.0", False),
        ("1.2.3", "1.2.3", True),
        ("1.2.3", "==1.2", False),
        ("1.2", "1.2.0", True),
        ("1.10.0", ">1.9", True),
        ("1.0.0", "!=1.0.0", False),
    ],
)
def test_version_ranges(version, spec, expected):
    assert version_satisfies(version, spec) is expected
