import math
import os

import numpy as np
import pytest
import torch

from medflare.training.model_spec import build_model
from medflare.training.segmentation_trainer import SegmentationTrainer, WeightMismatchError
from tests.conftest import TINY_SEGRESNET


@pytest.fixture()
def trainer(tiny_site_files):
    train, val = tiny_site_files
    torch.manual_seed(0)
    return SegmentationTrainer(
        build_model(TINY_SEGRESNET), train, val, roi_size=(16, 16, 16), val_roi_size=(32, 32, 32), batch_size=2, seed=1
    )


def test_a_round_of_training_changes_the_weights_and_counts_steps(trainer, tiny_site_files):
    before = trainer.get_weights()
    result = trainer.train(epochs=2)
    after = trainer.get_weights()
    assert result.steps == 2 * math.ceil(len(tiny_site_files[0]) / 2)
    assert not result.aborted and math.isfinite(result.mean_loss) and 0 < result.mean_loss <= 1.0
    diff = trainer.weight_diff(after, before)
    assert set(diff) == set(trainer.model.state_dict())
    for key, value in diff.items():
        assert value.shape == before[key].shape
        assert value.dtype == np.float32
    assert sum(float(np.abs(v).sum()) for v in diff.values()) > 0
    np.testing.assert_allclose(before["convInit.conv.weight"] + diff["convInit.conv.weight"], after["convInit.conv.weight"], rtol=1e-5, atol=1e-7)


def test_max_steps_caps_a_round(trainer):
    assert trainer.train(epochs=3, max_steps=1).steps == 1


def test_abort_is_honoured_between_batches(trainer):
    calls = []

    def abort_after_one():
        calls.append(1)
        return len(calls) > 1

    result = trainer.train(epochs=1, should_abort=abort_after_one)
    assert result.aborted and result.steps == 1
    assert trainer.validate(should_abort=lambda: True) is None


def test_validation_reports_dice_per_region(trainer, tiny_site_files):
    metrics = trainer.validate()
    assert set(metrics) == {"dice_tc", "dice_wt", "dice_et", "dice_mean", "num_cases"}
    assert metrics["num_cases"] == len(tiny_site_files[1])
    for key in ("dice_tc", "dice_wt", "dice_et", "dice_mean"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["dice_mean"] == pytest.approx(np.mean([metrics["dice_tc"], metrics["dice_wt"], metrics["dice_et"]]))


def test_weights_round_trip_and_misfits_are_refused(trainer):
    weights = trainer.get_weights()
    shifted = {k: v + 1.0 for k, v in weights.items()}
    trainer.set_weights(shifted)
    np.testing.assert_array_equal(trainer.get_weights()["convInit.conv.weight"], shifted["convInit.conv.weight"])
    trainer.set_weights({k: torch.as_tensor(v) for k, v in weights.items()})  # tensors are accepted too
    np.testing.assert_array_equal(trainer.get_weights()["convInit.conv.weight"], weights["convInit.conv.weight"])

    missing = dict(weights)
    missing.pop("convInit.conv.weight")
    with pytest.raises(WeightMismatchError, match="missing \\['convInit.conv.weight'\\]"):
        trainer.set_weights(missing)
    with pytest.raises(WeightMismatchError, match="unexpected \\['extra'\\]"):
        trainer.set_weights({**weights, "extra": np.zeros(1)})
    wrong = {**weights, "convInit.conv.weight": np.zeros((1, 2, 3))}
    with pytest.raises(WeightMismatchError, match="shape \\(1, 2, 3\\)"):
        trainer.set_weights(wrong)
    # a refused load leaves the model as it was
    np.testing.assert_array_equal(trainer.get_weights()["convInit.conv.weight"], weights["convInit.conv.weight"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"roi_size": (16, 16)}, "roi_size"),
        ({"roi_size": (16, 16, 4)}, "roi_size"),
        ({"val_roi_size": (16, 16, True)}, "val_roi_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"cache_rate": 1.5}, "cache_rate"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_arguments_are_refused(tiny_site_files, kwargs, message):
    train, val = tiny_site_files
    with pytest.raises(ValueError, match=message):
        SegmentationTrainer(build_model(TINY_SEGRESNET), train, val, **kwargs)


# --- the site's volumes are checked once, before any step ------------------------------------


@pytest.fixture()
def site_copy(tmp_path, tiny_sites):
    """A writable copy of site-1: (training, validation) file lists of the copy."""
    import shutil

    from medflare.data.brats_layout import load_datalist
    from medflare.data.brats_volume_checks import forget_checked_files

    site_dir = tmp_path / "site"
    shutil.copytree(os.path.dirname(tiny_sites["site-1"]), site_dir)
    forget_checked_files()
    yield load_datalist(str(site_dir / "datalist.json"), str(site_dir))
    forget_checked_files()


def _rewrite(path, change):
    import nibabel as nib

    image = nib.load(path)
    array = change(np.asanyarray(image.dataobj).copy())
    nib.save(nib.Nifti1Image(array, image.affine), path)


@pytest.mark.parametrize(
    "which, change, message",
    [
        ("label", lambda a: np.where(a == 4, 3, a).astype(a.dtype), r"value\(s\) \[3\] in \d+ voxel\(s\), outside the BraTS labels \[0, 1, 2, 4\]"),
        ("label", lambda a: a[:, :, :-1], r"has shape \(32, 32, 31\), but modality t1 image"),
        ("t2", lambda a: np.where(a == a.max(), np.nan, a).astype(np.float32), r"modality t2 image .* NaN .* every image voxel must be finite"),
        ("flair", lambda a: a[:-2], r"modality flair image .* has shape \(30, 32, 32\)"),
    ],
    ids=["label-3", "label-shape", "nan-voxel", "modality-shape"],
)
def test_bad_site_data_is_refused_before_training_naming_the_file(site_copy, which, change, message):
    from medflare.data.brats_volume_checks import VolumeCheckError

    train, val = site_copy
    subject = val[0]
    path = subject["label"] if which == "label" else subject["image"][["t1", "t1ce", "t2", "flair"].index(which)]
    _rewrite(path, change)
    with pytest.raises(VolumeCheckError, match=message) as raised:
        SegmentationTrainer(build_model(TINY_SEGRESNET), train, val, roi_size=(16, 16, 16), device="cpu")
    assert path in str(raised.value)


def test_volumes_are_checked_once_not_each_epoch_nor_for_a_second_trainer(site_copy, monkeypatch):
    import medflare.data.brats_volume_checks as checks

    train, val = site_copy
    reads = []
    real_voxels = checks._voxels
    monkeypatch.setattr(checks, "_voxels", lambda *args: reads.append(args[1]) or real_voxels(*args))
    kwargs = dict(roi_size=(16, 16, 16), val_roi_size=(32, 32, 32), device="cpu", cache_rate=0.0)
    trainer = SegmentationTrainer(build_model(TINY_SEGRESNET), train, val, **kwargs)
    assert sorted(reads) == sorted(p for e in train + val for p in e["image"] + [e["label"]])
    trainer.train(epochs=2, max_steps=2)  # cache_rate 0: MONAI loads again each epoch, the checks do not
    SegmentationTrainer(build_model(TINY_SEGRESNET), train, val, **kwargs)  # the site-only model's trainer
    assert len(reads) == 5 * len(train + val)
