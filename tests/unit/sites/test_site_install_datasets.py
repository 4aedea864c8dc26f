"""``medflare site install`` of a site holding several data sets: one ``--data [NAME=]PATH`` each,
every one checked, all under their names in one keyed ``medflare_data.json`` (or nothing written)."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from medflare.cli.main import main
from medflare.data.site_data_config import read_site_data_config, read_site_datasets
from medflare.sites.site_install import InstallError, install_site, plan_install, read_manifest
from tests.unit.sites.test_site_install import _snapshot, _workspace


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """``{"table": heart-like table without images, "images": chest X-ray-like table with images}``."""
    root = tmp_path_factory.mktemp("tables")
    rng = np.random.default_rng(0)
    out = {}
    for kind in ("table", "images"):
        folder = root / kind
        (folder / "img").mkdir(parents=True)
        header = ["case_id", "split"] + (["image"] if kind == "images" else []) + ["age", "label"]
        rows = []
        for i in range(6):
            image = []
            if kind == "images":
                Image.fromarray(rng.integers(0, 255, size=(12, 12)).astype(np.uint8)).save(folder / "img" / f"c{i}.png")
                image = [f"img/c{i}.png"]
            rows.append([f"c{i}", "test" if i % 3 == 2 else "train", *image, 50 + i, i % 2])
        with open(folder / "cases.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        out[kind] = str(folder / "cases.csv")
    return out


def _installed(ws):
    return {c.dataset: c for c in read_site_datasets(str(ws / "local" / "medflare_data.json"))}


def test_a_site_holding_three_kinds_installs_them_at_once_under_the_detected_names(tmp_path, tiny_sites, tables):
    ws = _workspace(tmp_path)
    plan = install_site(str(ws), "research", [tiny_sites["site-1"], tables["table"], tables["images"]], gpus=0, gpu_memory_gib=0)
    installed = _installed(ws)
    assert list(installed) == ["segmentation", "outcome_table", "outcome_image"]
    brats = os.path.dirname(tiny_sites["site-1"])
    assert installed["segmentation"].datalist == os.path.join(brats, "datalist.json")
    assert installed["segmentation"].data_root == brats
    assert installed["outcome_table"].datalist == tables["table"]
    assert installed["outcome_image"].data_root == os.path.dirname(tables["images"])
    assert json.loads((ws / "local" / "medflare_data.json").read_text()) == {
        "datasets": {name: {"data_root": c.data_root, "datalist": c.datalist} for name, c in installed.items()}
    }
    notes = [line for line in plan.summary if line.startswith("data set ")]
    assert [line.split(" (")[0] for line in notes] == ["data set segmentation", "data set outcome_table", "data set outcome_image"]
    assert "(detected)" in notes[0] and "validation subjects" in notes[0]
    assert "0 images" in notes[1] and "4 training and 2 test cases, 6 images" in notes[2]
    assert read_manifest(str(ws))["datasets"] == ["segmentation", "outcome_table", "outcome_image"]


def test_names_given_with_name_equals_path_or_a_dict_are_used(tmp_path, tiny_sites, tables):
    ws = _workspace(tmp_path)
    install_site(str(ws), "research", [f"brats-a={tiny_sites['site-1']}", f"brats-b={tiny_sites['site-2']}", tables["table"]], gpus=0)
    installed = _installed(ws)
    assert list(installed) == ["brats-a", "brats-b", "outcome_table"]
    assert installed["brats-b"].data_root == os.path.dirname(tiny_sites["site-2"])

    plan = plan_install(str(ws), "research", {"heart.v2": tables["table"], "cxr": tables["images"]}, gpus=0)
    written = json.loads(plan.files["medflare_data.json"])
    assert list(written["datasets"]) == ["heart.v2", "cxr"]
    assert any(line.startswith("data set cxr (named): outcome table") for line in plan.summary)


def test_one_data_set_as_before_is_installed_keyed_and_read_without_a_name(tmp_path, tables):
    ws = _workspace(tmp_path)
    install_site(str(ws), "research", tables["images"], gpus=0)
    assert list(_installed(ws)) == ["outcome_image"]
    assert read_site_data_config(str(ws / "local" / "medflare_data.json")).datalist == tables["images"]


def test_a_path_with_an_equals_sign_in_a_folder_is_a_path(tmp_path, tables):
    import shutil

    folder = tmp_path / "v=2"
    shutil.copytree(os.path.dirname(tables["images"]), folder)
    ws = _workspace(tmp_path)
    install_site(str(ws), "research", str(folder / "cases.csv"), gpus=0)
    assert _installed(ws)["outcome_image"].datalist == str(folder / "cases.csv")


def test_a_keyed_data_configuration_given_as_data_brings_its_names(tmp_path, tiny_sites, tables):
    ws = _workspace(tmp_path)
    install_site(str(ws), "research", [tiny_sites["site-1"], tables["table"]], gpus=0)
    kept = tmp_path / "site_data.json"
    kept.write_text((ws / "local" / "medflare_data.json").read_text())
    other = _workspace(tmp_path, name="site-2")
    plan = install_site(str(other), "research", [str(kept), f"cxr={tables['images']}"], gpus=0)
    assert list(_installed(other)) == ["segmentation", "outcome_table", "cxr"]
    assert any(line.startswith("data set segmentation (as in the file)") for line in plan.summary)


@pytest.mark.parametrize(
    "data, kwargs, message",
    [
        (lambda s, t: [s["site-1"], s["site-2"]], {}, r"two data sets named 'segmentation': .*site-1.*data_config.json and .*site-2.*data_config.json"),
        (lambda s, t: [f"x={t['table']}", f"x={t['images']}"], {}, r"two data sets named 'x': x=.*table/cases.csv and x=.*images/cases.csv"),
        (lambda s, t: [t["table"], f"outcome_table={t['images']}"], {}, r"two data sets named 'outcome_table'"),
        (lambda s, t: [t["table"], t["images"]], {"data_root": "/data"}, r"--data-root applies when exactly one --data is given, got 2"),
        (lambda s, t: [f"a b={t['table']}"], {}, r"--data a b=.*: the data set name \(before '='\) must be .*got 'a b'"),
        (lambda s, t: [f"={t['table']}"], {}, r"the data set name \(before '='\) must be .*got ''"),
        (lambda s, t: [".hidden=" + t["table"]], {}, r"starting with a letter or digit.*got '\.hidden'"),
        (lambda s, t: ["cxr="], {}, r"--data cxr=: no PATH after cxr="),
        (lambda s, t: [t["table"], 3], {}, r"--data entries must be non-empty strings \[NAME=\]PATH, got 3"),
        (lambda s, t: {"a/b": t["table"]}, {}, r"--data a/b=\.\.\.: the data set name must be"),
        (lambda s, t: {"cxr": None}, {}, r"--data cxr=\.\.\.: the path must be a non-empty string, got None"),
        (lambda s, t: 7, {}, r"--data must be \[NAME=\]PATH, a list of them or a dict"),
        (lambda s, t: [], {}, "--data is required"),
        (lambda s, t: [t["table"], "/no/such/datalist.json"], {}, "--data not found: /no/such/datalist.json"),
    ],
    ids=["detected-twice", "named-twice", "named-as-detected", "data-root-with-two", "space", "empty-name", "hidden",
         "no-path", "not-a-string", "dict-bad-name", "dict-no-path", "not-a-list", "empty-list", "second-missing"],
)
def test_bad_data_entries_are_refused_and_nothing_is_written(tmp_path, tiny_sites, tables, data, kwargs, message):
    ws = _workspace(tmp_path)
    before = _snapshot(ws)
    with pytest.raises(InstallError, match=message):
        install_site(str(ws), "research", data(tiny_sites, tables), gpus=0, **kwargs)
    assert _snapshot(ws) == before


def test_a_name_for_a_keyed_file_and_a_bad_entry_in_it_are_refused(tmp_path, tiny_sites, tables):
    keyed = tmp_path / "keyed.json"
    keyed.write_text(json.dumps({"datasets": {"cxr": {"data_root": os.path.dirname(tables["images"]), "datalist": tables["images"]}}}))
    ws = _workspace(tmp_path)
    before = _snapshot(ws)
    with pytest.raises(InstallError, match=r"is a keyed site data configuration whose data sets have their own names \['cxr'\]; give it without mine="):
        install_site(str(ws), "research", f"mine={keyed}", gpus=0)
    keyed.write_text(json.dumps({"datasets": {"cxr": {"data_root": "/d"}}, "extra": 1}))
    with pytest.raises(InstallError, match=r"--data .*keyed.json: site data configuration .*a keyed file holds only 'datasets', got also \['extra'\]"):
        install_site(str(ws), "research", str(keyed), gpus=0)
    keyed.write_text(json.dumps({"datasets": {"cxr": {"data_root": "/d"}}}))
    with pytest.raises(InstallError, match=r"'datalist' in datasets.cxr"):
        install_site(str(ws), "research", str(keyed), gpus=0)
    assert _snapshot(ws) == before


def test_a_failing_second_data_set_writes_nothing(tmp_path, tiny_sites, tables):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(os.path.dirname(tables["images"]), broken)
    os.remove(broken / "img" / "c3.png")
    ws = _workspace(tmp_path)
    before = _snapshot(ws)
    with pytest.raises(InstallError, match=r"--data .*broken/cases.csv: .*c3.png does not exist"):
        install_site(str(ws), "research", [tiny_sites["site-1"], str(broken / "cases.csv")], gpus=0)
    assert _snapshot(ws) == before


def test_command_line_repeated_data_and_show_lists_every_data_set(tmp_path, tiny_sites, tables, capsys):
    ws = _workspace(tmp_path)
    args = ["site", "install", "--workspace", str(ws), "--profile", "research", "--gpus", "0"]
    data = ["--data", tiny_sites["site-1"], "--data", f"heart={tables['table']}", "--data", tables["images"]]
    assert main(args + data) == 0
    out = capsys.readouterr().out
    assert "data set segmentation (detected)" in out and "data set heart (named)" in out and "data set outcome_image" in out

    assert main(["site", "show", "--workspace", str(ws)]) == 0
    out = capsys.readouterr().out
    brats = os.path.dirname(tiny_sites["site-1"])
    assert f"data set segmentation: datalist {os.path.join(brats, 'datalist.json')}, images under {brats}" in out
    assert f"data set heart: datalist {tables['table']}" in out and f"data set outcome_image: datalist {tables['images']}" in out

    assert main(args + data[:4] + ["--data-root", "/data"]) == 2
    assert "--data-root applies when exactly one --data is given, got 2" in capsys.readouterr().err

    # a flat file, written by hand: it serves every job, and show says so
    (ws / "local" / "medflare_data.json").write_text(json.dumps({"data_root": "/d", "datalist": "/d/l.json"}))
    assert main(["site", "show", "--workspace", str(ws)]) == 0
    out = capsys.readouterr().out
    assert "data (flat file, every job): datalist /d/l.json, images under /d" in out and "EDITED SINCE INSTALL: medflare_data.json" in out
    (ws / "local" / "medflare_data.json").write_text(json.dumps({"datasets": {"x y": {}}}))
    assert main(["site", "show", "--workspace", str(ws)]) == 0
    assert "data: UNREADABLE: site data configuration" in capsys.readouterr().out
