"""medflare prepare segmentation: QC verdicts with reasons, the prepared datalist, the manifest, determinism."""

import hashlib
import json
import os

import nibabel as nib
import numpy as np
import pytest

from medflare.data.brats_layout import load_datalist
from medflare.data.data_errors import DataListError
from medflare.data.site_data_config import read_site_data_config
from medflare.preparation.manifest import MANIFEST_NAME
from medflare.preparation.prepare_segmentation import prepare_segmentation
from medflare.preparation.recipe import PREPARATION_VERSION, SegmentationPreparation
from tests.unit.preparation.preparation_fixtures import brain_volume, brats_site, tumour_label, write_case, write_volume

RECIPE = SegmentationPreparation(target_spacing=(1.5, 1.5, 1.5), crop_pad=(8, 8, 8))


@pytest.fixture()
def prepared(tmp_path):
    datalist, root = brats_site(tmp_path / "in")
    return prepare_segmentation(datalist, root, str(tmp_path / "out"), RECIPE), datalist, root


def _verdicts(manifest):
    return {c["case_id"]: (c["verdict"], [r["code"] for r in c["reasons"]]) for c in manifest["cases"]}


def test_each_case_gets_its_verdict_and_failed_cases_are_listed_not_dropped(prepared):
    result, _, _ = prepared
    assert _verdicts(result.manifest) == {
        "good-1": ("pass", []),
        "good-2": ("pass", []),
        "corrupt": ("fail", ["unreadable_file"]),
        "three-modalities": ("fail", ["modality_count"]),
        "good-3": ("pass", []),
        "with-nan": ("fail", ["non_finite"]),
    }
    counts = result.manifest["counts"]
    assert counts == {
        "cases": 6, "passed": 3, "failed": 3, "warned": 0,
        "failed_by_reason": {"modality_count": 1, "non_finite": 1, "unreadable_file": 1},
        "warnings_by_reason": {},
    }
    nan = next(c for c in result.manifest["cases"] if c["case_id"] == "with-nan")
    assert "with-nan_t2.nii.gz has 1 NaN and 0 infinite voxel(s)" in nan["reasons"][0]["message"]
    assert [c["case_id"] for c in result.failed_cases] == ["corrupt", "three-modalities", "with-nan"]


def test_the_prepared_datalist_is_what_the_trainer_reads_and_the_data_config_points_at_it(prepared):
    result, _, _ = prepared
    config = read_site_data_config(result.data_config)
    assert config.data_root == result.out and config.datalist == result.datalist
    training, validation = load_datalist(config.datalist, config.data_root)
    assert [os.path.basename(e["label"]) for e in training] == ["good-1_seg.nii.gz", "good-2_seg.nii.gz"]
    assert [os.path.basename(p) for p in validation[0]["image"]] == [f"good-3_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")]
    image = nib.load(training[0]["image"][0])
    assert image.shape == (8, 8, 8) and image.get_data_dtype() == np.float32
    assert np.allclose(np.linalg.norm(image.affine[:3, :3], axis=0), 1.5)
    label = np.asarray(nib.load(training[0]["label"]).dataobj)
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1, 2, 4}


def test_zscore_gives_mean_0_and_sd_1_over_the_brain_and_keeps_the_background_0(tmp_path):
    datalist, root = brats_site(tmp_path / "in")
    result = prepare_segmentation(datalist, root, str(tmp_path / "out"), SegmentationPreparation())
    data = np.asarray(nib.load(os.path.join(result.out, "good-1", "good-1_t2.nii.gz")).dataobj)
    assert data.shape == (12, 12, 12)
    assert np.all(data[:2] == 0)
    brain = data[2:]
    assert abs(float(brain.mean())) < 1e-5 and abs(float(brain.std()) - 1) < 1e-4
    # hand check: the input's own z-score over its non-zero voxels
    raw = brain_volume(1, 2)[2:].astype(np.float64)
    assert np.allclose(brain, (raw - raw.mean()) / raw.std(), atol=1e-5)


