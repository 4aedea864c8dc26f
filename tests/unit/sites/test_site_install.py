"""``medflare site install``: checked first, then all files or none.

The workspaces here are laid out like NVFlare's provisioned kits (``startup/fed_client.json``,
``local/resources.json.default``); the installed policy is loaded by NVFlare's own privacy
configurator during the install. Real provisioned kits are installed into in the POC tests.
"""

import hashlib
import json
import os

import pytest

from medflare.cli.main import main
from medflare.data.site_data_config import read_site_data_config
from medflare.sites.site_install import (
    MANIFEST_FILE,
    InstallError,
    apply_install,
    install_site,
    plan_install,
    read_manifest,
)

DEFAULT_RESOURCES = {
    "format_version": 2,
    "class_list_enforcement_mode": "enforce",
    "class_allow_list": ["nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather"],
    "allow_log_streaming": True,
    "components": [
        {
            "id": "resource_manager",
            "path": "nvflare.app_common.resource_managers.gpu_resource_manager.GPUResourceManager",
            "args": {"num_of_gpus": 0, "mem_per_gpu_in_GiB": 0, "expiration_period": 30},
        },
        {"id": "process_launcher", "path": "nvflare.app_common.job_launcher.client_process_launcher.ClientProcessJobLauncher", "args": {}},
    ],
}


def _workspace(tmp_path, role="client", name="site-1"):
    ws = tmp_path / name
    (ws / "startup").mkdir(parents=True)
    (ws / "local").mkdir()
    (ws / "startup" / ("fed_client.json" if role == "client" else "fed_server.json")).write_text("{}")
    (ws / "local" / "resources.json.default").write_text(json.dumps(DEFAULT_RESOURCES))
    return ws


def _snapshot(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


def test_install_writes_policy_resources_data_and_record(tmp_path, tiny_sites):
    ws = _workspace(tmp_path)
    plan = install_site(str(ws), "clinical", tiny_sites["site-1"], gpus=0, gpu_memory_gib=0)
    local = ws / "local"

    with open(os.path.join(os.path.dirname(__file__), "..", "..", "..", "site_configs", "clinical", "privacy.json")) as f:
        assert json.loads((local / "privacy.json").read_text()) == json.load(f)

    resources = json.loads((local / "resources.json").read_text())
    assert "medflare." in resources["class_allow_list"]
    assert "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather" in resources["class_allow_list"]
    assert resources["allow_log_streaming"] is False  # the clinical profile's setting
    by_id = {c["id"]: c for c in resources["components"]}
    assert by_id["resource_manager"]["args"] == {"num_of_gpus": 0, "mem_per_gpu_in_GiB": 0, "expiration_period": 300}
    assert "resource_consumer" in by_id and "process_launcher" in by_id  # the site's other components stay

    data = read_site_data_config(str(local / "medflare_data.json"))
    site = os.path.dirname(tiny_sites["site-1"])
    assert data.data_root == site and data.datalist == os.path.join(site, "datalist.json")

    manifest = read_manifest(str(ws))
    assert manifest["profile"] == "clinical" and manifest["role"] == "client" and manifest["modified"] == []
    for name in ("privacy.json", "resources.json", "medflare_data.json"):
        assert manifest["files"][name] == hashlib.sha256((local / name).read_bytes()).hexdigest()
    assert any("2 validation" in line or "validation subjects" in line for line in plan.summary)


def test_gpu_count_and_memory_are_filled_in_when_auto(tmp_path, tiny_sites, monkeypatch):
    import medflare.sites.site_install as site_install

    monkeypatch.setattr(site_install, "detect_gpus", lambda: (2, 79))
    ws = _workspace(tmp_path)
    install_site(str(ws), "research", tiny_sites["site-1"])
    resources = json.loads((ws / "local" / "resources.json").read_text())
    manager = next(c for c in resources["components"] if c["id"] == "resource_manager")
    assert manager["args"]["num_of_gpus"] == 2 and manager["args"]["mem_per_gpu_in_GiB"] == 79


def test_a_datalist_can_be_given_instead_of_a_data_config(tmp_path, tiny_sites):
    ws = _workspace(tmp_path)
    site = os.path.dirname(tiny_sites["site-2"])
    install_site(str(ws), "research", os.path.join(site, "datalist.json"), gpus=0)
    data = read_site_data_config(str(ws / "local" / "medflare_data.json"))
    assert data.data_root == site


def test_reinstall_keeps_the_previous_files(tmp_path, tiny_sites):
    ws = _workspace(tmp_path)
    install_site(str(ws), "research", tiny_sites["site-1"], gpus=0)
    before = (ws / "local" / "privacy.json").read_text()
    plan = install_site(str(ws), "clinical", tiny_sites["site-1"], gpus=0)
    backups = list((ws / "local" / "medflare_backup").iterdir())
    assert len(backups) == 1
    assert (backups[0] / "privacy.json").read_text() == before
    assert any("previous files kept" in line for line in plan.summary)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(profile="nope"), "unknown profile 'nope'"),
        (dict(profile=None), "--profile is required"),
        (dict(data=None), "--data is required"),
        (dict(data="/no/such/file.json"), "--data not found: /no/such/file.json"),
        (dict(gpus=-1), "--gpus must be an int >= 0, got -1"),
        (dict(gpu_memory_gib="lots"), "--gpu-memory must be a number >= 0"),
    ],
)
def test_bad_arguments_are_refused_and_nothing_is_written(tmp_path, tiny_sites, kwargs, message):
    ws = _workspace(tmp_path)
    before = _snapshot(ws)
    args = dict(profile="research", data=tiny_sites["site-1"])
    args.update(kwargs)
    with pytest.raises(InstallError, match=message):
        install_site(str(ws), **args)
    assert _snapshot(ws) == before


