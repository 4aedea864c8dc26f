"""Hostile contributions driven through accept()/aggregate() as NVFlare's ScatterAndGather does,
for every aggregator configured in a shipped job.

Each case mixes two honest sites (``site-b``, ``site-c``) with one hostile site (``site-a``,
which sorts first: a site-ordered aggregate must not take anything from it). In every case the
global result is the numpy aggregate of the honest contributions alone, in the global model's
dtype, and the hostile site is listed as rejected with the reason. Assertion messages starting
with ``GOT THROUGH`` mark a hostile contribution that reached the global model.

Benign oddities (a zero update, subnormals, -0.0, another float precision, big-endian bytes)
are accepted and aggregated like any honest update.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import json
import math
import os
import re

import numpy as np
import pytest
import torch

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.decomposers import common_decomposers
from nvflare.fuel.utils import fobs

from medflare.transport.sparse_update import encode_sparse
from medflare.wire_contract import AGGREGATION

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SERVER_CONFIGS = sorted(glob.glob(os.path.join(REPO, "jobs", "*", "app", "config", "config_fed_server.json")))
ROUND = 1  # so that a bool True round cookie would equal it

GLOBAL = {
    "conv.weight": np.zeros((4, 3), np.float32),
    "conv.bias": np.zeros(4, np.float32),
    "head.weight": np.zeros((1, 4), np.float32),
    "norm.scale": np.zeros((1,), np.float32),
    "bn.num_batches_tracked": np.array(0, np.int64),
}
FLOAT_KEYS = [k for k, v in GLOBAL.items() if v.dtype.kind == "f"]
HONEST_WEIGHTS = {"site-b": 10, "site-c": 30}


def _aggregator_configs():
    configs = {}
    for path in SERVER_CONFIGS:
        with open(path) as f:
            config = json.load(f)
        component = next(c for c in config["components"] if c["id"] == "aggregator")
        if component["path"].endswith("EncryptedSumAggregator"):
            continue  # the HE jobs' aggregator takes only ciphertexts: test_encrypted_aggregator.py
        configs[path.split(os.sep)[-4]] = component
    return configs


AGGREGATORS = _aggregator_configs()


def _build(component):
    module, _, name = component["path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**component["args"])


def _update(seed, scale=0.01):
    """An honest update: small floats (well inside every job's norm bound) and a step counter."""
    rng = np.random.default_rng(seed)
    update = {k: (scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in GLOBAL.items() if k in FLOAT_KEYS}
    update["bn.num_batches_tracked"] = np.array(5 + seed, np.int64)
    return update


def _ctx():
    ctx = FLContext()
    ctx.set_prop(AppConstants.CURRENT_ROUND, ROUND, private=True, sticky=True)
    ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(GLOBAL, {}), private=True, sticky=True)
    return ctx


def _shareable(site, data, weight_key, weight=10, round_number=ROUND, kind=DataKind.WEIGHT_DIFF, meta=None):
    m = {} if weight is _ABSENT else {weight_key: weight}
    m.update(meta or {})
    s = DXO(data_kind=kind, data=data, meta=m).to_shareable()
    if site is not None:
        s.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    if round_number is not _ABSENT:
        s.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_number)
    return s


_ABSENT = object()


def _over_the_wire(shareable, site):
    common_decomposers.register()
    received = fobs.loads(fobs.dumps(shareable))
    received.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    received.add_cookie(AppConstants.CONTRIBUTION_ROUND, ROUND)
    return received


def _honest(weight_key):
    return [("site-b", _update(1), HONEST_WEIGHTS["site-b"]), ("site-c", _update(2), HONEST_WEIGHTS["site-c"])]


def _reference(contributions, estimator):
    """The numpy aggregate, in float64, of ``[(update, weight)]`` cast to the model's dtypes."""
    out = {}
    for key, model in GLOBAL.items():
        stack = np.stack([np.asarray(u[key]).astype(model.dtype).astype(np.float64) for u, _ in contributions])
        w = np.array([float(w) for _, w in contributions], np.float64)
        if estimator == "median" and model.dtype.kind == "f":
            value = np.median(stack, axis=0)
        elif estimator in ("weighted_mean", "sharer_mean") or model.dtype.kind != "f":
            value = np.tensordot(w / w.sum(), stack, axes=1)
        else:
            raise NotImplementedError(estimator)
        out[key] = np.rint(value) if model.dtype.kind != "f" else value
    return out