def test_the_manifest_records_what_was_run_on_what(prepared):
    result, datalist, root = prepared
    with open(os.path.join(result.out, MANIFEST_NAME)) as f:
        manifest = json.load(f)
    assert manifest["name"] == "medflare-brats-prep" and manifest["version"] == PREPARATION_VERSION
    assert manifest["parameters"]["target_spacing"] == [1.5, 1.5, 1.5] and manifest["parameters"]["normalise"] == "zscore"
    assert manifest["parameters_hash"] == RECIPE.parameters_hash()
    assert set(manifest["tools"]) >= {"medflare", "monai", "nibabel", "numpy"}
    assert manifest["input_root"] == os.path.abspath(root) and manifest["input_list"] == os.path.abspath(datalist)
    good = next(c for c in manifest["cases"] if c["case_id"] == "good-1")
    assert good["shape"] == [12, 12, 12] and good["spacing"] == [1.0, 1.0, 1.0]
    assert good["output_shape"] == [8, 8, 8] and good["output_spacing"] == [1.5, 1.5, 1.5]
    assert [o["role"] for o in good["outputs"]] == ["t1", "t1ce", "t2", "flair", "label"]
    for entry in good["outputs"]:
        with open(os.path.join(result.out, entry["path"]), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == entry["sha256"]
    with open(os.path.join(root, "good-1", "good-1_t1.nii.gz"), "rb") as f:
        assert good["inputs"][0] == {"path": "good-1/good-1_t1.nii.gz", "sha256": hashlib.sha256(f.read()).hexdigest()}
    assert manifest["cases"][2]["outputs"] == []  # corrupt: nothing written
    assert not os.path.exists(os.path.join(result.out, "corrupt"))


def test_the_same_input_and_parameters_give_byte_identical_files(tmp_path):
    datalist, root = brats_site(tmp_path / "in")
    first = prepare_segmentation(datalist, root, str(tmp_path / "a"), RECIPE).manifest
    second = prepare_segmentation(datalist, root, str(tmp_path / "b"), RECIPE).manifest
    again = prepare_segmentation(datalist, root, str(tmp_path / "a"), RECIPE).manifest  # re-run over its own output
    digests = [[(o["path"], o["sha256"]) for c in m["cases"] for o in c["outputs"]] for m in (first, second, again)]
    assert digests[0] and digests[0] == digests[1] == digests[2]
    assert first["prepared"]["datalist"] == second["prepared"]["datalist"]
    other = prepare_segmentation(datalist, root, str(tmp_path / "c"), SegmentationPreparation(target_spacing=(2, 2, 2))).manifest
    assert other["parameters_hash"] != first["parameters_hash"]


def _one_case_site(tmp_path, **case):
    root = str(tmp_path / "in")
    entry = write_case(root, "c1", 1, **case)
    entry2 = write_case(root, "c2", 2)
    datalist = os.path.join(root, "datalist.json")
    with open(datalist, "w") as f:
        json.dump({"training": [entry], "validation": [entry2]}, f)
    return datalist, root


@pytest.mark.parametrize(
    "case, recipe, code, message",
    [
        ({"affine": np.diag([1.0, 1.0, 5.0, 1.0])}, SegmentationPreparation(), "anisotropy", "anisotropy 5 above max_anisotropy 4"),
        ({"affine": np.diag([9.0, 9.0, 9.0, 1.0])}, SegmentationPreparation(max_anisotropy=2), "spacing_out_of_range", "outside [0.2, 8.0] mm"),
        ({"label": np.full((12, 12, 12), 3, np.uint8)}, SegmentationPreparation(), "label_values", "value(s) [3] outside the convention's labels [0, 1, 2, 4]"),
        ({"label": np.full((12, 12, 12), 0.5, np.float32)}, SegmentationPreparation(), "label_values", "non-integer"),
        ({"label": np.zeros((12, 12, 10), np.uint8)}, SegmentationPreparation(), "label_grid_mismatch", "has shape (12, 12, 10)"),
    ],
)
def test_qc_refuses_bad_geometry_and_labels_naming_the_file(tmp_path, case, recipe, code, message):
    datalist, root = _one_case_site(tmp_path, **case)
    manifest = prepare_segmentation(datalist, root, str(tmp_path / "out"), recipe).manifest
    c1 = manifest["cases"][0]
    assert c1["verdict"] == "fail" and [r["code"] for r in c1["reasons"]][:1] == [code]
    assert message in c1["reasons"][0]["message"] and "c1" in c1["reasons"][0]["message"]


def test_qc_refuses_constant_negative_and_off_grid_modalities(tmp_path):
    root = str(tmp_path / "in")
    entries = [write_case(root, f"c{i}", i) for i in range(1, 5)]
    write_volume(os.path.join(root, "c1", "c1_t1.nii.gz"), np.full((12, 12, 12), 5, np.float32))
    write_volume(os.path.join(root, "c2", "c2_flair.nii.gz"), brain_volume(2, 3) - 50)
    write_volume(os.path.join(root, "c3", "c3_t2.nii.gz"), brain_volume(3, 2), np.diag([1.0, 1.0, 1.0, 1.0]) + np.eye(4, k=3) * 0.5)
    write_volume(os.path.join(root, "c4", "c4_seg.nii.gz"), tumour_label(empty=True))
    datalist = os.path.join(root, "datalist.json")
    with open(datalist, "w") as f:
        json.dump({"training": entries[:3], "validation": entries[3:]}, f)
    manifest = prepare_segmentation(datalist, root, str(tmp_path / "out"), SegmentationPreparation()).manifest
    assert _verdicts(manifest) == {
        "c1": ("fail", ["constant_image"]),
        "c2": ("fail", ["negative_intensity"]),
        "c3": ("fail", ["grid_mismatch"]),
        "c4": ("pass", []),
    }
    assert manifest["cases"][3]["warnings"][0]["code"] == "empty_tumour"
    assert manifest["counts"]["warnings_by_reason"] == {"empty_tumour": 1}
    allowed = prepare_segmentation(datalist, root, str(tmp_path / "out2"), SegmentationPreparation(allow_negative_intensity=True)).manifest
    assert _verdicts(allowed)["c2"] == ("pass", [])


def test_a_4d_image_is_split_into_modalities_in_the_datalists_channel_order(tmp_path):
    root = str(tmp_path / "in")
    channels = [brain_volume(1, i) for i in range(4)]  # stored in MSD order: flair, t1, t1ce, t2
    for case in ("c1", "c2"):
        write_volume(os.path.join(root, "imagesTr", f"{case}.nii.gz"), np.stack([channels[3], channels[0], channels[1], channels[2]], axis=-1))
        write_volume(os.path.join(root, "labelsTr", f"{case}.nii.gz"), np.where(tumour_label() == 4, 3, tumour_label()).astype(np.uint8))
    datalist = os.path.join(root, "dataset.json")
    with open(datalist, "w") as f:
        json.dump({
            "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            "training": [{"image": "imagesTr/c1.nii.gz", "label": "labelsTr/c1.nii.gz"}],
            "validation": [{"image": "imagesTr/c2.nii.gz", "label": "labelsTr/c2.nii.gz", "note": "kept"}],
        }, f)
    result = prepare_segmentation(datalist, root, str(tmp_path / "out"), SegmentationPreparation(normalise="none"))
    assert result.manifest["counts"]["passed"] == 2, result.manifest["cases"]
    with open(result.datalist) as f:
        listing = json.load(f)
    assert listing["label_convention"] == "msd_task01" and listing["validation"][0]["note"] == "kept"
    t1 = np.asarray(nib.load(os.path.join(result.out, listing["training"][0]["image"][0])).dataobj)
    flair = np.asarray(nib.load(os.path.join(result.out, listing["training"][0]["image"][3])).dataobj)
    assert np.array_equal(t1, channels[0]) and np.array_equal(flair, channels[3])

    with open(datalist) as f:
        content = json.load(f)
    del content["modality"], content["labels"]
    with open(datalist, "w") as f:
        json.dump(content, f)
    unknown = prepare_segmentation(datalist, root, str(tmp_path / "out2"), SegmentationPreparation(normalise="none")).manifest
    reason = unknown["cases"][0]["reasons"][0]
    assert reason["code"] == "malformed_entry" and "no 'modality' map in the datalist" in reason["message"]


def test_hostile_entries_fail_their_case_and_a_bad_datalist_or_out_is_refused(tmp_path):
    root = str(tmp_path / "in")
    good = write_case(root, "good", 1)
    outside = tmp_path / "outside.nii.gz"
    write_volume(outside, brain_volume(1, 0))
    items = [
        good,
        {"subject": "escape", "image": ["../outside.nii.gz"] * 4, "label": good["label"]},
        {"subject": "../../etc", "image": good["image"], "label": good["label"]},
        {"subject": "good", "image": good["image"], "label": good["label"]},
        {"subject": "nolabel", "image": good["image"]},
        "not an object",
        {"subject": "missing", "image": ["nope.nii.gz"] * 4, "label": good["label"]},
    ]
    datalist = os.path.join(root, "datalist.json")
    with open(datalist, "w") as f:
        json.dump({"training": items, "validation": [good]}, f)
    manifest = prepare_segmentation(datalist, root, str(tmp_path / "out"), SegmentationPreparation()).manifest
    codes = [(c["case_id"], c["reasons"][0]["code"] if c["reasons"] else None) for c in manifest["cases"]]
    assert codes == [
        ("good", None),
        ("escape", "path_outside_data_root"),
        ("../../etc", "malformed_entry"),
        ("good", "duplicate_case"),
        ("nolabel", "malformed_entry"),
        ("training-0005", "malformed_entry"),
        ("missing", "missing_file"),
        ("good", "duplicate_case"),
    ]
    assert not os.path.exists(tmp_path / "etc")
    with pytest.raises(DataListError, match="not readable JSON"):
        bad = tmp_path / "bad.json"
        bad.write_text("{")
        prepare_segmentation(str(bad), root, str(tmp_path / "o2"), SegmentationPreparation())
    with pytest.raises(DataListError, match="has no 'training' or 'validation' list"):
        (tmp_path / "empty.json").write_text("{}")
        prepare_segmentation(str(tmp_path / "empty.json"), root, str(tmp_path / "o3"), SegmentationPreparation())
    with pytest.raises(ValueError, match="is the input data root"):
        prepare_segmentation(datalist, root, root, SegmentationPreparation())
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "precious.txt").write_text("x")
    with pytest.raises(ValueError, match="is not empty and holds no medflare_preparation.json"):
        prepare_segmentation(datalist, root, str(tmp_path / "busy"), SegmentationPreparation())
    assert (tmp_path / "busy" / "precious.txt").read_text() == "x"
    with pytest.raises(ValueError, match="recipe must be a SegmentationPreparation"):
        prepare_segmentation(datalist, root, str(tmp_path / "o4"), {"normalise": "zscore"})
