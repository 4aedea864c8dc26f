import json
import os

import nibabel as nib
import numpy as np
import pytest

from medflare.data.brats_layout import MODALITIES, find_brats_subjects, load_datalist
from medflare.data.brats_synthetic import (
    BRATS_LABELS,
    generate_sites,
    generate_subject,
    make_site_profiles,
)
from medflare.data.mni_anatomy import load_tissue_maps
from medflare.data.site_data_config import read_site_data_config


@pytest.fixture(scope="module")
def tissue():
    return load_tissue_maps(48)


@pytest.fixture(scope="module")
def profiles():
    return make_site_profiles(4, 8, seed=0)


def test_tissue_maps_are_real_brain_anatomy(tissue):
    # partial volumes in [0, 1], white matter enclosed by the brain, a plausible brain fraction of the cube
    for arr in (tissue.gm, tissue.wm, tissue.csf, tissue.brain):
        assert arr.shape == (48, 48, 48)
        assert arr.min() >= 0 and arr.max() <= 1
    assert np.all(tissue.gm + tissue.wm + tissue.csf <= tissue.brain + 1e-5)
    assert 0.25 < (tissue.brain > 0.5).mean() < 0.7
    assert tissue.wm.sum() > 0.2 * tissue.brain.sum()


def test_subject_has_brats_label_layout(tissue, profiles):
    image, labels = generate_subject(tissue, profiles[0], np.random.default_rng(1))
    assert image.shape == (4, 48, 48, 48) and image.dtype == np.float32
    assert labels.shape == (48, 48, 48) and labels.dtype == np.uint8
    assert set(np.unique(labels)) == set(BRATS_LABELS.values())
    # the tumour sits in the brain: the background outside the brain is exactly zero in every modality
    outside = image.sum(axis=0) == 0
    assert not np.any(labels[outside])
    # tumour core (1, 4) is surrounded by whole tumour: its bounding box lies within the whole tumour's
    core = np.argwhere(np.isin(labels, [1, 4]))
    whole = np.argwhere(labels > 0)
    assert np.all(core.min(0) >= whole.min(0)) and np.all(core.max(0) <= whole.max(0))
    assert (labels == 2).sum() > (labels == 1).sum()


def test_tumour_changes_contrast_like_a_glioma(tissue, profiles):
    image, labels = generate_subject(tissue, profiles[0], np.random.default_rng(2))
    t1ce, flair = image[MODALITIES.index("t1ce")], image[MODALITIES.index("flair")]
    brain = image.sum(axis=0) > 0
    healthy = brain & (labels == 0)
    # enhancing rim bright on T1ce, oedema bright on FLAIR, relative to healthy brain
    assert t1ce[labels == 4].mean() > np.median(t1ce[healthy])
    assert flair[labels == 2].mean() > np.median(flair[healthy])


def test_generation_is_deterministic_for_a_seed(tissue, profiles):
    a = generate_subject(tissue, profiles[1], np.random.default_rng([5, 1, 0]))
    b = generate_subject(tissue, profiles[1], np.random.default_rng([5, 1, 0]))
    c = generate_subject(tissue, profiles[1], np.random.default_rng([6, 1, 0]))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    assert make_site_profiles(3, 8, seed=9) == make_site_profiles(3, 8, seed=9)
    assert make_site_profiles(3, 8, seed=9) != make_site_profiles(3, 8, seed=10)


def test_sites_differ_like_hospitals(tissue):
    profiles = make_site_profiles(6, 20, seed=0)
    assert len({p.name for p in profiles}) == 6
    assert len({p.num_cases for p in profiles}) > 1
    assert len({round(p.intensity_scale) for p in profiles}) > 1
    assert len({round(p.noise_sigma, 4) for p in profiles}) == 6
    assert len({p.tumour_radius_mm for p in profiles}) == 6
    # the images themselves: brain intensity levels differ by scanner units across sites
    medians = []
    for p in profiles[:3]:
        image, _ = generate_subject(tissue, p, np.random.default_rng(0))
        medians.append(np.median(image[0][image[0] > 0]))
    assert max(medians) / min(medians) > 1.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_sites": 0, "cases_per_site": 8}, "num_sites"),
        ({"num_sites": True, "cases_per_site": 8}, "num_sites"),
        ({"num_sites": 2, "cases_per_site": 2}, "cases_per_site"),
        ({"num_sites": 2, "cases_per_site": 8, "seed": -1}, "seed"),
    ],
)
def test_bad_profile_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_site_profiles(**kwargs)


def test_written_sites_use_brats_layout_and_load(tiny_sites):
    assert sorted(tiny_sites) == ["site-1", "site-2"]
    config = read_site_data_config(tiny_sites["site-1"])
    site_dir = os.path.dirname(tiny_sites["site-1"])
    subjects = find_brats_subjects(site_dir)
    assert len(subjects) >= 4
    for s in subjects:
        assert [os.path.basename(p) for p in s.images] == [f"{s.subject_id}_{m}.nii.gz" for m in MODALITIES]
        assert os.path.basename(s.label) == f"{s.subject_id}_seg.nii.gz"
    label = nib.load(subjects[0].label)
    assert label.shape == (32, 32, 32)
    assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2, 4}
    train, val = load_datalist(config.datalist, config.data_root)
    assert len(train) + len(val) == len(subjects) and len(val) >= 1
    with open(config.datalist) as f:
        raw = json.load(f)
    assert not os.path.isabs(raw["training"][0]["label"])  # relative, so the folder can move


def test_existing_sites_are_reused_and_changed_settings_regenerate(tmp_path):
    first = generate_sites(str(tmp_path), num_sites=1, cases_per_site=4, size=16, seed=1)
    datalist = os.path.join(os.path.dirname(first["site-1"]), "datalist.json")
    stamp = os.stat(datalist).st_mtime_ns
    generate_sites(str(tmp_path), num_sites=1, cases_per_site=4, size=16, seed=1)
    assert os.stat(datalist).st_mtime_ns == stamp
    generate_sites(str(tmp_path), num_sites=1, cases_per_site=4, size=16, seed=2)
    assert os.stat(datalist).st_mtime_ns != stamp