# --- the hostile cases: job args -> ([(shareable, sent_before_honest)], site listed, reason) ---


def _with(site_update_changes):
    base = _update(3)
    base.update(site_update_changes)
    return base


def _bigger_than(limit, default):
    return default if limit is None else 2 * limit


def _sparse_good():
    data = _update(3)
    mask = {k: np.asarray(np.abs(v) >= np.quantile(np.abs(v), 0.5) if v.dtype.kind == "f" else v != 0) for k, v in data.items()}
    return encode_sparse(data, mask)


def _sparse_indices(indices):
    """The good payload with ``conv.weight`` sent as the given flat indices (values 0.01)."""
    encoded = _sparse_good()
    indices = np.asarray(indices, np.uint8)
    encoded["conv.weight"] = dataclasses.replace(
        encoded["conv.weight"], encoding="indices", indices=indices, bitmask=None,
        values=np.full(indices.size, 0.01, np.float32))
    return encoded


def _sparse_broken(**changes):
    encoded = _sparse_good()
    encoded["conv.weight"] = dataclasses.replace(encoded["conv.weight"], **changes)
    return encoded


def _hostile_cases():
    f = np.float32
    cases = {
        # values in the model's dtype
        "float64 1e300 for a float32 model": ({"conv.weight": np.full((4, 3), 1e300)}, "outside the range of the model's dtype float32"),
        "float64 -1e39 (just past float32)": ({"conv.bias": np.array([0, -1e39, 0, 0])}, "outside the range"),
        "inf in one entry": ({"conv.bias": np.array([0, np.inf, 0, 0], f)}, "NaN or infinite"),
        "NaN in one entry": ({"conv.weight": np.where(np.eye(4, 3) > 0, np.nan, 0).astype(f)}, "NaN or infinite"),
        "NaN in a float16 entry": ({"conv.bias": np.array([0, np.nan, 0, 0], np.float16)}, "NaN or infinite"),
        "inf in a float16 entry": ({"norm.scale": np.array([-np.inf], np.float16)}, "NaN or infinite"),
        # keys
        "missing key": ({"conv.bias": None}, r"missing keys \['conv.bias'\]"),
        "extra key": ({"head.bias": np.zeros(1, f)}, r"unexpected keys \['head.bias'\]"),
        "extra non-string key": ({7: np.zeros(1, f)}, r"unexpected keys \[7\]"),
        # shapes, including broadcastable ones
        "shape (3, 4) for (4, 3)": ({"conv.weight": np.zeros((3, 4), f)}, r"shape \(3, 4\), the model has \(4, 3\)"),
        "shape (n,) for (1, n)": ({"head.weight": np.zeros(4, f)}, r"shape \(4,\), the model has \(1, 4\)"),
        "shape (1, n) for (n,)": ({"conv.bias": np.zeros((1, 4), f)}, r"shape \(1, 4\), the model has \(4,\)"),
        "shape (1,) for (n,)": ({"conv.bias": np.zeros(1, f)}, r"shape \(1,\), the model has \(4,\)"),
        "scalar for (1,)": ({"norm.scale": np.array(0.5, f)}, r"shape \(\), the model has \(1,\)"),
        "(1,) for a scalar": ({"bn.num_batches_tracked": np.array([5], np.int64)}, r"shape \(1,\), the model has \(\)"),
        # dtypes and types
        "int entry for a float key": ({"conv.bias": np.zeros(4, np.int64)}, "dtype int64, the model has float32"),
        "bool entry for a float key": ({"conv.bias": np.zeros(4, bool)}, "dtype bool, the model has float32"),
        "complex entry for a float key": ({"conv.bias": np.zeros(4, np.complex64)}, "dtype complex64"),
        "float entry for an int key": ({"bn.num_batches_tracked": np.array(5.0, f)}, "dtype float32, the model has int64"),
        "int32 for an int64 key": ({"bn.num_batches_tracked": np.array(5, np.int32)}, "dtype int32, the model has int64"),
        "object array": ({"conv.bias": np.array([0.0, 1.0, "x", None], dtype=object)}, "dtype object"),
        "list instead of array": ({"conv.bias": [0.0, 0.0, 0.0, 0.0]}, "is list, not a numpy array"),
        "torch tensor": ({"conv.bias": torch.zeros(4)}, "is Tensor, not a numpy array"),
        "masked array hiding a NaN": ({"conv.bias": np.ma.masked_invalid(np.array([0, np.nan, 0, 0], f))}, "is MaskedArray"),
        "numpy scalar for a 0-d entry": ({"bn.num_batches_tracked": np.int64(5)}, "is int64, not a numpy array"),
    }
    built = {}
    for name, (changes, reason) in cases.items():

        def make(args, changes=changes):
            data = _update(3)
            for k, v in changes.items():
                if v is None:
                    data.pop(k)
                else:
                    data[k] = v
            return [(_shareable("site-a", data, _weight_key(args)), True)]

        built[name] = (make, "site-a", reason)

    def one(name, reason, site="site-a", before=True, **kwargs):
        def make(args):
            k = dict(kwargs)  # a copy: the same case is built for every job
            data = k.pop("data", _update(3))
            data = data(args) if callable(data) else data
            if callable(k.get("weight")):
                k["weight"] = k["weight"](args)
            return [(_shareable(site, data, _weight_key(args), **k), before)]

        built[name] = (make, site if isinstance(site, str) else "?", reason)

    # the round
    one("missing round cookie", "CONTRIBUTION_ROUND cookie is missing", round_number=_ABSENT)
    one("an old round", f"for round {ROUND - 1}, the current round is {ROUND}", round_number=ROUND - 1)
    one("a future round", f"for round {ROUND + 1}", round_number=ROUND + 1)
    one("round as str", r"round '1' \(str\) is not an int", round_number=str(ROUND))
    one("round as bool", r"round True \(bool\) is not an int", round_number=True)
    one("round as float", r"round 1.0 \(float\) is not an int", round_number=float(ROUND))
    one("round as a numpy array", r"is not an int", round_number=np.array(ROUND))
    # the weight
    for label, weight in (("0", 0), ("-1", -1), ("NaN", math.nan), ("inf", math.inf), ("True", True), ('"5"', "5"),
                          ("a numpy array", np.array(5.0)), ("a list", [5])):
        one(f"weight {label}", "not a positive number", weight=weight)
    one("weight 1e308", "exceeds max_weight", weight=1e308)
    one("weight above max_weight", "exceeds max_weight", weight=lambda args: _bigger_than(args.get("max_weight"), 1e15))
    # the norm and the payload
    one("huge-norm update", "exceeds max_update_norm",
        data=lambda args: {k: (v * 100 * _bigger_than(args.get("max_update_norm"), 1e6) if v.dtype.kind == "f" else v)
                           for k, v in _update(3).items()})
    one("empty dict", "non-empty mapping", data={})
    one("a list of arrays (an APP_DEFINED DXO)", "data kind APP_DEFINED", data=list(_update(3).values()), kind=DataKind.APP_DEFINED)
    one("DXO of kind WEIGHTS when WEIGHT_DIFF is expected", "data kind WEIGHTS", kind=DataKind.WEIGHTS)
    one("DXO of kind METRICS", "data kind METRICS", kind=DataKind.METRICS)
    one("peer identity missing", "no identity name", site=None)
    one("peer identity not a string", "no identity name", site=7)

    def two_huge(args):
        key = _weight_key(args)
        return [(_shareable("site-a", _update(3), key, weight=1e308), True),
                (_shareable("site-a2", _update(4), key, weight=1e308), True)]

    built["weight 1e308 twice"] = (two_huge, "site-a", "exceeds max_weight")

    def not_a_dxo(args):
        s = Shareable()
        s["weights"] = _update(3)
        s.set_peer_props({ReservedKey.IDENTITY_NAME: "site-a"})
        s.add_cookie(AppConstants.CONTRIBUTION_ROUND, ROUND)
        return [(s, True)]

    built["a shareable that is not a DXO"] = (not_a_dxo, "site-a", "not a DXO")

    def error_reply(args):
        s = _shareable("site-a", _update(3), _weight_key(args))
        s.set_return_code(ReturnCode.EXECUTION_EXCEPTION)
        return [(s, True)]

    built["return code not OK"] = (error_reply, "site-a", "return code EXECUTION_EXCEPTION")

    def twice(args):  # site-b again, after its honest contribution
        return [(_shareable("site-b", {k: v * 50 for k, v in _update(3).items()}, _weight_key(args)), False)]

    built["the same site twice"] = (twice, "site-b", "already contributed")

    # sparse payloads, through NVFlare's serializer as a site sends them
    sparse = {
        "sparse: a tensor of another shape": (lambda: _sparse_broken(shape=(2, 6)), r"malformed sparse payload.*shape"),
        "sparse: an index out of range": (lambda: _sparse_indices([1, 12]), r"malformed sparse payload.*out of range"),
        "sparse: unsorted indices": (lambda: _sparse_indices([5, 2]), r"malformed sparse payload.*strictly increasing"),
        "sparse: a duplicate index": (lambda: _sparse_indices([2, 2]), r"malformed sparse payload.*strictly increasing"),
        "sparse: more values than indices": (
            lambda: _sparse_broken(values=np.zeros(13, np.float32)), r"malformed sparse payload"),
        "sparse: a NaN value": (
            lambda: _sparse_broken(values=np.full_like(_sparse_good()["conv.weight"].values, np.nan)), "NaN or infinite"),
        "sparse and dense mixed": (lambda: {**_sparse_good(), "conv.bias": np.zeros(4, f)}, "mixes sparse and dense"),
        "sparse: a key the model lacks": (lambda: {**_sparse_good(), "extra": _sparse_good()["conv.bias"]}, "malformed sparse payload"),
    }
    for name, (payload, reason) in sparse.items():

        def make(args, payload=payload):
            s = _shareable("site-a", payload(), _weight_key(args))
            return [(_over_the_wire(s, "site-a"), True)]

        built[name] = (make, "site-a", reason)
    return built


