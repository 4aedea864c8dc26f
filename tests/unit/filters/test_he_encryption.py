"""The site's CKKS encryptor and decryptor (:mod:`medflare.filters.he_encryption`), driven through
``Filter.process`` as the FLARE client runs them, with the keys of a kit provisioned with HE."""

from __future__ import annotations

import json

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable
from nvflare.apis.workspace import Workspace
from nvflare.app_common.app_constant import AppConstants
from nvflare.fuel.sec.security_content_service import SecurityContentService

from medflare.filters.he_encryption import HEModelDecryptor, HEUpdateEncryptor
from medflare.filters.percentile_sharing import PercentileSharingFilter
from medflare.privacy.site_budget import SITE_BUDGET_FILE_NAME
from medflare.privacy.update_checks import UnsafeUpdateError, l2_norm
from medflare.transport.ckks_update import decrypt_update, encrypt_update
from medflare.transport.sparse_update import decode_sparse, encode_sparse
from medflare.wire_contract import ENCRYPTION, FILTERS_APPLIED, HE_ALGORITHM, HE_PROCESSED_KEYS, LOCAL_MODEL, NUM_STEPS
from tests.he_keys import contexts, install_contexts

SHAPES = {"conv.weight": (8, 4), "conv.bias": (8,), "head.weight": (2, 8)}
NORM_BOUND = 1.0


def _workspace_ctx(tmp_path) -> FLContext:
    (tmp_path / "startup").mkdir(exist_ok=True)
    (tmp_path / "local").mkdir(exist_ok=True)
    (tmp_path / "local" / SITE_BUDGET_FILE_NAME).write_text(json.dumps({"max_epsilon": 100.0, "delta": 1e-5, "accountant": "rdp"}))
    ctx = FLContext()
    ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, Workspace(str(tmp_path), "site-1"), private=True, sticky=True)
    return ctx


def _fresh_content_service(monkeypatch):
    """NVFlare's SecurityContentService keeps the first folder it is initialized with for the
    whole process; forget it for this test (and restore it after), so that each test's startup
    kit is the one read."""
    monkeypatch.setattr(SecurityContentService, "security_content_manager", None)
    monkeypatch.setattr(SecurityContentService, "content_folder", None)


@pytest.fixture()
def fl_ctx(tmp_path, monkeypatch):
    ctx = _workspace_ctx(tmp_path)
    _fresh_content_service(monkeypatch)
    install_contexts(str(tmp_path / "startup"), ctx)
    return ctx


@pytest.fixture()
def no_key_ctx(tmp_path, monkeypatch):
    """A site whose kit was provisioned without the HEBuilder: no CKKS context in startup/."""
    ctx = _workspace_ctx(tmp_path)
    _fresh_content_service(monkeypatch)
    SecurityContentService.initialize(content_folder=str(tmp_path / "startup"))
    ctx.set_prop(FLContextKey.SECURE_MODE, False, private=True, sticky=True)
    return ctx


@pytest.fixture(scope="module")
def client_key():
    return contexts()[0]


def _update(seed: int = 0, scale: float = 0.01) -> dict:
    rng = np.random.default_rng(seed)
    return {name: (scale * rng.standard_normal(shape)).astype(np.float32) for name, shape in SHAPES.items()}


def _result(data=None, meta=None, kind=DataKind.WEIGHT_DIFF, round_number=2) -> Shareable:
    meta = {"num_train_cases": 24, NUM_STEPS: 12, "train_loss": 0.4} if meta is None else meta
    shareable = DXO(data_kind=kind, data=_update() if data is None else data, meta=meta).to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, round_number)
    return shareable


def _decrypted(dxo: DXO, key) -> dict:
    return decrypt_update(dxo.data, key, shapes=SHAPES)


# --- the honest update -----------------------------------------------------------------------