def test_a_datalist_naming_a_missing_image_is_refused(tmp_path, tiny_sites):
    ws = _workspace(tmp_path)
    site = os.path.dirname(tiny_sites["site-1"])
    datalist = json.loads(open(os.path.join(site, "datalist.json")).read())
    datalist["validation"][0]["label"] = "gone/gone_seg.nii.gz"
    bad = tmp_path / "datalist.json"
    bad.write_text(json.dumps(datalist))
    before = _snapshot(ws)
    with pytest.raises(InstallError, match=r"validation\[0\] names a missing file: .*gone_seg.nii.gz"):
        install_site(str(ws), "research", str(bad), data_root=site)
    assert _snapshot(ws) == before


def test_an_invalid_profile_folder_is_refused_before_anything_is_written(tmp_path, tiny_sites):
    ws = _workspace(tmp_path)
    profile = tmp_path / "custom_profile"
    profile.mkdir()
    policy = json.loads(open(os.path.join(os.path.dirname(__file__), "..", "..", "..", "site_configs", "clinical", "privacy.json")).read())
    gaussian = next(s for s in policy["scopes"] if s["name"] == "clinical")
    gaussian["task_result_filters"][0]["args"]["max_epsilon"] = -1
    (profile / "privacy.json").write_text(json.dumps(policy))
    (profile / "resources.json").write_text("{}")
    before = _snapshot(ws)
    with pytest.raises(InstallError, match=r"scope 'clinical' task_result_filters\[0\].*max_epsilon"):
        install_site(str(ws), str(profile), tiny_sites["site-1"])
    assert _snapshot(ws) == before


def test_a_failure_while_swapping_files_in_rolls_back_every_file(tmp_path, tiny_sites):
    ws = _workspace(tmp_path)
    install_site(str(ws), "research", tiny_sites["site-1"], gpus=0)
    before = _snapshot(ws / "local")
    plan = plan_install(str(ws), "clinical", tiny_sites["site-1"], gpus=0)
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError("disk full")
        os.replace(src, dst)

    with pytest.raises(InstallError, match="failed and was rolled back: disk full"):
        apply_install(plan, _replace=failing_replace)
    after = {k: v for k, v in _snapshot(ws / "local").items() if not k.startswith("medflare_backup")}
    assert after == {k: v for k, v in before.items() if not k.startswith("medflare_backup")}
    assert not [f for f in os.listdir(ws / "local") if f.endswith(".medflare-new")]


