"""The server's aggregator of CKKS-encrypted contributions (:mod:`medflare.aggregators.encrypted_aggregator`),
driven through accept()/aggregate() as NVFlare's ScatterAndGather does.

As in ``test_hostile_contributions.py``, each hostile case mixes two honest sites (``site-b``,
``site-c``) with one hostile site (``site-a``, sent first). The hostile contribution must be
rejected with its reason in the round's record, and the encrypted aggregate must decrypt (with a
site's key) to the case-weighted mean of the honest updates alone. The server's context has no
secret key; the tests decrypt with the client context of the same ``HEBuilder`` keys.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import tenseal as ts
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.fuel.sec.security_content_service import SecurityContentService

from medflare.aggregators.encrypted_aggregator import EncryptedSumAggregator
from medflare.filters.he_encryption import encrypted_result
from medflare.transport.ckks_update import decrypt_update, encrypt_update
from medflare.wire_contract import AGGREGATION, ENCRYPTION, HE_ALGORITHM, HE_PROCESSED_KEYS, NUM_STEPS, NUM_TRAIN_CASES
from tests.he_keys import contexts, install_contexts

ROUND = 1
GLOBAL = {
    "conv.weight": np.zeros((4, 3), np.float32),
    "conv.bias": np.zeros(4, np.float32),
    "head.weight": np.zeros((1, 4), np.float32),
}
SIZES = {name: value.size for name, value in GLOBAL.items()}
HONEST_CASES = {"site-b": 10, "site-c": 30}
NORM_BOUND = 40.0


@pytest.fixture(scope="module")
def keys():
    return contexts()


@pytest.fixture()
def fl_ctx(tmp_path, monkeypatch):
    """The server: its startup kit holds the HEBuilder's server context; round 1; the plaintext initial model."""
    # NVFlare's service keeps the first folder it is given for the process: forget it for this test
    monkeypatch.setattr(SecurityContentService, "security_content_manager", None)
    monkeypatch.setattr(SecurityContentService, "content_folder", None)
    ctx = FLContext()
    install_contexts(str(tmp_path / "startup"), ctx)
    ctx.set_prop(AppConstants.CURRENT_ROUND, ROUND, private=True, sticky=True)
    ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(GLOBAL, {}), private=True, sticky=True)
    return ctx


def _aggregator(**kwargs) -> EncryptedSumAggregator:
    args = dict(max_update_norm=NORM_BOUND, weight_meta_key=NUM_TRAIN_CASES, max_weight=1000)
    args.update(kwargs)
    return EncryptedSumAggregator(**args)


def _update(seed: int, scale: float = 0.1) -> dict:
    rng = np.random.default_rng(seed)
    return {name: (scale * rng.standard_normal(value.shape)).astype(np.float32) for name, value in GLOBAL.items()}


UPDATES = {"site-a": _update(0), "site-b": _update(1), "site-c": _update(2), "site-d": _update(3)}


def _encrypted(site, key, cases=None, weighted_by=None, weight=None, norm_bound=NORM_BOUND, dp_sites=None, update=None):
    """``(data, meta)`` as the site's HEUpdateEncryptor releases them."""
    cases = HONEST_CASES.get(site, 20) if cases is None else cases
    weighted_by = NUM_TRAIN_CASES if weighted_by is None else weighted_by
    weight = (float(cases) if weighted_by == NUM_TRAIN_CASES else 1.0) if weight is None else weight
    meta = {NUM_TRAIN_CASES: cases} if cases else {}
    return encrypted_result(UPDATES[site] if update is None else update, meta, key, weighted_by, weight, norm_bound, dp_sites)


def _shareable(data, meta, site="site-a", round_number=ROUND, kind=DataKind.WEIGHT_DIFF) -> Shareable:
    s = DXO(data_kind=kind, data=data, meta=meta).to_shareable()
    if site is not None:
        s.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    if round_number is not None:
        s.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_number)
    return s


def _contribution(site, key, **kwargs) -> Shareable:
    return _shareable(*_encrypted(site, key, **kwargs), site=site)


