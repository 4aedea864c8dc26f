"""The site's bundle registry: parsing, a job's request, every refusal before a bundle is parsed."""

import json
import os

import pytest

from medflare.training.bundle_registry import (
    ENV_VAR,
    LOCAL_FILE_NAME,
    BundleError,
    BundleRequest,
    bundle_digest,
    find_bundle_registry,
    parse_bundle_request,
    read_bundle_registry,
    read_site_bundle,
)
from tests.unit.training.bundle_fixture import make_bundle, write_registry


@pytest.fixture()
def site(tmp_path):
    folder = make_bundle(tmp_path / "bundles")
    registry = write_registry(tmp_path / "registry.json", {"tiny_brats": folder})
    return folder, registry, {ENV_VAR: registry}


def test_a_request_is_a_name_and_flags():
    assert parse_bundle_request({"bundle": "tiny_brats"}) == BundleRequest("tiny_brats")
    request = parse_bundle_request(
        {"bundle": "b.v2", "version": "1.0.0", "network_key": "net#inner", "use_preprocessing": True, "load_weights": True}
    )
    assert request == BundleRequest("b.v2", "1.0.0", "net#inner", True, True)


@pytest.mark.parametrize(
    "request_, error, message",
    [
        ({"bundle": "/tmp/hostile"}, ValueError, "bundle's name in the site's registry"),
        ({"bundle": "../hostile"}, ValueError, "bundle's name"),
        ({"bundle": ""}, ValueError, "bundle's name"),
        ({"bundle": 3}, ValueError, "bundle's name"),
        ({"bundle": "x", "path": "/tmp/hostile"}, ValueError, "never carries a bundle, its config or a path"),
        ({"bundle": "x", "config": {"network_def": "$print(1)"}}, ValueError, "unknown key(s) ['config']"),
        ({"bundle": "x", "version": 1.0}, ValueError, "version string"),
        ({"bundle": "x", "version": "../1"}, ValueError, "version string"),
        ({"bundle": "x", "network_key": "$evil()"}, ValueError, "config id"),
        ({"bundle": "x", "use_preprocessing": 1}, TypeError, "use_preprocessing"),
        ({"bundle": "x", "load_weights": "yes"}, TypeError, "load_weights"),
        ("tiny_brats", ValueError, "JSON object naming a site bundle"),
    ],
)
def test_hostile_requests_are_refused(request_, error, message):
    with pytest.raises(error) as e:
        parse_bundle_request(request_)
    assert message in str(e.value)


def test_the_registry_resolves_relative_paths_and_defaults(tmp_path, site):
    folder, registry, _ = site
    rel = tmp_path / "rel.json"
    rel.write_text(json.dumps({"bundles": {"tiny_brats": {"path": "bundles/tiny_brats", "version": "0.1.0", "sha256": "a" * 64}}}))
    entry = read_bundle_registry(str(rel))["tiny_brats"]
    assert entry["path"] == folder
    assert (entry["config"], entry["weights"]) == ("configs/inference.json", "models/model.pt")


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "is not readable JSON"),
        ([], "must hold a JSON object"),
        ({"tiny_brats": {}}, "must be {'bundles'"),
        ({"bundles": {"tiny_brats": {}}, "extra": 1}, "must be {'bundles'"),
        ({"bundles": {"../x": {}}}, "a bundle name must be"),
        ({"bundles": {"b": "/opt/b"}}, "bundles.b must be an object"),
        ({"bundles": {"b": {"path": "/opt/b", "version": "1"}}}, "needs a non-empty string 'sha256'"),
        ({"bundles": {"b": {"path": "/opt/b", "version": "1", "sha256": "XYZ"}}}, "64 lowercase hex"),
        ({"bundles": {"b": {"path": "/opt/b", "version": "1", "sha256": "a" * 64, "url": "http://x"}}}, "unknown key(s) ['url']"),
        ({"bundles": {"b": {"path": "/opt/b", "version": "1", "sha256": "a" * 64, "config": "../../etc/x.json"}}}, "leaves the bundle folder"),
        ({"bundles": {"b": {"path": "/opt/b", "version": "1", "sha256": "a" * 64, "weights": "/etc/passwd"}}}, "leaves the bundle folder"),
        ({"bundles": {"b": {"path": "/opt/b", "version": 1, "sha256": "a" * 64}}}, "needs a non-empty string 'version'"),
    ],
)
def test_a_malformed_registry_is_refused_naming_the_file_and_key(tmp_path, content, message):
    path = tmp_path / "registry.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(BundleError) as e:
        read_bundle_registry(str(path))
    assert message in str(e.value) and str(path) in str(e.value)


def test_the_registry_is_found_by_env_var_then_local_file(tmp_path):
    assert find_bundle_registry("site-2", None, {ENV_VAR: "/r/{site_name}/b.json"}) == "/r/site-2/b.json"
    (tmp_path / LOCAL_FILE_NAME).write_text("{}")
    assert find_bundle_registry("site-1", str(tmp_path), {}) == str(tmp_path / LOCAL_FILE_NAME)
    with pytest.raises(BundleError, match="allows no MONAI bundle.*MEDFLARE_BUNDLES \\(unset\\).*absent"):
        find_bundle_registry("site-1", str(tmp_path / "nowhere"), {})