def test_the_server_gets_only_the_allow_list(tmp_path, tiny_sites):
    ws = _workspace(tmp_path, role="server", name="server")
    plan = install_site(str(ws))
    assert set(plan.files) == {"resources.json", MANIFEST_FILE}
    assert "medflare." in json.loads((ws / "local" / "resources.json").read_text())["class_allow_list"]
    assert not (ws / "local" / "privacy.json").exists()
    with pytest.raises(InstallError, match="server's workspace: it takes no --profile or --data"):
        install_site(str(ws), "research", tiny_sites["site-1"])


def test_not_a_flare_workspace_is_refused(tmp_path):
    with pytest.raises(InstallError, match="not a FLARE client or server workspace"):
        install_site(str(tmp_path), "research", "x")
    with pytest.raises(InstallError, match="workspace not found"):
        install_site(str(tmp_path / "nope"), "research", "x")


def test_hand_edits_after_install_are_reported(tmp_path, tiny_sites):
    ws = _workspace(tmp_path)
    install_site(str(ws), "research", tiny_sites["site-1"], gpus=0)
    path = ws / "local" / "privacy.json"
    path.write_text(path.read_text().replace('"partial_sharing"', '"edited"'))
    assert read_manifest(str(ws))["modified"] == ["privacy.json"]
    with pytest.raises(InstallError, match="no medflare install record"):
        read_manifest(str(tmp_path))


def test_command_line_install_show_and_refusal(tmp_path, tiny_sites, capsys):
    ws = _workspace(tmp_path)
    assert main(["site", "install", "--workspace", str(ws), "--profile", "clinical", "--data", tiny_sites["site-1"], "--dry-run"]) == 0
    assert "dry run: would write privacy.json" in capsys.readouterr().out
    assert not (ws / "local" / "privacy.json").exists()

    assert main(["site", "install", "--workspace", str(ws), "--profile", "clinical", "--data", tiny_sites["site-1"], "--gpus", "0"]) == 0
    out = capsys.readouterr().out
    assert "scopes dp_sgd, clinical, clinical_sparse; default dp_sgd" in out and "restart the FLARE client" in out

    assert main(["site", "show", "--workspace", str(ws)]) == 0
    out = capsys.readouterr().out
    assert "profile: clinical" in out and "unchanged since install" in out and "epsilon spent 0" in out

    # a release, then the ledger deleted: site show says the budget is blocked instead of failing
    from medflare.privacy.budget_ledger import LEDGER_FILE_NAME, PrivacyBudgetLedger

    PrivacyBudgetLedger.open_site(str(ws / "local")).reserve(2.4, job_id="j1")
    (ws / "local" / LEDGER_FILE_NAME).unlink()
    assert main(["site", "show", "--workspace", str(ws)]) == 0
    out = capsys.readouterr().out
    assert "privacy budget: BLOCKED" in out and "deleted or moved" in out

    assert main(["site", "install", "--workspace", str(ws), "--profile", "clinic", "--data", tiny_sites["site-1"]]) == 2
    assert "medflare site: error: unknown profile 'clinic'" in capsys.readouterr().err

    assert main(["site", "profiles"]) == 0
    assert "partial_sharing (default)" in capsys.readouterr().out