def _decrypted(result: Shareable, key) -> dict:
    dxo = from_shareable(result)
    shapes = {name: value.shape for name, value in GLOBAL.items()}
    return decrypt_update({name: vector.serialize() for name, vector in dxo.data.items()}, key, shapes=shapes)


def _mean(weights: dict) -> dict:
    total = float(sum(weights.values()))
    return {name: sum(w * UPDATES[s][name].astype(np.float64) for s, w in weights.items()) / total for name in GLOBAL}


def _assert_mean(result: Shareable, key, weights: dict):
    dxo = from_shareable(result)
    assert dxo.data_kind == DataKind.WEIGHT_DIFF
    assert all(isinstance(v, ts.CKKSVector) for v in dxo.data.values())
    mean = _decrypted(result, key)
    expected = _mean(weights)
    for name in GLOBAL:
        np.testing.assert_allclose(mean[name], expected[name], rtol=0, atol=1e-6, err_msg=name)


def _accept_honest(aggregator, fl_ctx, key):
    for site in HONEST_CASES:
        assert aggregator.accept(_contribution(site, key), fl_ctx), site


# --- the honest round ----------------------------------------------------------------------------


def test_three_honest_sites_give_the_encrypted_case_weighted_mean(fl_ctx, keys):
    client, _ = keys
    aggregator = _aggregator()
    cases = {"site-b": 10, "site-c": 30, "site-d": 60}
    for site, n in cases.items():
        assert aggregator.accept(_contribution(site, client, cases=n), fl_ctx)
    result = aggregator.aggregate(fl_ctx)
    _assert_mean(result, client, cases)
    dxo = from_shareable(result)
    assert dxo.meta[HE_PROCESSED_KEYS] == {name: True for name in GLOBAL}
    assert dxo.meta[HE_ALGORITHM] == "CKKS"
    assert dxo.meta[NUM_STEPS] == 100.0
    record = dxo.meta[AGGREGATION]
    assert record["accepted"] == ["site-b", "site-c", "site-d"]
    assert record["rejected"] == {}
    assert record["estimator"] == "weighted_mean" and record["weighting"] == f"by {NUM_TRAIN_CASES}"
    assert "empty_because" not in record


def test_equally_weighted_sites_give_the_plain_mean(fl_ctx, keys):
    client, _ = keys
    aggregator = _aggregator()
    for site in ("site-b", "site-c"):
        assert aggregator.accept(_contribution(site, client, cases=0, weighted_by="equal"), fl_ctx)
    result = aggregator.aggregate(fl_ctx)
    _assert_mean(result, client, {"site-b": 1, "site-c": 1})
    assert from_shareable(result).meta[AGGREGATION]["weighting"] == "equal"


def test_a_contribution_over_the_wire_is_accepted(fl_ctx, keys):
    # FOBS serialization, as between a FLARE client and the server (ciphertexts travel as bytes)
    from nvflare.app_common.decomposers import common_decomposers
    from nvflare.fuel.utils import fobs

    common_decomposers.register()
    client, _ = keys
    aggregator = _aggregator()
    for site in HONEST_CASES:
        received = fobs.loads(fobs.dumps(_contribution(site, client)))
        assert aggregator.accept(received, fl_ctx)
    _assert_mean(aggregator.aggregate(fl_ctx), client, HONEST_CASES)


# --- hostile contributions -----------------------------------------------------------------------


def _honest_a(key, **kwargs):
    return _encrypted("site-a", key, **kwargs)


def _meta_changed(change):
    def build(key):
        data, meta = _honest_a(key)
        meta = dict(meta)
        change(meta)
        return _shareable(data, meta)

    return build


def _record_changed(**fields):
    def change(meta):
        meta[ENCRYPTION] = {**meta[ENCRYPTION], **fields}

    return _meta_changed(change)


def _data_changed(change):
    def build(key):
        data, meta = _honest_a(key)
        data = dict(data)
        change(data)
        return _shareable(data, meta)

    return build


def _other_parameters(num_values: int) -> bytes:
    small = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=4096, coeff_mod_bit_sizes=[40, 20, 40])
    small.global_scale = 2**20
    return ts.ckks_vector(small, np.zeros(num_values)).serialize()


def _swap(data):
    data["conv.bias"], data["conv.weight"] = data["conv.weight"], data["conv.bias"]