def test_an_honest_update_is_released_as_ciphertexts_weighted_by_its_cases(fl_ctx, client_key):
    update = _update()
    out = HEUpdateEncryptor(max_update_norm=NORM_BOUND).process(_result(update), fl_ctx)
    assert set(out) == {ReservedHeaderKey.HEADERS, "DXO"}
    assert out.get_header(AppConstants.CURRENT_ROUND) == 2
    dxo = from_shareable(out)
    assert dxo.data_kind == DataKind.WEIGHT_DIFF
    assert set(dxo.data) == set(SHAPES) and all(type(v) is bytes for v in dxo.data.values())
    assert dxo.meta[HE_PROCESSED_KEYS] == {name: True for name in SHAPES}
    assert dxo.meta[HE_ALGORITHM] == "CKKS"
    assert dxo.meta[ENCRYPTION] == {
        "scheme": "CKKS",
        "weighted_by": "num_train_cases",
        "weight": 24.0,
        "max_update_norm": NORM_BOUND,
        "num_values": sum(int(np.prod(s)) for s in SHAPES.values()),
    }
    assert dxo.meta["num_train_cases"] == 24  # released, so the server can check the weight
    assert dxo.meta[FILTERS_APPLIED][-1]["filter"] == "HEUpdateEncryptor"
    for name, value in _decrypted(dxo, client_key).items():
        np.testing.assert_allclose(value, 24.0 * update[name].astype(np.float64), atol=1e-6)


@pytest.mark.parametrize(
    "meta, release_meta",
    [({NUM_STEPS: 12}, None), ({"num_train_cases": 24}, []), ({"num_train_cases": 0}, None)],
    ids=["count-absent", "count-withheld-by-release-meta", "count-zero"],
)
def test_without_a_released_count_the_weight_is_one_and_equal(meta, release_meta, fl_ctx, client_key):
    update = _update(1)
    out = HEUpdateEncryptor(max_update_norm=NORM_BOUND, release_meta=release_meta).process(_result(update, meta), fl_ctx)
    dxo = from_shareable(out)
    assert dxo.meta[ENCRYPTION]["weighted_by"] == "equal" and dxo.meta[ENCRYPTION]["weight"] == 1.0
    if release_meta == []:
        assert "num_train_cases" not in dxo.meta
    for name, value in _decrypted(dxo, client_key).items():
        np.testing.assert_allclose(value, update[name], atol=1e-6)


def test_weighting_by_steps_multiplies_by_the_released_steps(fl_ctx, client_key):
    update = _update(2)
    out = HEUpdateEncryptor(max_update_norm=NORM_BOUND, weight_meta_key=NUM_STEPS).process(_result(update), fl_ctx)
    dxo = from_shareable(out)
    assert dxo.meta[ENCRYPTION]["weighted_by"] == NUM_STEPS and dxo.meta[ENCRYPTION]["weight"] == 12.0
    np.testing.assert_allclose(_decrypted(dxo, client_key)["conv.bias"], 12.0 * update["conv.bias"], atol=1e-6)


def test_a_sparse_payload_is_encrypted_dense_with_zeros_where_nothing_was_shared(fl_ctx, client_key):
    update = _update(3)
    masks = {name: np.abs(value) > np.median(np.abs(value)) for name, value in update.items()}
    sparse = encode_sparse(update, masks)
    out = HEUpdateEncryptor(max_update_norm=NORM_BOUND).process(_result(sparse, {}), fl_ctx)
    dxo = from_shareable(out)
    assert all(type(v) is bytes for v in dxo.data.values())
    for name, value in _decrypted(dxo, client_key).items():
        np.testing.assert_allclose(value, np.where(masks[name], update[name], 0.0), atol=1e-6)


def test_partial_sharing_then_encryption_works_end_to_end(fl_ctx, client_key):
    sharing = PercentileSharingFilter(fraction_shared=0.5, gamma=0.1, sparse_transport=True)
    update = _update(4, scale=0.2)  # some values above gamma: clipped
    shared = sharing.process(_result(update), fl_ctx)
    expected = decode_sparse(from_shareable(shared).data)
    out = HEUpdateEncryptor(max_update_norm=NORM_BOUND).process(shared, fl_ctx)
    dxo = from_shareable(out)
    assert [f["filter"] for f in dxo.meta[FILTERS_APPLIED]] == ["PercentileSharingFilter", "HEUpdateEncryptor"]
    assert dxo.meta["medflare_percentile_sharing"]["sparse"] is True
    assert dxo.meta[ENCRYPTION]["weight"] == 24.0
    decrypted = _decrypted(dxo, client_key)
    total = sum(v.size for v in update.values())
    nonzero = sum(int(np.count_nonzero(np.abs(v) > 1e-4)) for v in decrypted.values())
    assert nonzero == total // 2
    for name, value in decrypted.items():
        np.testing.assert_allclose(value / 24.0, expected[name], atol=1e-6)
        assert np.max(np.abs(value / 24.0)) <= 0.1 + 1e-6