def _weight_key(args):
    from medflare.wire_contract import NUM_STEPS

    return args.get("weight_meta_key", NUM_STEPS)


HOSTILE = _hostile_cases()


def _run(job, hostile_before: bool, hostile):
    component = AGGREGATORS[job]
    args = component["args"]
    agg, ctx = _build(component), _ctx()
    key = _weight_key(args)
    honest = _honest(key)
    events = hostile(args)
    accepted_hostile = []
    order = [e for e in events if e[1] and hostile_before]
    for site, update, weight in honest[:1]:
        assert agg.accept(_shareable(site, update, key, weight), ctx)
    order += [e for e in events if not (e[1] and hostile_before)]
    for shareable, _ in order:
        accepted_hostile.append(agg.accept(shareable, ctx))
    for site, update, weight in honest[1:]:
        assert agg.accept(_shareable(site, update, key, weight), ctx)
    result = from_shareable(agg.aggregate(ctx))
    return args, honest, accepted_hostile, result


def _assert_is_the_honest_aggregate(result, honest, estimator, included=()):
    expected = _reference([(u, w) for _, u, w in honest] + list(included), estimator)
    for key, model in GLOBAL.items():
        got = result.data[key]
        assert got.dtype == model.dtype, f"GOT THROUGH: {key} is {got.dtype}, the model is {model.dtype}"
        assert np.all(np.isfinite(got)), f"GOT THROUGH: {key} is not finite: {got}"
        np.testing.assert_allclose(got, expected[key], rtol=1e-6, atol=1e-9, err_msg="GOT THROUGH: the global update moved")