def _plaintext(key):
    return _shareable(UPDATES["site-a"], {NUM_TRAIN_CASES: 20})


def _with(**kwargs):
    def build(key):
        data, meta = _honest_a(key)
        return _shareable(data, meta, **kwargs)

    return build


def _error_reply(key):
    s = _with()(key)
    s.set_return_code(ReturnCode.EXECUTION_EXCEPTION)
    return s


def _no_dxo():
    s = Shareable()
    s.set_peer_props({ReservedKey.IDENTITY_NAME: "site-a"})
    s.add_cookie(AppConstants.CONTRIBUTION_ROUND, ROUND)
    return s


def _weighted_by_steps(key):
    data, meta = _honest_a(key, weighted_by=NUM_STEPS, weight=5.0, cases=0)
    return _shareable(data, {**meta, NUM_STEPS: 5})


HOSTILE = {
    # (builds site-a's shareable from the client key, the site listed as rejected, the reason)
    "plaintext-numpy-data": (_plaintext, "site-a", r"not encrypted \(no CKKS record\)"),
    "processed-algorithm-missing": (_meta_changed(lambda m: m.pop(HE_ALGORITHM)), "site-a", "not encrypted"),
    "processed-algorithm-other": (_meta_changed(lambda m: m.__setitem__(HE_ALGORITHM, "BFV")), "site-a", "not encrypted"),
    "encryption-record-missing": (_meta_changed(lambda m: m.pop(ENCRYPTION)), "site-a", "not encrypted"),
    "encryption-record-not-a-mapping": (_meta_changed(lambda m: m.__setitem__(ENCRYPTION, "CKKS")), "site-a", "not encrypted"),
    "processed-keys-missing": (_meta_changed(lambda m: m.pop(HE_PROCESSED_KEYS)), "site-a", "PROCESSED_KEYS does not mark"),
    "processed-keys-missing-one-name": (
        _meta_changed(lambda m: m.__setitem__(HE_PROCESSED_KEYS, {"conv.weight": True, "conv.bias": True})), "site-a",
        "PROCESSED_KEYS does not mark"),
    "processed-keys-one-false": (
        _meta_changed(lambda m: m.__setitem__(HE_PROCESSED_KEYS, {**m[HE_PROCESSED_KEYS], "conv.bias": False})), "site-a",
        "PROCESSED_KEYS does not mark"),
    "processed-keys-truthy-not-true": (
        _meta_changed(lambda m: m.__setitem__(HE_PROCESSED_KEYS, {**m[HE_PROCESSED_KEYS], "conv.bias": 1})), "site-a",
        "PROCESSED_KEYS does not mark"),
    "missing-parameter-name": (_data_changed(lambda d: d.pop("conv.bias")), "site-a", r"missing \['conv.bias'\]"),
    "extra-parameter-name": (_data_changed(lambda d: d.__setitem__("head.bias", d["conv.bias"])), "site-a", r"unexpected \['head.bias'\]"),
    "garbage-bytes": (_data_changed(lambda d: d.__setitem__("conv.bias", np.random.default_rng(0).bytes(4000))), "site-a",
                      "'conv.bias' is not a CKKS vector"),
    "plaintext-array-among-ciphertexts": (_data_changed(lambda d: d.__setitem__("conv.bias", np.zeros(4, np.float32))), "site-a",
                                          "'conv.bias' is ndarray, not a serialized CKKS vector"),
    "too-many-bytes": (_data_changed(lambda d: d.__setitem__("conv.bias", d["conv.bias"] + bytes(400_000))), "site-a",
                       "'conv.bias' is .* bytes; a CKKS vector of 4 values takes at most"),
    "wrong-size-ciphertext": (_data_changed(_swap), "site-a", "'conv.weight' holds 4 values, the model's parameter has 12"),
    "other-ckks-parameters": (_data_changed(lambda d: d.__setitem__("conv.bias", _other_parameters(4))), "site-a",
                              "'conv.bias' is not a CKKS vector under the federation's parameters"),
    "record-norm-bound-above-the-job": (_record_changed(max_update_norm=41.0), "site-a", "norm bound of 41.0; this job requires one in \\(0, 40\\]"),
    "record-norm-bound-none": (_record_changed(max_update_norm=None), "site-a", "norm bound of None"),
    "record-norm-bound-bool": (_record_changed(max_update_norm=True), "site-a", "norm bound of True"),
    "record-norm-bound-zero": (_record_changed(max_update_norm=0.0), "site-a", "norm bound of 0.0"),
    "record-norm-bound-nan": (_record_changed(max_update_norm=float("nan")), "site-a", "norm bound of nan"),
    "record-norm-bound-str": (_record_changed(max_update_norm="40"), "site-a", "norm bound of '40'"),
    "weight-not-the-released-count": (lambda k: _shareable(*_honest_a(k, cases=20, weight=200.0)), "site-a",
                                      "multiplied by 200.0 but released num_train_cases = 20"),
    "weight-but-count-withheld": (_meta_changed(lambda m: m.pop(NUM_TRAIN_CASES)), "site-a", "weight num_train_cases=None"),
    "weight-above-max-weight": (lambda k: _shareable(*_honest_a(k, cases=2000)), "site-a", "exceeds max_weight 1000"),
    "equal-but-multiplied": (lambda k: _shareable(*_honest_a(k, cases=0, weighted_by="equal", weight=50.0)), "site-a",
                             "weighted equally but multiplied by 50.0, not 1"),
    "weighted-by-a-key-the-job-does-not-use": (_weighted_by_steps, "site-a", "weighted by 'NUM_STEPS_CURRENT_ROUND'; this job weights by 'num_train_cases'"),
    "weighted-by-unknown": (_record_changed(weighted_by="patients"), "site-a", "weighted by 'patients'"),
    "distributed-dp-weighted-by-cases": (lambda k: _shareable(*_honest_a(k, dp_sites=3)), "site-a", "distributed DP needs equal weights"),
    "distributed-dp-sites-not-an-int": (_record_changed(distributed_dp_sites="3"), "site-a", "distributed_dp_sites must be an int"),
    "wrong-round-cookie": (_with(round_number=ROUND + 1), "site-a", "it is for round 2, the current round is 1"),
    "round-cookie-missing": (_with(round_number=None), "site-a", "carries no round"),
    "round-cookie-bool": (_with(round_number=True), "site-a", r"its round True \(bool\) is not an int"),
    "non-ok-return-code": (_error_reply, "site-a", "return code EXECUTION_EXCEPTION"),
    "no-peer-identity": (_with(site=None), "?", "the peer has no identity name"),
    "empty-peer-identity": (_with(site=""), "?", "the peer has no identity name"),
    "weights-kind": (_with(kind=DataKind.WEIGHTS), "site-a", "data kind WEIGHTS, expected"),
    "metrics-kind": (lambda k: _shareable({"auc": 0.5}, {}, kind=DataKind.METRICS), "site-a", "data kind METRICS"),
    "not-a-dxo": (lambda k: _no_dxo(), "site-a", "not a DXO"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_contribution_is_rejected_and_the_honest_mean_is_unchanged(case, fl_ctx, keys):
    client, _ = keys
    build, listed, reason = HOSTILE[case]
    aggregator = _aggregator()
    assert aggregator.accept(build(client), fl_ctx) is False, f"GOT THROUGH: {case}"
    _accept_honest(aggregator, fl_ctx, client)
    result = aggregator.aggregate(fl_ctx)
    record = from_shareable(result).meta[AGGREGATION]
    assert record["accepted"] == ["site-b", "site-c"]
    assert list(record["rejected"]) == [listed]
    assert re.search(reason, record["rejected"][listed]), record["rejected"][listed]
    _assert_mean(result, client, HONEST_CASES)


def test_a_ciphertext_under_another_key_is_accepted_the_server_cannot_tell(fl_ctx, keys):
    # the documented limit of HE: without the key nobody at the server can tell whose key made a ciphertext
    client, _ = keys
    stranger = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40], encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    stranger.global_scale = 2**40
    aggregator = _aggregator()
    assert aggregator.accept(_shareable(*_encrypted("site-a", stranger)), fl_ctx)
    _accept_honest(aggregator, fl_ctx, client)
    result = aggregator.aggregate(fl_ctx)
    assert from_shareable(result).meta[AGGREGATION]["accepted"] == ["site-a", "site-b", "site-c"]
    mean, expected = _decrypted(result, client), _mean({"site-a": 20, **HONEST_CASES})
    assert not np.allclose(mean["conv.weight"], expected["conv.weight"], atol=1e-3)  # the sum is spoiled


def test_the_same_site_twice_is_rejected_the_second_time(fl_ctx, keys):
    client, _ = keys
    aggregator = _aggregator()
    _accept_honest(aggregator, fl_ctx, client)
    again = _shareable(*_encrypted("site-b", client, update=UPDATES["site-a"]), site="site-b")
    assert aggregator.accept(again, fl_ctx) is False
    result = aggregator.aggregate(fl_ctx)
    record = from_shareable(result).meta[AGGREGATION]
    assert record["accepted"] == ["site-b", "site-c"]
    assert "the same site already contributed" in record["rejected"]["site-b"]
    _assert_mean(result, client, HONEST_CASES)


def test_a_late_contribution_to_an_aggregated_round_is_rejected(fl_ctx, keys):
    client, _ = keys
    aggregator = _aggregator()
    _accept_honest(aggregator, fl_ctx, client)
    aggregator.aggregate(fl_ctx)
    assert aggregator.accept(_contribution("site-d", client), fl_ctx) is False
    record = from_shareable(aggregator.aggregate(fl_ctx)).meta[AGGREGATION]
    assert "round 1 was already aggregated" in record["rejected"]["site-d"]


def test_without_a_global_model_every_contribution_is_rejected(fl_ctx, keys):
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, None, private=True, sticky=True)
    aggregator = _aggregator()
    assert aggregator.accept(_contribution("site-b", keys[0]), fl_ctx) is False
    assert "no global model" in aggregator._rejected["site-b"]