def test_a_metrics_result_passes_as_numbers(fl_ctx):
    metrics = DXO(data_kind=DataKind.METRICS, data={"dice_mean": 0.5, "num_cases": 3}).to_shareable()
    dxo = from_shareable(HEUpdateEncryptor(max_update_norm=NORM_BOUND).process(metrics, fl_ctx))
    assert dxo.data_kind == DataKind.METRICS and dxo.data == {"dice_mean": 0.5, "num_cases": 3}
    assert HE_PROCESSED_KEYS not in dxo.meta


def test_a_site_only_model_is_encrypted_unweighted(fl_ctx, client_key):
    model = _update(5, scale=5.0)  # model weights: far above the update's norm bound, which does not apply
    out = HEUpdateEncryptor(max_update_norm=NORM_BOUND).process(
        _result(model, {LOCAL_MODEL: "site_only", "num_train_cases": 24}, kind=DataKind.WEIGHTS), fl_ctx
    )
    dxo = from_shareable(out)
    assert dxo.data_kind == DataKind.WEIGHTS
    assert dxo.meta[ENCRYPTION]["weighted_by"] == "equal" and dxo.meta[ENCRYPTION]["weight"] == 1.0
    assert dxo.meta[ENCRYPTION]["max_update_norm"] is None
    for name, value in _decrypted(dxo, client_key).items():
        np.testing.assert_allclose(value, model[name], atol=1e-5)


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("local_model", ["last_round", None])
def test_weights_that_are_not_a_site_only_model_are_refused(local_model, fl_ctx):
    meta = {} if local_model is None else {LOCAL_MODEL: local_model}
    with pytest.raises(UnsafeUpdateError, match="only a site-only model is encrypted as WEIGHTS"):
        HEUpdateEncryptor(max_update_norm=NORM_BOUND).process(_result(meta=meta, kind=DataKind.WEIGHTS), fl_ctx)


@pytest.mark.parametrize("scale", [1.0, 1e30], ids=["above-the-bound", "overflowing"])
def test_an_update_above_max_update_norm_is_refused(scale, fl_ctx):
    update = _update(6, scale=scale)
    assert l2_norm(update) > NORM_BOUND
    with pytest.raises(UnsafeUpdateError, match="exceeds max_update_norm 1; the server cannot check it once encrypted"):
        HEUpdateEncryptor(max_update_norm=NORM_BOUND).process(_result(update), fl_ctx)


def test_an_update_at_the_bound_is_released(fl_ctx):
    update = _update(7)
    norm = l2_norm(update)
    out = HEUpdateEncryptor(max_update_norm=norm * (1 + 1e-6)).process(_result(update), fl_ctx)
    assert from_shareable(out).meta[ENCRYPTION]["max_update_norm"] == pytest.approx(norm, rel=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad, fl_ctx):
    update = _update()
    update["conv.bias"][3] = bad
    with pytest.raises(UnsafeUpdateError, match="conv.bias"):
        HEUpdateEncryptor(max_update_norm=NORM_BOUND).process(_result(update), fl_ctx)


def test_no_context_in_the_startup_kit_is_refused_naming_the_ckks_context(no_key_ctx):
    with pytest.raises(UnsafeUpdateError, match="CKKS context 'client_context.tenseal'"):
        HEUpdateEncryptor(max_update_norm=NORM_BOUND).process(_result(), no_key_ctx)


def test_ciphertexts_from_an_earlier_encryptor_are_refused(fl_ctx):
    encryptor = HEUpdateEncryptor(max_update_norm=NORM_BOUND)
    once = encryptor.process(_result(), fl_ctx)
    with pytest.raises(UnsafeUpdateError, match="'conv.weight' is bytes, not a numpy array"):
        HEUpdateEncryptor(max_update_norm=NORM_BOUND).process(once, fl_ctx)


def test_ciphertexts_made_by_the_executor_are_refused(fl_ctx, client_key):
    data = encrypt_update(_update(), client_key)
    with pytest.raises(UnsafeUpdateError, match="'conv.weight' is bytes, not a numpy array"):
        HEUpdateEncryptor(max_update_norm=NORM_BOUND).process(_result(data, {}), fl_ctx)


def _with_extra_key(r):
    r["weights_copy"] = _update()


def _with_undeclared_meta(r):
    r["DXO"]["meta"]["patient_ids"] = "17,18"


def _with_undeclared_header(r):
    r.set_header("note", "patient 17")