@pytest.mark.parametrize("hostile_first", [True, False], ids=["hostile-first", "hostile-between"])
@pytest.mark.parametrize("case", list(HOSTILE))
@pytest.mark.parametrize("job", list(AGGREGATORS))
def test_a_hostile_contribution_changes_nothing(job, case, hostile_first):
    make, listed, reason = HOSTILE[case]
    args, honest, accepted, result = _run(job, hostile_first, make)
    assert not any(accepted), f"GOT THROUGH: accepted {accepted}"
    _assert_is_the_honest_aggregate(result, honest, args.get("estimator", "weighted_mean"))
    info = result.get_meta_prop(AGGREGATION)
    assert info["accepted"] == ["site-b", "site-c"]
    assert listed in info["rejected"], info["rejected"]
    assert re.search(reason, info["rejected"][listed]), info["rejected"][listed]


def _benign_cases():
    def f(dtype, values=None):
        def make():
            base = _update(3)
            return {k: (v.astype(dtype) if v.dtype.kind == "f" else v) for k, v in base.items()}
        return make

    def subnormal():
        base = _update(3)
        base["conv.bias"] = np.array([1e-45, -1e-44, 1e-40, 0], np.float32)  # float32 subnormals
        base["norm.scale"] = np.array([1e-300])  # float64, underflows to 0 in float32
        return base

    def negative_zero():
        return {k: (np.full(v.shape, -0.0, v.dtype) if v.dtype.kind == "f" else v) for k, v in _update(3).items()}

    def zero():
        return {k: np.zeros_like(v) for k, v in _update(3).items()}

    def big_endian():
        return {k: (v.astype(">f4") if v.dtype.kind == "f" else v) for k, v in _update(3).items()}

    def read_only_strided():
        out = {}
        for k, v in _update(3).items():
            if v.ndim == 2:
                v = np.asfortranarray(v)
            v.setflags(write=False)
            out[k] = v
        return out

    return {
        "a float64 site sorting first": f(np.float64),
        "a float16 site sorting first": f(np.float16),
        "subnormal and underflowing values": subnormal,
        "negative zero": negative_zero,
        "a zero update": zero,
        "big-endian float32": big_endian,
        "read-only, Fortran-ordered arrays": read_only_strided,
    }