# --- round-level refusals: the model is unchanged ----------------------------------------------


def _assert_empty(result: Shareable, reason: str) -> dict:
    dxo = from_shareable(result)
    assert dxo.data_kind == DataKind.WEIGHTS
    assert set(dxo.data) == set(GLOBAL)
    for name, value in GLOBAL.items():
        assert isinstance(dxo.data[name], np.ndarray)
        np.testing.assert_array_equal(dxo.data[name], value)
    assert dxo.meta[HE_PROCESSED_KEYS] == {name: False for name in GLOBAL}  # a plaintext model stays plaintext
    record = dxo.meta[AGGREGATION]
    assert reason in record["empty_because"], record["empty_because"]
    return record


def test_mixed_weightings_give_an_empty_round(fl_ctx, keys):
    client, _ = keys
    aggregator = _aggregator()
    assert aggregator.accept(_contribution("site-b", client, cases=0, weighted_by="equal"), fl_ctx)
    assert aggregator.accept(_contribution("site-c", client), fl_ctx)
    assert aggregator.accept(_contribution("site-d", client), fl_ctx)
    record = _assert_empty(aggregator.aggregate(fl_ctx), "the sites weighted differently")
    assert "site-b: equal" in record["empty_because"] and "site-c: num_train_cases" in record["empty_because"]
    assert record["accepted"] == ["site-b", "site-c", "site-d"]


