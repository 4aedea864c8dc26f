"""A site bundle's network, weights and preprocessing; a hostile bundle never parsed."""

import copy
import json
import os

import pytest
import torch

from medflare.training.brats_transforms import val_transforms
from medflare.training.bundle_registry import ENV_VAR, BundleError, BundleRequest
from medflare.training.model_spec import build_model
from medflare.training.monai_bundles import (
    bundle_validation_transforms,
    check_network_channels,
    check_same_architecture,
    load_bundle,
)
from tests.unit.training.bundle_fixture import (
    PREPROCESSING,
    TINY_BUNDLE_ARGS,
    TINY_BUNDLE_SPEC,
    make_bundle,
    make_hostile_bundle,
    write_registry,
)


def _site(tmp_path, **bundle_kwargs):
    folder = make_bundle(tmp_path / "bundles", **bundle_kwargs)
    registry = write_registry(tmp_path / "registry.json", {"tiny_brats": folder})
    return folder, {ENV_VAR: registry}


def _load(env, **request):
    return load_bundle(BundleRequest("tiny_brats", **request), "site-1", None, env)


def test_the_network_is_the_configs_network_def(tmp_path):
    _, env = _site(tmp_path)
    network = _load(env).build_network()
    reference = build_model(TINY_BUNDLE_SPEC)
    assert type(network).__name__ == "SegResNet"
    assert {k: v.shape for k, v in network.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert network.convInit.conv.weight.shape == (4, 4, 3, 3, 3)  # init_filters 4 from 4 channels
    check_same_architecture(network, reference, "bundle", "job")  # no refusal


def test_weights_are_loaded_only_when_asked(tmp_path):
    folder, env = _site(tmp_path)
    saved = torch.load(os.path.join(folder, "models", "model.pt"), weights_only=True)
    loaded = _load(env, load_weights=True).build_network().state_dict()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    fresh = _load(env).build_network().state_dict()
    assert not torch.equal(fresh["convInit.conv.weight"], saved["convInit.conv.weight"])


def test_a_checkpoint_dict_with_a_model_key_is_loaded(tmp_path):
    folder = make_bundle(tmp_path / "b")
    path = os.path.join(folder, "models", "model.pt")
    state = torch.load(path, weights_only=True)
    torch.save({"model": state, "epoch": 3}, path)
    env = {ENV_VAR: write_registry(tmp_path / "r.json", {"tiny_brats": folder})}
    loaded = _load(env, load_weights=True).build_network().state_dict()
    assert torch.equal(loaded["convInit.conv.weight"], state["convInit.conv.weight"])


def test_weights_of_another_network_are_refused_naming_the_file(tmp_path):
    folder = make_bundle(tmp_path / "b")
    other = make_bundle(tmp_path / "other", network_args={**TINY_BUNDLE_ARGS, "init_filters": 8})
    os.replace(os.path.join(other, "models", "model.pt"), os.path.join(folder, "models", "model.pt"))
    env = {ENV_VAR: write_registry(tmp_path / "r.json", {"tiny_brats": folder})}
    with pytest.raises(BundleError, match="model.pt does not fit its 'network_def'"):
        _load(env, load_weights=True).build_network()


def test_weights_that_need_pickle_are_refused(tmp_path):
    folder = make_bundle(tmp_path / "b")
    torch.save({"model": {"w": torch.zeros(1)}, "loader": BundleRequest("x")}, os.path.join(folder, "models", "model.pt"))
    env = {ENV_VAR: write_registry(tmp_path / "r.json", {"tiny_brats": folder})}
    with pytest.raises(BundleError, match="not a readable weights-only torch file"):
        _load(env, load_weights=True).build_network()


def test_a_network_key_the_config_lacks_is_refused_listing_its_ids(tmp_path):
    _, env = _site(tmp_path)
    with pytest.raises(BundleError, match=r"has no 'net'; its top-level ids: \['bundle_root', 'network_def', 'preprocessing'\]"):
        _load(env, network_key="net").build_network()


@pytest.mark.parametrize(
    "args, message",
    [
        ({**TINY_BUNDLE_ARGS, "in_channels": 1}, "first convolution takes 1 channels"),
        ({**TINY_BUNDLE_ARGS, "out_channels": 2}, "output is (1, 2, 16, 16, 16)"),
    ],
)
def test_channels_other_than_the_jobs_are_refused(tmp_path, args, message):
    _, env = _site(tmp_path, network_args=args)
    network = _load(env).build_network()
    with pytest.raises(BundleError) as e:
        check_network_channels(network, 4, 3, (16, 16, 16), "bundle 'tiny_brats'")
    assert message in str(e.value) and "needs 4 input and 3 output channels" in str(e.value)


def test_another_architecture_than_the_servers_is_refused_naming_what_differs(tmp_path):
    _, env = _site(tmp_path)
    network = _load(env).build_network()
    server = copy.deepcopy(TINY_BUNDLE_SPEC)
    server["args"]["init_filters"] = 8
    server["args"]["blocks_down"] = [1, 1, 1]
    server["args"]["blocks_up"] = [1, 1]
    with pytest.raises(BundleError) as e:
        check_same_architecture(network, build_model(server), "bundle 'tiny_brats'", "the job's network")
    message = str(e.value)
    assert "not the same architecture" in message and "only in the job's network" in message
    assert "convInit.conv.weight: (4, 4, 3, 3, 3) vs (8, 4, 3, 3, 3)" in message


def test_the_preprocessing_is_the_bundles_and_the_label_follows_its_grid(tmp_path, tiny_site_files):
    _, env = _site(tmp_path)
    loaded = _load(env, use_preprocessing=True)
    chain = bundle_validation_transforms(loaded, val_transforms(None), 4)
    item = dict(tiny_site_files[1][0])
    ours = val_transforms(None)(dict(item))
    theirs = chain(item)
    # the bundle resamples to 8 mm: 32 voxels of 5.9 mm become 24; the label follows the image
    assert tuple(ours["image"].shape) == (4, 32, 32, 32)
    assert tuple(theirs["image"].shape) == (4, 24, 24, 24) and tuple(theirs["label"].shape) == (3, 24, 24, 24)
    assert torch.allclose(theirs["image"].affine, theirs["label"].affine)
    assert set(torch.unique(theirs["label"]).tolist()) <= {0.0, 1.0}
    # whole tumour volume in mm^3 is kept (nearest resampling, up to the grid change)
    mm3 = lambda d, spacing: float(d["label"][1].sum()) * spacing**3  # noqa: E731
    assert mm3(theirs, 8.0) == pytest.approx(mm3(ours, 5.90625), rel=0.25)
    # z-normalised over the brain by the bundle's NormalizeIntensityd
    brain = theirs["image"][0][theirs["image"][0] != 0]
    assert float(brain.mean()) == pytest.approx(0.0, abs=1e-3) and float(brain.std()) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize(
    "transform, message",
    [
        ({"_target_": "LoadImaged", "keys": ["image", "label"]}, "transforms keys ['image', 'label']"),
        ({"_target_": "RandFlipd", "keys": "image", "prob": 0.5}, "(RandFlipd) is random"),
        ({"_target_": "ScaleIntensity"}, "(ScaleIntensity) is not a dictionary transform"),
    ],
)
def test_preprocessing_beyond_a_deterministic_image_chain_is_refused(tmp_path, transform, message):
    chain = copy.deepcopy(PREPROCESSING)
    chain["transforms"].append(transform)
    _, env = _site(tmp_path, preprocessing=chain)
    with pytest.raises(BundleError) as e:
        _load(env, use_preprocessing=True).preprocessing()
    assert message in str(e.value) and "tiny_brats" in str(e.value)


def test_preprocessing_asked_of_a_bundle_without_one_is_refused(tmp_path):
    _, env = _site(tmp_path, preprocessing=None)
    with pytest.raises(BundleError, match="declares no 'preprocessing'"):
        _load(env, use_preprocessing=True).preprocessing()


def test_a_config_macro_reading_another_file_is_refused(tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"net": {"_target_": "SegResNet"}}))
    _, env = _site(tmp_path, extra_config={"other": f"%{outside}#net"})
    with pytest.raises(BundleError, match="reads another file by macro"):
        _load(env)