def test_an_allowed_bundle_is_read_from_the_hashed_bytes(site):
    folder, registry, env = site
    bundle = read_site_bundle(BundleRequest("tiny_brats", "0.1.0", load_weights=True), "site-1", None, env)
    assert (bundle.folder, bundle.version, bundle.registry) == (folder, "0.1.0", registry)
    assert bundle.config["network_def"]["init_filters"] == 4
    with open(os.path.join(folder, "models", "model.pt"), "rb") as f:
        assert bundle.weights == f.read()


def test_the_digest_covers_configs_models_scripts_and_nothing_else(site):
    folder, _, _ = site
    before = bundle_digest(folder)
    with open(os.path.join(folder, "LICENSE"), "a") as f:
        f.write("docs change nothing\n")
    assert bundle_digest(folder) == before
    os.makedirs(os.path.join(folder, "scripts"))
    with open(os.path.join(folder, "scripts", "net.py"), "w") as f:
        f.write("import os\n")
    assert bundle_digest(folder) != before


def _refusal(env, request=BundleRequest("tiny_brats")):
    with pytest.raises(BundleError) as e:
        read_site_bundle(request, "site-1", None, env)
    return str(e.value)


def test_a_name_not_allow_listed_is_refused_listing_the_allowed(site):
    _, registry, env = site
    message = _refusal(env, BundleRequest("other_bundle"))
    assert "'other_bundle' is not allow-listed at site 'site-1'" in message and registry in message and "['tiny_brats']" in message


def test_a_version_the_job_asks_for_that_the_site_lacks_is_refused(site):
    message = _refusal(site[2], BundleRequest("tiny_brats", version="0.2.0"))
    assert "asks for version '0.2.0', this site allows '0.1.0'" in message and site[1] in message


def test_a_bundle_whose_metadata_version_moved_is_refused(site):
    folder, _, env = site
    meta = os.path.join(folder, "configs", "metadata.json")
    with open(meta) as f:
        content = json.load(f)
    content["version"] = "0.1.1"
    with open(meta, "w") as f:
        json.dump(content, f)
    assert "says version '0.1.1', the registry allows '0.1.0'" in _refusal(env)


def test_a_bundle_changed_on_disk_is_refused_by_its_checksum(site):
    folder, registry, env = site
    path = os.path.join(folder, "configs", "inference.json")
    with open(path) as f:
        config = json.load(f)
    config["network_def"]["init_filters"] = 8
    with open(path, "w") as f:
        json.dump(config, f)
    message = _refusal(env)
    assert "changed on disk" in message and "tiny_brats" in message and registry in message


def test_swapped_weights_are_refused_by_the_checksum(site):
    folder, _, env = site
    with open(os.path.join(folder, "models", "model.pt"), "ab") as f:
        f.write(b"\0")
    assert "changed on disk" in _refusal(env)


@pytest.mark.parametrize("what", ["folder", "metadata", "metadata_corrupt", "config", "weights", "symlink"])
def test_missing_or_unreadable_parts_are_refused(tmp_path, what):
    kwargs = {"weights": what != "weights"}
    folder = make_bundle(tmp_path / "b", **kwargs)
    if what == "metadata":
        os.remove(os.path.join(folder, "configs", "metadata.json"))
    elif what == "metadata_corrupt":
        with open(os.path.join(folder, "configs", "metadata.json"), "w") as f:
            f.write("{not json")
    elif what == "config":
        os.remove(os.path.join(folder, "configs", "inference.json"))
    elif what == "symlink":
        os.symlink("/etc/hostname", os.path.join(folder, "configs", "extra.json"))
    registry = write_registry(tmp_path / "r.json", {"tiny_brats": folder}, digests={"tiny_brats": "0" * 64})
    if what == "folder":
        os.rename(folder, folder + "_moved")
    expected = {
        "folder": "does not exist",
        "metadata": "metadata.json not found",
        "metadata_corrupt": "metadata.json is not readable",
        "config": "changed on disk",  # the digest is checked before the config is looked for
        "weights": "changed on disk",
        "symlink": "is a symbolic link",
    }[what]
    message = _refusal({ENV_VAR: registry}, BundleRequest("tiny_brats", load_weights=True))
    assert expected in message and "tiny_brats" in message


def test_a_missing_weights_file_is_refused_when_the_job_asks_for_weights(tmp_path):
    folder = make_bundle(tmp_path / "b", weights=False)
    registry = write_registry(tmp_path / "r.json", {"tiny_brats": folder})
    assert read_site_bundle(BundleRequest("tiny_brats"), "s", None, {ENV_VAR: registry}).weights is None
    message = _refusal({ENV_VAR: registry}, BundleRequest("tiny_brats", load_weights=True))
    assert "asks for its weights" in message and "model.pt does not exist" in message