def test_fewer_than_min_contributions_give_an_empty_round(fl_ctx, keys):
    client, _ = keys
    aggregator = _aggregator(min_contributions=3)
    _accept_honest(aggregator, fl_ctx, client)
    _assert_empty(aggregator.aggregate(fl_ctx), "2 contributions accepted; at least 3 are required (min_contributions 3")


def test_no_contribution_gives_an_empty_round(fl_ctx):
    _assert_empty(_aggregator().aggregate(fl_ctx), "0 contributions accepted; at least 1 are required")


def test_a_distributed_dp_sum_of_fewer_than_its_sites_is_not_aggregated(fl_ctx, keys):
    client, _ = keys
    aggregator = _aggregator()  # min_contributions 1: the contributions' own N decides
    for site in ("site-b", "site-c"):
        assert aggregator.accept(_contribution(site, client, cases=0, weighted_by="equal", dp_sites=3), fl_ctx)
    _assert_empty(aggregator.aggregate(fl_ctx), "at least 3 are required (min_contributions 1, distributed DP noise shares 3)")


def test_a_distributed_dp_sum_of_its_sites_is_aggregated_equally(fl_ctx, keys):
    client, _ = keys
    aggregator = _aggregator()
    for site in ("site-b", "site-c", "site-d"):
        assert aggregator.accept(_contribution(site, client, cases=0, weighted_by="equal", dp_sites=3), fl_ctx)
    _assert_mean(aggregator.aggregate(fl_ctx), client, {"site-b": 1, "site-c": 1, "site-d": 1})