def test_an_outcome_table_is_checked_and_installed(tmp_path):
    from medflare.data.cxr_synthetic import generate_cxr_sites

    configs = generate_cxr_sites(str(tmp_path / "cxr"), sites=3, cases=8, size=32)
    ws = _workspace(tmp_path)
    plan = install_site(str(ws), "research", configs["site-3"], gpus=0, gpu_memory_gib=0)  # a data config naming cases.csv
    data = read_site_data_config(str(ws / "local" / "medflare_data.json"))
    assert data.datalist == str(tmp_path / "cxr" / "site-3" / "cases.csv")
    assert any("outcome table" in line and "test cases" in line for line in plan.summary)

    # an image named in the table but missing is found before anything is written
    table = tmp_path / "cxr" / "site-2" / "cases.csv"
    first_image = table.read_text().splitlines()[1].split(",")[2]
    os.remove(tmp_path / "cxr" / "site-2" / first_image)
    other = _workspace(tmp_path, name="site-2")
    with pytest.raises(InstallError, match=f"image .*{os.path.basename(first_image)} does not exist"):
        install_site(str(other), "research", str(table), gpus=0, gpu_memory_gib=0)
    assert not (other / "local" / "medflare_data.json").exists()


def _bad_copy_of_site(tmp_path, tiny_sites, change):
    """A copy of site-1's data with ``change(datalist, site_dir)`` applied; its datalist path."""
    import shutil

    from medflare.data.brats_volume_checks import forget_checked_files

    forget_checked_files()
    site = tmp_path / "data"
    shutil.copytree(os.path.dirname(tiny_sites["site-1"]), site)
    datalist = json.loads((site / "datalist.json").read_text())
    change(datalist, site)
    (site / "datalist.json").write_text(json.dumps(datalist))
    return site


def _rewrite_volume(path, change):
    import nibabel as nib
    import numpy as np

    image = nib.load(path)
    nib.save(nib.Nifti1Image(change(np.asanyarray(image.dataobj).copy()), image.affine), path)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda d, s: _rewrite_volume(s / d["training"][1]["label"], lambda a: (a + (a == 4)).astype(a.dtype)),
            r"--data .*datalist.json: subject \S+: label .*_seg.nii.gz has value\(s\) \[5\] in \d+ voxel\(s\), outside the BraTS labels",
        ),
        (
            lambda d, s: _rewrite_volume(s / d["validation"][0]["label"], lambda a: a.astype("float32") / 2),
            r"label .*_seg.nii.gz \(float32\) has \d+ non-integer voxel\(s\)",
        ),
        (
            lambda d, s: _rewrite_volume(s / d["training"][0]["image"][3], lambda a: a[:, :, :20]),
            r"modality flair image .*_flair.nii.gz has shape \(32, 32, 20\), but modality t1 image",
        ),
        (
            lambda d, s: _rewrite_volume(s / d["training"][0]["image"][1], lambda a: a.astype("float32") * float("nan")),
            r"modality t1ce image .*_t1ce.nii.gz has \d+ NaN and 0 infinite voxel\(s\)",
        ),
        (
            lambda d, s: d["training"][0].update(label="../../../../../../../../../etc/passwd"),
            r"training\[0\] label: '(\.\./)+etc/passwd' resolves to /etc/passwd, outside the data root",
        ),
        (
            lambda d, s: open(s / d["training"][2]["image"][0], "r+b").truncate(200),
            r"cannot read (the voxels of )?modality t1 image .*_t1.nii.gz",
        ),
    ],
    ids=["label-5", "label-halves", "flair-shape", "t1ce-nan", "path-escape", "truncated"],
)
def test_a_site_whose_volumes_fail_the_trainers_checks_is_refused_naming_the_file(tmp_path, tiny_sites, change, message):
    site = _bad_copy_of_site(tmp_path, tiny_sites, change)
    ws = _workspace(tmp_path)
    before = _snapshot(ws)
    with pytest.raises(InstallError, match=message):
        install_site(str(ws), "research", str(site / "datalist.json"), data_root=str(site), gpus=0, gpu_memory_gib=0)
    assert _snapshot(ws) == before