@pytest.mark.parametrize(
    "tamper, message",
    [
        (_with_extra_key, r"\['weights_copy'\] beside its DXO"),
        (_with_undeclared_meta, "undeclared key 'patient_ids'"),
        (_with_undeclared_header, "undeclared header 'note'"),
    ],
    ids=["extra-shareable-key", "undeclared-meta", "undeclared-header"],
)
def test_what_the_contract_does_not_declare_is_refused(tamper, message, fl_ctx):
    result = _result()
    tamper(result)
    with pytest.raises(UnsafeUpdateError, match=message):
        HEUpdateEncryptor(max_update_norm=NORM_BOUND).process(result, fl_ctx)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"max_update_norm": 0}, ValueError, r"max_update_norm must be in \(0.0, inf\), got 0.0"),
        ({"max_update_norm": -1}, ValueError, "max_update_norm must be in"),
        ({"max_update_norm": float("nan")}, ValueError, "max_update_norm must be a finite"),
        ({"max_update_norm": float("inf")}, ValueError, "max_update_norm must be a finite"),
        ({"max_update_norm": "1"}, TypeError, "max_update_norm must be a real number"),
        ({"max_update_norm": True}, TypeError, "max_update_norm must be a real number"),
        ({"max_update_norm": 1, "weight_meta_key": "x"}, ValueError, "weight_meta_key must be one of .* got 'x'"),
        ({"max_update_norm": 1, "tenseal_context_file": ""}, TypeError, "tenseal_context_file must be a file name"),
        ({"max_update_norm": 1, "tenseal_context_file": None}, TypeError, "tenseal_context_file must be a file name"),
        ({"max_update_norm": 1, "release_meta": ["patient_ids"]}, ValueError, "release_meta may only name"),
        ({"max_update_norm": 1, "passthrough_data_kinds": ["WEIGHTS"]}, ValueError, "passthrough_data_kinds may only name"),
    ],
    ids=["norm-zero", "norm-negative", "norm-nan", "norm-inf", "norm-str", "norm-bool", "weight-key", "context-empty",
         "context-none", "release-meta", "passthrough-weights"],
)
def test_bad_arguments_are_refused_naming_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        HEUpdateEncryptor(**kwargs)


def test_arguments_are_stored_as_given():
    encryptor = HEUpdateEncryptor(max_update_norm=40, weight_meta_key=NUM_STEPS, tenseal_context_file="ctx.tenseal")
    assert (encryptor.max_update_norm, encryptor.weight_meta_key, encryptor.tenseal_context_file) == (40.0, NUM_STEPS, "ctx.tenseal")


# --- the decryptor of the global model ---------------------------------------------------------


def _encrypted_model(model: dict, key) -> Shareable:
    """The global model as the server's HE shareable generator sends it from the second round on."""
    data = encrypt_update(model, key)
    meta = {MetaKey.PROCESSED_KEYS: {name: True for name in data}, MetaKey.PROCESSED_ALGORITHM: "CKKS"}
    return DXO(data_kind=DataKind.WEIGHTS, data=data, meta=meta).to_shareable()


def test_the_decryptor_decrypts_an_encrypted_global_model_to_flat_values(fl_ctx, client_key):
    model = _update(8, scale=0.5)
    out = HEModelDecryptor().process(_encrypted_model(model, client_key), fl_ctx)
    dxo = from_shareable(out)
    assert dxo.data_kind == DataKind.WEIGHTS
    assert MetaKey.PROCESSED_KEYS not in dxo.meta and MetaKey.PROCESSED_ALGORITHM not in dxo.meta
    assert set(dxo.data) == set(SHAPES)
    for name, value in model.items():
        flat = np.asarray(dxo.data[name], dtype=np.float64)
        assert flat.shape == (value.size,)
        np.testing.assert_allclose(flat, value.ravel(), atol=1e-6)


def test_the_decryptor_passes_a_plaintext_model_unchanged(fl_ctx):
    model = _update(9)
    out = HEModelDecryptor().process(DXO(data_kind=DataKind.WEIGHTS, data=model).to_shareable(), fl_ctx)
    dxo = from_shareable(out)
    for name, value in model.items():
        np.testing.assert_array_equal(dxo.data[name], value)


def test_the_decryptor_without_a_context_names_the_ckks_context(no_key_ctx, client_key):
    with pytest.raises(ValueError, match="no usable CKKS context 'client_context.tenseal'"):
        HEModelDecryptor().process(_encrypted_model(_update(), client_key), no_key_ctx)