def test_the_largest_distributed_dp_sites_of_a_round_decides(fl_ctx, keys):
    client, _ = keys
    aggregator = _aggregator()
    assert aggregator.accept(_contribution("site-b", client, cases=0, weighted_by="equal", dp_sites=2), fl_ctx)
    assert aggregator.accept(_contribution("site-c", client, cases=0, weighted_by="equal", dp_sites=3), fl_ctx)
    _assert_empty(aggregator.aggregate(fl_ctx), "distributed DP noise shares 3")


def test_an_empty_round_keeps_an_encrypted_global_model_encrypted(fl_ctx, keys):
    client, _ = keys
    encrypted_global = encrypt_update(GLOBAL, client)
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(encrypted_global, {}), private=True, sticky=True)
    dxo = from_shareable(_aggregator(min_contributions=2).aggregate(fl_ctx))
    assert dxo.data_kind == DataKind.WEIGHTS
    assert dxo.data == encrypted_global
    assert dxo.meta[HE_PROCESSED_KEYS] == {name: True for name in GLOBAL}


# --- later rounds: the global model is ciphertexts ----------------------------------------------


def _second_round(fl_ctx, global_model: dict):
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, ROUND + 1, private=True, sticky=True)
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(global_model, {}), private=True, sticky=True)


def _round_two(site, key, **kwargs):
    return _shareable(*_encrypted(site, key, **kwargs), site=site, round_number=ROUND + 1)


def test_a_second_round_on_an_encrypted_global_model_still_checks_sizes(fl_ctx, keys):
    client, server = keys
    aggregator = _aggregator()
    _accept_honest(aggregator, fl_ctx, client)
    aggregator.aggregate(fl_ctx)
    # as NVFlare's HEModelShareableGenerator leaves it: the model serialized, ciphertext bytes
    _second_round(fl_ctx, encrypt_update(GLOBAL, client))
    data, meta = _encrypted("site-a", client)
    _swap(data)
    assert aggregator.accept(_shareable(data, meta, round_number=ROUND + 1), fl_ctx) is False
    for site in HONEST_CASES:
        assert aggregator.accept(_round_two(site, client), fl_ctx)
    result = aggregator.aggregate(fl_ctx)
    assert "'conv.weight' holds 4 values" in from_shareable(result).meta[AGGREGATION]["rejected"]["site-a"]
    _assert_mean(result, client, HONEST_CASES)


@pytest.mark.parametrize("form", ["bytes", "ckks-vectors"])
def test_a_fresh_aggregator_reads_sizes_from_an_encrypted_global_model(form, fl_ctx, keys):
    client, server = keys
    encrypted = encrypt_update(GLOBAL, client)
    if form == "ckks-vectors":
        encrypted = {name: ts.ckks_vector_from(server, value) for name, value in encrypted.items()}
    _second_round(fl_ctx, encrypted)
    aggregator = _aggregator()  # a restarted server: no plaintext model seen
    data, meta = _encrypted("site-a", client)
    data["conv.bias"] = encrypt_update({"conv.bias": np.zeros(5)}, client)["conv.bias"]
    assert aggregator.accept(_shareable(data, meta, round_number=ROUND + 1), fl_ctx) is False
    for site in HONEST_CASES:
        assert aggregator.accept(_round_two(site, client), fl_ctx)
    result = aggregator.aggregate(fl_ctx)
    assert "'conv.bias' holds 5 values, the model's parameter has 4" in from_shareable(result).meta[AGGREGATION]["rejected"]["site-a"]
    _assert_mean(result, client, HONEST_CASES)