def test_an_outcome_table_with_a_non_finite_value_or_an_outside_image_is_refused(tmp_path):
    from medflare.data.cxr_synthetic import generate_cxr_sites

    configs = generate_cxr_sites(str(tmp_path / "cxr"), sites=2, cases=8, size=32)
    table = tmp_path / "cxr" / "site-1" / "cases.csv"
    lines = table.read_text().splitlines()
    header = lines[0].split(",")
    row = lines[1].split(",")
    numeric = next(i for i, c in enumerate(row) if header[i] not in ("case_id", "split", "image") and c.replace(".", "").isdigit())
    ws = _workspace(tmp_path)
    for index, value, message in (
        (numeric, "nan", rf"line 2 \(case '{row[0]}'\): column '{header[numeric]}' is not finite: 'nan'"),
        (header.index("image"), "../../../etc/hostname", r"line 2 .*: column 'image': '\.\./\.\./\.\./etc/hostname' resolves to"),
    ):
        bad = list(row)
        bad[index] = value
        table.write_text("\n".join([lines[0], ",".join(bad)] + lines[2:]) + "\n")
        with pytest.raises(InstallError, match=rf"--data .*: {table}.*{message}"):
            install_site(str(ws), "research", configs["site-1"], gpus=0, gpu_memory_gib=0)
        assert not (ws / "local" / "medflare_data.json").exists()


# the site's privacy budget ------------------------------------------------------------------

BUDGET = "medflare_privacy_budget.json"


def _profile_copy(tmp_path, name="clinical", budget="same", folder_name="my_profile"):
    """A copy of a shipped profile; ``budget``: "same", None (no budget file) or a dict."""
    src = os.path.join(os.path.dirname(__file__), "..", "..", "..", "site_configs", name)
    folder = tmp_path / folder_name
    folder.mkdir()
    for f in ("privacy.json", "resources.json"):
        (folder / f).write_text(open(os.path.join(src, f)).read())
    if budget == "same":
        (folder / BUDGET).write_text(open(os.path.join(src, BUDGET)).read())
    elif budget is not None:
        (folder / BUDGET).write_text(json.dumps(budget))
    return folder


@pytest.mark.parametrize("profile, cap", [("research", 10.0), ("clinical", 8.0)])
def test_install_puts_the_sites_budget_in_local_and_in_the_record(tmp_path, tiny_sites, profile, cap):
    from medflare.privacy.budget_ledger import PrivacyBudgetLedger

    ws = _workspace(tmp_path)
    plan = install_site(str(ws), profile, tiny_sites["site-1"], gpus=0)
    local = ws / "local"
    assert json.loads((local / BUDGET).read_text()) == {"max_epsilon": cap, "delta": 1e-5, "accountant": "rdp"}
    manifest = read_manifest(str(ws))
    assert manifest["files"][BUDGET] == hashlib.sha256((local / BUDGET).read_bytes()).hexdigest()
    assert manifest["modified"] == []
    assert any(f"privacy budget: max_epsilon {cap:g} at delta 1e-05 (rdp)" in line and "nothing spent yet" in line for line in plan.summary)
    ledger = PrivacyBudgetLedger.open_site(str(local))
    assert (ledger.max_epsilon, ledger.delta, ledger.accountant) == (cap, 1e-5, "rdp")


def test_reinstalling_never_touches_the_ledger_or_lowers_the_spend(tmp_path, tiny_sites):
    from medflare.privacy.budget_ledger import PrivacyBudgetLedger

    ws = _workspace(tmp_path)
    install_site(str(ws), "research", tiny_sites["site-1"], gpus=0)
    local = ws / "local"
    ledger = PrivacyBudgetLedger.open_site(str(local))
    for rnd in range(3):
        ledger.reserve(2.4, job_id="job-a", round_number=rnd)
    spent = ledger.epsilon_spent()
    kept = {n: (local / n).read_bytes() for n in ("medflare_privacy_ledger.json", ".medflare_privacy_ledger.seal")}

    plan = install_site(str(ws), "clinical", tiny_sites["site-1"], gpus=0)  # a smaller cap
    assert {n: (local / n).read_bytes() for n in kept} == kept
    again = PrivacyBudgetLedger.open_site(str(local))
    assert again.max_epsilon == 8.0 and again.epsilon_spent() == pytest.approx(spent)
    assert any(f"spent so far {spent:.4g} (the ledger is kept as it is)" in line for line in plan.summary)
    backups = list((local / "medflare_backup").iterdir())
    assert json.loads((backups[0] / BUDGET).read_text())["max_epsilon"] == 10.0  # the previous budget is kept too