def test_a_hostile_bundle_is_never_evaluated_unless_the_site_allowed_it(tmp_path):
    marker = tmp_path / "evaluated.txt"
    hostile = make_hostile_bundle(tmp_path / "bundles", marker)
    good = make_bundle(tmp_path / "bundles")
    # not allow-listed: the registry allows only the good bundle
    env = {ENV_VAR: write_registry(tmp_path / "registry.json", {"tiny_brats": good})}
    with pytest.raises(BundleError, match="'hostile' is not allow-listed"):
        load_bundle(BundleRequest("hostile"), "site-1", None, env).build_network()
    # allow-listed under the good bundle's checksum (swapped on disk): refused before parsing
    swapped = {ENV_VAR: write_registry(tmp_path / "swapped.json", {"hostile": hostile}, digests={"hostile": _digest(good)})}
    with pytest.raises(BundleError, match="changed on disk"):
        load_bundle(BundleRequest("hostile"), "site-1", None, swapped).build_network()
    assert not marker.exists()
    # the control: a site that did allow it, checksum and all, runs its author's code
    allowed = {ENV_VAR: write_registry(tmp_path / "allowed.json", {"hostile": hostile})}
    with pytest.raises(BundleError, match="not a torch.nn.Module"):
        load_bundle(BundleRequest("hostile"), "site-1", None, allowed).build_network()
    assert marker.read_text() == "evaluated"


def _digest(folder):
    from medflare.training.bundle_registry import bundle_digest

    return bundle_digest(folder)


def test_build_model_of_a_bundle_spec_is_its_plain_network_and_needs_one():
    from medflare.training.model_spec import is_bundle_spec, split_bundle_spec

    spec = {"bundle": "tiny_brats", "use_preprocessing": True, "network": copy.deepcopy(TINY_BUNDLE_SPEC)}
    assert is_bundle_spec(spec) and not is_bundle_spec(TINY_BUNDLE_SPEC)
    assert split_bundle_spec(spec) == ({"bundle": "tiny_brats", "use_preprocessing": True}, TINY_BUNDLE_SPEC)
    assert set(build_model(spec).state_dict()) == set(build_model(TINY_BUNDLE_SPEC).state_dict())
    for network in (None, "monai.networks.nets.SegResNet", {"args": {}}, {"bundle": "x"}):
        with pytest.raises(ValueError, match="needs 'network'"):
            build_model({"bundle": "tiny_brats", "network": network})