def test_a_new_round_resets_the_accepted_contributions(fl_ctx, keys):
    client, _ = keys
    aggregator = _aggregator()
    assert aggregator.accept(_contribution("site-d", client), fl_ctx)
    _second_round(fl_ctx, encrypt_update(GLOBAL, client))
    for site in HONEST_CASES:
        assert aggregator.accept(_round_two(site, client), fl_ctx)
    result = aggregator.aggregate(fl_ctx)
    assert from_shareable(result).meta[AGGREGATION]["accepted"] == ["site-b", "site-c"]
    _assert_mean(result, client, HONEST_CASES)


# --- the job's arguments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"max_update_norm": 0}, ValueError, r"max_update_norm must be in \(0.0, inf\)"),
        ({"max_update_norm": -1}, ValueError, "max_update_norm must be in"),
        ({"max_update_norm": float("nan")}, ValueError, "max_update_norm must be a finite"),
        ({"max_update_norm": "40"}, TypeError, "max_update_norm must be a real number"),
        ({"max_update_norm": True}, TypeError, "max_update_norm must be a real number"),
        ({"weight_meta_key": "x"}, ValueError, "weight_meta_key must be one of .* got 'x'"),
        ({"max_weight": 0}, ValueError, "max_weight must be in"),
        ({"max_weight": float("inf")}, ValueError, "max_weight must be a finite"),
        ({"max_weight": True}, TypeError, "max_weight must be a real number"),
        ({"min_contributions": 0}, ValueError, r"min_contributions must be an int in \[1, inf\], got 0"),
        ({"min_contributions": True}, TypeError, "min_contributions must be an int"),
        ({"min_contributions": 2.0}, TypeError, "min_contributions must be an int"),
        ({"fail_after_empty_rounds": 0}, ValueError, "fail_after_empty_rounds must be an int"),
        ({"fail_after_empty_rounds": "3"}, TypeError, "fail_after_empty_rounds must be an int"),
        ({"tenseal_context_file": ""}, TypeError, "tenseal_context_file must be a file name"),
        ({"tenseal_context_file": None}, TypeError, "tenseal_context_file must be a file name"),
    ],
    ids=["norm-zero", "norm-negative", "norm-nan", "norm-str", "norm-bool", "weight-key", "max-weight-zero",
         "max-weight-inf", "max-weight-bool", "min-zero", "min-bool", "min-float", "fail-after-zero", "fail-after-str",
         "context-empty", "context-none"],
)
def test_bad_arguments_are_refused_naming_the_argument(kwargs, error, message):
    args = dict(max_update_norm=NORM_BOUND)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        EncryptedSumAggregator(**args)


def test_arguments_are_stored_as_given():
    aggregator = EncryptedSumAggregator(max_update_norm=40, weight_meta_key=NUM_STEPS, max_weight=None, min_contributions=3,
                                        fail_after_empty_rounds=2, tenseal_context_file="ctx.tenseal")
    assert (aggregator.max_update_norm, aggregator.weight_meta_key, aggregator.max_weight, aggregator.min_contributions,
            aggregator.fail_after_empty_rounds, aggregator.tenseal_context_file) == (40.0, NUM_STEPS, None, 3, 2, "ctx.tenseal")


def _off_standard(kind: str, key, num_values: int) -> bytes:
    values = np.full(num_values, 0.01)
    if kind == "other-scale":
        return ts.ckks_vector(key, values, scale=2**30).serialize()
    return (ts.ckks_vector(key, values) * 1.0).serialize()  # "lower-level": multiplied and rescaled


@pytest.mark.parametrize("kind", ["other-scale", "lower-level"])
def test_a_ciphertext_that_cannot_be_added_is_rejected_and_the_round_aggregates(kind, fl_ctx, keys):
    client, _ = keys
    data, meta = _encrypted("site-a", client)
    data["conv.bias"] = _off_standard(kind, client, 4)
    aggregator = _aggregator()
    accepted = aggregator.accept(_shareable(data, meta), fl_ctx)
    _accept_honest(aggregator, fl_ctx, client)
    result = aggregator.aggregate(fl_ctx)  # raises ValueError today
    assert accepted is False
    _assert_mean(result, client, HONEST_CASES)