def test_install_reports_a_spent_or_blocked_budget(tmp_path, tiny_sites):
    from medflare.privacy.budget_ledger import PrivacyBudgetLedger

    ws = _workspace(tmp_path)
    small = _profile_copy(tmp_path, budget={"max_epsilon": 2.0, "delta": 1e-5, "accountant": "rdp"})
    install_site(str(ws), str(small), tiny_sites["site-1"], gpus=0)
    PrivacyBudgetLedger.open_site(str(ws / "local")).reserve(2.4)
    plan = plan_install(str(ws), str(small), tiny_sites["site-1"], gpus=0)
    assert not any("NOTHING REMAINS" in line for line in plan.summary)
    tiny = _profile_copy(tmp_path, budget={"max_epsilon": 1.0, "delta": 1e-5, "accountant": "rdp"}, folder_name="tiny")
    plan = plan_install(str(ws), str(tiny), tiny_sites["site-1"], gpus=0)
    assert any("NOTHING REMAINS: every further Gaussian release is refused" in line for line in plan.summary)

    os.remove(ws / "local" / "medflare_privacy_ledger.json")
    before = _snapshot(ws)
    plan = plan_install(str(ws), str(small), tiny_sites["site-1"], gpus=0)
    assert any("WARNING: the privacy ledger is blocked and stays blocked" in line and "deleted or moved" in line for line in plan.summary)
    assert _snapshot(ws) == before  # planning writes nothing, not even the block's marker


def test_the_sites_seal_path_is_kept_and_the_seal_is_never_moved_away(tmp_path, tiny_sites):
    from medflare.privacy.budget_ledger import PrivacyBudgetLedger

    ws = _workspace(tmp_path)
    seal = tmp_path / "outside" / "site-1.seal"
    install_site(str(ws), "clinical", tiny_sites["site-1"], gpus=0)
    local = ws / "local"
    (local / BUDGET).write_text(json.dumps({"max_epsilon": 8.0, "delta": 1e-5, "accountant": "rdp", "seal_path": str(seal)}))
    PrivacyBudgetLedger.open_site(str(local)).reserve(2.4)
    assert seal.is_file()

    plan = install_site(str(ws), "clinical", tiny_sites["site-1"], gpus=0)  # the profile names no seal_path
    assert json.loads((local / BUDGET).read_text())["seal_path"] == str(seal)
    assert any(f"the site's seal_path {seal} is kept" in line for line in plan.summary)
    PrivacyBudgetLedger.open_site(str(local)).reserve(2.4)

    moved = _profile_copy(tmp_path, budget={"max_epsilon": 8.0, "delta": 1e-5, "accountant": "rdp", "seal_path": str(tmp_path / "new.seal")})
    before = _snapshot(ws)
    with pytest.raises(InstallError, match=f"would move the privacy ledger's seal from {seal} to .*new.seal"):
        install_site(str(ws), str(moved), tiny_sites["site-1"], gpus=0)
    assert _snapshot(ws) == before