BENIGN = _benign_cases()


@pytest.mark.parametrize("case", list(BENIGN))
@pytest.mark.parametrize("job", list(AGGREGATORS))
def test_a_benign_oddity_is_aggregated_like_any_update(job, case):
    data = BENIGN[case]()

    def make(args):
        return [(_shareable("site-a", data, _weight_key(args), weight=20), True)]

    args, honest, accepted, result = _run(job, True, make)
    assert accepted == [True], result.get_meta_prop(AGGREGATION)["rejected"]
    _assert_is_the_honest_aggregate(result, honest, args.get("estimator", "weighted_mean"), included=[(data, 20)])
    assert result.get_meta_prop(AGGREGATION)["accepted"] == ["site-a", "site-b", "site-c"]


@pytest.mark.parametrize("job", list(AGGREGATORS))
def test_a_contribution_after_aggregate_is_refused(job, caplog):
    component = AGGREGATORS[job]
    agg, ctx = _build(component), _ctx()
    key = _weight_key(component["args"])
    for site, update, weight in _honest(key):
        assert agg.accept(_shareable(site, update, key, weight), ctx)
    first = from_shareable(agg.aggregate(ctx))
    _assert_is_the_honest_aggregate(first, _honest(key), component["args"].get("estimator", "weighted_mean"))
    assert not agg.accept(_shareable("site-a", _update(3), key), ctx), "GOT THROUGH: accepted after aggregate()"
    assert f"site-a in round {ROUND}: round {ROUND} was already aggregated" in caplog.text
    agg.reset(ctx)  # ScatterAndGather's end of round
    late = from_shareable(agg.aggregate(ctx))
    assert late.get_meta_prop(AGGREGATION)["accepted"] == [], "GOT THROUGH: a late contribution was aggregated"


def test_every_shipped_job_bounds_the_norm_and_the_weight_and_tolerates_withheld_weights():
    for job, component in AGGREGATORS.items():
        args = component["args"]
        assert args.get("max_update_norm"), f"{job} does not bound the update norm"
        assert args.get("max_weight"), f"{job} does not cap the weight"
        assert args.get("equal_weights_when_withheld") is True, job


def test_the_cases_are_counted():
    # the report quotes these numbers; a case added or removed shows here
    assert len(HOSTILE) >= 50 and len(BENIGN) == 7