def test_a_profile_without_a_budget_keeps_the_sites_and_needs_one_for_gaussian_scopes(tmp_path, tiny_sites):
    ws = _workspace(tmp_path)
    bare = _profile_copy(tmp_path, budget=None)
    before = _snapshot(ws)
    with pytest.raises(InstallError, match=r"has differential-privacy scopes \(Gaussian or DP-SGD\) but no medflare_privacy_budget.json, and the site has none"):
        install_site(str(ws), str(bare), tiny_sites["site-1"], gpus=0)
    assert _snapshot(ws) == before
    # a profile whose only scope is DP-SGD charges the ledger too: it needs the budget as well
    policy = json.loads((bare / "privacy.json").read_text())
    policy["scopes"] = [s for s in policy["scopes"] if s["name"] == "dp_sgd"]
    policy["default_scope"] = "dp_sgd"
    (bare / "privacy.json").write_text(json.dumps(policy))
    with pytest.raises(InstallError, match="but no medflare_privacy_budget.json, and the site has none"):
        install_site(str(ws), str(bare), tiny_sites["site-1"], gpus=0)
    assert _snapshot(ws) == before

    install_site(str(ws), "clinical", tiny_sites["site-1"], gpus=0)
    site_budget = (ws / "local" / BUDGET).read_bytes()
    plan = install_site(str(ws), str(bare), tiny_sites["site-1"], gpus=0)
    assert BUDGET not in plan.files and (ws / "local" / BUDGET).read_bytes() == site_budget


@pytest.mark.parametrize(
    "budget, message",
    [
        ({"max_epsilon": 0, "delta": 1e-5, "accountant": "rdp"}, r"max_epsilon must be in \(0.0, inf\), got 0.0"),
        ({"max_epsilon": 8, "delta": 1e-5, "accountant": "rdp", "max_epsilom": 9}, r"unknown field\(s\) \['max_epsilom'\]"),
        ({"max_epsilon": 8, "delta": 1e-6, "accountant": "rdp"}, "target_delta 1e-05 is above the site budget's delta 1e-06"),
    ],
)
def test_an_invalid_budget_in_a_profile_is_refused_before_anything_is_written(tmp_path, tiny_sites, budget, message):
    ws = _workspace(tmp_path)
    before = _snapshot(ws)
    with pytest.raises(InstallError, match=message):
        install_site(str(ws), str(_profile_copy(tmp_path, budget=budget)), tiny_sites["site-1"], gpus=0)
    assert _snapshot(ws) == before


def test_site_show_lists_the_budget(tmp_path, tiny_sites, capsys):
    ws = _workspace(tmp_path)
    install_site(str(ws), "clinical", tiny_sites["site-1"], gpus=0)
    assert main(["site", "show", "--workspace", str(ws)]) == 0
    out = capsys.readouterr().out
    assert "site budget: max_epsilon 8 at delta 1e-05 (rdp)" in out and "epsilon spent 0" in out


def test_a_chexpert_download_is_checked_and_installed_as_it_ships(tmp_path):
    from tests.unit.data.test_chest_xray_tables import make_chexpert

    from medflare.data.site_data_config import read_site_datasets

    make_chexpert(tmp_path / "chexpert")
    folder = tmp_path / "chexpert" / "CheXpert-v1.0-small"
    ws = _workspace(tmp_path)
    plan = install_site(str(ws), "research", str(folder), gpus=0, gpu_memory_gib=0)
    (entry,) = read_site_datasets(str(ws / "local" / "medflare_data.json"))
    # CheXpert's paths start with its folder's name: the data root is the folder holding it
    assert (entry.dataset, entry.data_root, entry.datalist) == ("outcome_image", str(tmp_path / "chexpert"), str(folder))
    assert any("(chexpert): 12 training and 3 test cases, 15 images" in line for line in plan.summary)

    # an image of the download that is missing is found before anything is written
    os.remove(folder / "valid" / "patient64542" / "study1" / "view1_frontal.jpg")
    other = _workspace(tmp_path, name="site-2")
    with pytest.raises(InstallError, match="view1_frontal.jpg"):
        install_site(str(other), "research", str(folder / "train.csv"), data_root=str(tmp_path / "chexpert"), gpus=0, gpu_memory_gib=0)
    assert not (other / "local" / "medflare_data.json").exists()
