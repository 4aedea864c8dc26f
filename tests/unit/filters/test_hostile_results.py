"""Hostile task results against every result-filter configuration medflare ships.

Each configuration (every scope of every site profile in ``site_configs/``, every job's
``task_result_filters`` in ``jobs/``) is built from its JSON and driven through NVFlare's own
``Filter.process()`` the way the FLARE client runs a chain of result filters. A hostile executor
(or a buggy one) tries every route out of the site it has: the data, the DXO's meta, the
headers, keys beside the DXO, fields inside the DXO, passthrough kinds and error replies. The
filters must either refuse (``UnsafeUpdateError``, so NVFlare sends nothing) or release a result
in which nothing undeclared or unfiltered remains.
"""

from __future__ import annotations

import importlib
import json
import pathlib

import numpy as np
import pytest
import torch

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_reply
from nvflare.apis.workspace import Workspace
from nvflare.app_common.app_constant import AppConstants

from medflare.privacy.site_budget import SITE_BUDGET_FILE_NAME
from medflare.privacy.update_checks import UnsafeUpdateError
from medflare.transport.sparse_update import SparseTensor, decode_sparse
from medflare.transport.ckks_update import decrypt_update
from medflare.wire_contract import DATA_DEPENDENT_META, RESULT_HEADERS, RESULT_META
from tests.he_keys import contexts, install_contexts

ROOT = pathlib.Path(__file__).resolve().parents[3]


def _configurations() -> dict[str, list[dict]]:
    """name -> the chain of filter specs (path, args) exactly as shipped."""
    found = {}
    for policy in sorted(ROOT.glob("site_configs/*/privacy.json")):
        for scope in json.loads(policy.read_text())["scopes"]:
            if scope.get("task_result_filters"):
                found[f"{policy.parent.name}:{scope['name']}"] = scope["task_result_filters"]
    for client in sorted(ROOT.glob("jobs/*/app/config/config_fed_client.json")):
        for entry in json.loads(client.read_text()).get("task_result_filters", []):
            if entry.get("filters"):
                found[f"job:{client.parents[2].name}"] = entry["filters"]
    return found


CONFIGURATIONS = _configurations()


def test_the_shipped_configurations_are_all_here():
    # a new profile scope or job filter joins this suite by itself; this guards the glob
    assert {"research:partial_sharing", "research:differential_privacy", "research:dp_sgd", "clinical:clinical",
            "clinical:clinical_sparse", "clinical:dp_sgd"} <= set(CONFIGURATIONS)
    assert any(name.startswith("job:") for name in CONFIGURATIONS)


def _build(spec: dict):
    module, _, cls = spec["path"].rpartition(".")
    return getattr(importlib.import_module(module), cls)(**spec.get("args", {}))


@pytest.fixture()
def fl_ctx(tmp_path):
    (tmp_path / "startup").mkdir()
    (tmp_path / "local").mkdir()
    # the site's own lifetime cap, as a site profile installs it
    (tmp_path / "local" / SITE_BUDGET_FILE_NAME).write_text(json.dumps({"max_epsilon": 100.0, "delta": 1e-5, "accountant": "rdp"}))
    ctx = FLContext()
    ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, Workspace(str(tmp_path), "site-1"), private=True, sticky=True)
    install_contexts(str(tmp_path / "startup"), ctx)  # the CKKS keys of a kit provisioned with HE
    return ctx


def _chain(name: str):
    filters = [_build(spec) for spec in CONFIGURATIONS[name]]

    def run(shareable, fl_ctx):
        for f in filters:
            shareable = f.process(shareable, fl_ctx)
        return shareable

    return run


def _update(dtype=np.float32):
    rng = np.random.default_rng(0)
    return {
        "conv.weight": (rng.standard_normal((8, 4)) * 0.01).astype(dtype),
        "conv.bias": (rng.standard_normal(8) * 0.01).astype(dtype),
        "layer.step_count": np.array(3, np.int64),  # a non-floating buffer: withheld by every filter
    }


#: a DP-SGD record stronger than any shipped scope requires, so that DP-SGD scopes release the honest result
DP_SGD_RECORD = {"mechanism": "dp_sgd", "neighbouring_relation": "add/remove one patient", "noise_multiplier": 5.0,
                 "max_grad_norm": 0.5, "sample_rate": 0.01, "steps": 10, "secure_noise": True}


def _meta():
    return {
        "medflare_dp_sgd": dict(DP_SGD_RECORD),
        MetaKey.NUM_STEPS_CURRENT_ROUND: 12,
        "num_train_cases": 24,
        "train_loss": 0.42,
        "train_seconds": 1.5,
        "validate_seconds": 0.5,
        MetaKey.INITIAL_METRICS: {"dice_mean": 0.5, "num_cases": 3},
    }


def _honest(data=None, meta=None, kind=DataKind.WEIGHT_DIFF, round_number=1) -> Shareable:
    result = DXO(data_kind=kind, data=_update() if data is None else data, meta=_meta() if meta is None else meta).to_shareable()
    result.set_header(AppConstants.CURRENT_ROUND, round_number)
    return result


def _released_arrays(dxo: DXO) -> dict:
    """The released data as arrays: sparse entries restored, ciphertexts decrypted with a
    site's key (to the shapes and dtypes of :func:`_update`, as the executor loads them)."""
    if any(isinstance(v, SparseTensor) for v in dxo.data.values()):
        return decode_sparse(dxo.data)
    if dxo.data and all(isinstance(v, bytes) for v in dxo.data.values()):
        like = _update()
        flat = decrypt_update(dxo.data, contexts()[0])
        return {
            k: (np.rint(v) if like[k].dtype.kind != "f" else v).astype(like[k].dtype).reshape(like[k].shape)
            for k, v in flat.items()
        }
    return dxo.data


def _assert_clean(out: Shareable):
    """Nothing in a released result is undeclared; every array is finite numpy."""
    assert set(out) <= {ReservedHeaderKey.HEADERS, "DXO"}, set(out)
    assert set(out[ReservedHeaderKey.HEADERS]) <= set(RESULT_HEADERS), out[ReservedHeaderKey.HEADERS]
    dxo = from_shareable(out)
    assert set(out["DXO"]) <= {"kind", "data", "meta"}
    assert set(dxo.meta) <= set(RESULT_META), dxo.meta
    for v in dxo.meta.values():
        assert not isinstance(v, (np.ndarray, torch.Tensor))
    if dxo.data_kind == DataKind.WEIGHT_DIFF:
        for key, value in _released_arrays(dxo).items():
            assert isinstance(value, np.ndarray), key
            if value.dtype.kind == "f":
                assert np.isfinite(value).all(), key
    return dxo


# --- the honest result passes every configuration ----------------------------------------------


@pytest.mark.parametrize("config", CONFIGURATIONS)
def test_an_honest_update_is_released_clean(config, fl_ctx):
    dxo = _assert_clean(_chain(config)(_honest(), fl_ctx))
    assert dxo.data_kind == DataKind.WEIGHT_DIFF
    assert not _released_arrays(dxo)["layer.step_count"].any()  # counters are withheld
    if not any("PatientDPSGDFilter" in spec["path"] for spec in CONFIGURATIONS[config]):
        # the filter changed the update (DP-SGD's noise is the executor's, checked by its record)
        assert not np.array_equal(_released_arrays(dxo)["conv.weight"], _update()["conv.weight"])


@pytest.mark.parametrize("config", CONFIGURATIONS)
def test_honest_validation_metrics_pass_as_numbers(config, fl_ctx):
    metrics = DXO(data_kind=DataKind.METRICS, data={"dice_mean": 0.5, "auc": float("nan"), "num_cases": 3}).to_shareable()
    dxo = _assert_clean(_chain(config)(metrics, fl_ctx))
    assert dxo.data["num_cases"] == 3 and dxo.data["dice_mean"] == 0.5 and np.isnan(dxo.data["auc"])


@pytest.mark.parametrize("config", CONFIGURATIONS)
@pytest.mark.parametrize(
    "make",
    [
        lambda: {k: torch.from_numpy(v) for k, v in _update().items()},
        lambda: {k: torch.from_numpy(v).to(torch.bfloat16) if v.dtype.kind == "f" else torch.from_numpy(v) for k, v in _update().items()},
        lambda: {k: torch.from_numpy(v).half() if v.dtype.kind == "f" else torch.from_numpy(v) for k, v in _update().items()},
        lambda: _update(np.float16),
        lambda: _update(np.float64),
        lambda: {k: torch.from_numpy(v).requires_grad_(v.dtype.kind == "f") for k, v in _update().items()},
    ],
    ids=["torch-float32", "torch-bfloat16", "torch-float16", "numpy-float16", "numpy-float64", "torch-requires-grad"],
)
def test_valid_updates_of_every_precision_are_filtered_not_refused(config, make, fl_ctx):
    dxo = _assert_clean(_chain(config)(_honest(make()), fl_ctx))
    arrays = _released_arrays(dxo)
    assert set(arrays) == set(_update())
    assert arrays["conv.weight"].shape == (8, 4)


# --- what the server learns of the site: data-dependent meta under each scope -----------------


@pytest.mark.parametrize("config", CONFIGURATIONS)
def test_data_dependent_meta_leaves_only_where_the_scope_allows_it(config, fl_ctx):
    dxo = _assert_clean(_chain(config)(_honest(), fl_ctx))
    dp = any(name in spec["path"] for spec in CONFIGURATIONS[config] for name in ("GaussianPrivacyFilter", "PatientDPSGDFilter"))
    released = {k for k in DATA_DEPENDENT_META if k in dxo.meta}
    if dp:
        assert released == set(), f"{config} is a DP configuration yet released {released}"
    else:
        assert released == set(DATA_DEPENDENT_META)


def test_a_site_admin_names_what_may_leave(fl_ctx):
    from medflare.filters.gaussian_privacy import GaussianPrivacyFilter
    from medflare.filters.percentile_sharing import PercentileSharingFilter

    g = GaussianPrivacyFilter(clipping_norm=1.0, noise_multiplier=2.0, max_epsilon=20.0, noise_seed=0,
                              release_meta=["NUM_STEPS_CURRENT_ROUND"])
    assert set(from_shareable(g.process(_honest(), fl_ctx)).meta) & set(DATA_DEPENDENT_META) == {"NUM_STEPS_CURRENT_ROUND"}
    p = PercentileSharingFilter(fraction_shared=0.5, gamma=None, release_meta=[])
    assert not set(from_shareable(p.process(_honest(), fl_ctx)).meta) & set(DATA_DEPENDENT_META)


@pytest.mark.parametrize(
    "release_meta, error, match",
    [
        (["num_train_case"], ValueError, "did you mean 'num_train_cases'"),
        (["medflare_gaussian_dp"], ValueError, "data-dependent keys"),
        ("train_loss", TypeError, "list of meta key names"),
        ([3], TypeError, "list of meta key names"),
    ],
)
def test_a_bad_release_meta_is_refused_when_the_job_is_built(release_meta, error, match):
    from medflare.filters.percentile_sharing import PercentileSharingFilter

    with pytest.raises(error, match=match):
        PercentileSharingFilter(fraction_shared=0.5, gamma=None, release_meta=release_meta)


# --- hostile results: every one refused by every configuration --------------------------------


def _with(mutate):
    def make():
        result = _honest()
        mutate(result)
        return result

    return make


def _meta_with(**extra):
    meta = _meta()
    meta.update(extra)
    return lambda: _honest(meta=meta)


def _dxo_field(result):
    result["DXO"]["extra"] = np.ones(4)


HOSTILE = {
    # routes beside the data
    "extra-key-beside-the-dxo": _with(lambda r: r.__setitem__("weights_copy", _update())),
    "undeclared-header-array": _with(lambda r: r.set_header("debug", np.ones(4))),
    "undeclared-header-string": _with(lambda r: r.set_header("note", "patient 17 has a tumour")),
    "peer-props-from-the-executor": _with(lambda r: r.set_header(ReservedHeaderKey.PEER_PROPS, {"x": np.ones(4)})),
    "cookie-jar-from-the-executor": _with(lambda r: r.set_header(ReservedHeaderKey.COOKIE_JAR, {"x": np.ones(4)})),
    "round-header-as-array": _with(lambda r: r.set_header(AppConstants.CURRENT_ROUND, np.ones(4))),
    "round-header-as-string": _with(lambda r: r.set_header(AppConstants.CURRENT_ROUND, "0x3f")),
    "return-code-as-data": _with(lambda r: r.set_header(ReservedHeaderKey.RC, "c2VjcmV0IGRhdGE=")),
    "content-type-not-dxo": _with(lambda r: r.set_header(ReservedHeaderKey.CONTENT_TYPE, "BYTES")),
    "headers-not-a-mapping": _with(lambda r: r.__setitem__(ReservedHeaderKey.HEADERS, [1, 2])),
    "field-inside-the-dxo": _with(_dxo_field),
    "undeclared-meta-array": _meta_with(update_copy=np.ones(4)),
    "undeclared-meta-number": _meta_with(site_secret=3.0),
    "declared-meta-holding-an-array": _meta_with(train_loss=np.ones(4)),
    "declared-meta-holding-a-tensor": _meta_with(train_loss=torch.ones(4)),
    "declared-meta-holding-a-0d-array": _meta_with(train_loss=np.array(0.4)),
    "cases-as-string": _meta_with(num_train_cases="24"),
    "cases-negative": _meta_with(num_train_cases=-1),
    "cases-as-bool": _meta_with(num_train_cases=True),
    "steps-as-float": _meta_with(NUM_STEPS_CURRENT_ROUND=12.5),
    "loss-infinite": _meta_with(train_loss=float("inf")),
    "metrics-holding-an-array": _meta_with(initial_metrics={"dice_mean": np.ones(4)}),
    "metrics-holding-a-list": _meta_with(initial_metrics={"dice_mean": [0.1, 0.2]}),
    "metrics-nested": _meta_with(initial_metrics={"per_case": {"a": 0.1}}),
    "metrics-too-many": _meta_with(initial_metrics={f"m{i}": float(i) for i in range(200)}),
    "metrics-long-key": _meta_with(initial_metrics={"x" * 500: 0.1}),
    "filters-applied-long-string": _meta_with(medflare_filters_applied=[{"filter": "A" * 5000, "source": "site"}]),
    "filters-applied-extra-field": _meta_with(medflare_filters_applied=[{"filter": "F", "source": "site", "x": 1}]),
    "filter-history-with-payload": _meta_with(filter_history=["ok", "not an identifier: 0.13 0.77"]),
    "forged-privacy-record-with-array": _meta_with(medflare_gaussian_dp={"noise_multiplier": np.ones(4)}),
    "forged-sharing-record-extra-field": _meta_with(
        medflare_percentile_sharing={"fraction_shared": 0.1, "gamma": 0.1, "num_shared": 1, "num_total": 2, "sparse": False, "leak": 1.0}
    ),
    "server-only-meta-key": _meta_with(medflare_aggregation={"accepted": []}),
    # the data itself
    "nan-entry": lambda: _honest({"w": np.array([1.0, np.nan], np.float32)}),
    "inf-entry": lambda: _honest({"w": np.array([np.inf, 0.0], np.float32)}),
    "nan-in-float16": lambda: _honest({"w": np.array([np.nan], np.float16)}),
    "nan-in-bfloat16": lambda: _honest({"w": torch.tensor([float("nan"), 1.0], dtype=torch.bfloat16)}),
    "empty-update": lambda: _honest({}),
    "scalar-entry": lambda: _honest({"w": 2.5}),
    "list-entry": lambda: _honest({"w": [0.1, 0.2]}),
    "object-array": lambda: _honest({"w": np.array([0.1, "x"], dtype=object)}),
    "string-array": lambda: _honest({"w": np.array(["a", "b"])}),
    "complex-array": lambda: _honest({"w": np.ones(3, np.complex64)}),
    "nested-mapping-entry": lambda: _honest({"w": {"inner": np.ones(3)}}),
    "non-string-key": lambda: _honest({3: np.ones(3, np.float32)}),
    "no-float-entry": lambda: _honest({"n": np.array([1, 2], np.int64)}),
    "sparse-torch-tensor": lambda: _honest({"w": torch.eye(3).to_sparse()}),
    "nan-behind-a-mask": lambda: _honest({"w": np.ma.masked_invalid(np.array([np.nan, 1.0], np.float32))}),
    "kind-lowercase": _with(lambda r: r["DXO"].__setitem__("kind", "weight_diff")),
    "kind-not-a-string": _with(lambda r: r["DXO"].__setitem__("kind", 7)),
    "meta-key-not-a-string": lambda: _honest(meta={**_meta(), 3: 1.0}),
    "data-not-a-mapping": _with(lambda r: r["DXO"].__setitem__("data", np.ones(4))),
    "meta-not-a-mapping": _with(lambda r: r["DXO"].__setitem__("meta", [np.ones(4)])),
    # kinds
    "full-weights": lambda: _honest(kind=DataKind.WEIGHTS, meta={k: v for k, v in _meta().items() if k != "medflare_dp_sgd"}),
    "dp-sgd-record-malformed": lambda: _honest(meta={"medflare_dp_sgd": dict(DP_SGD_RECORD, steps=0)}),
    "dp-sgd-record-with-an-array": lambda: _honest(meta={"medflare_dp_sgd": dict(DP_SGD_RECORD, noise_multiplier=np.ones(3))}),
    "collection": lambda: _honest(kind=DataKind.COLLECTION),
    "app-defined": lambda: _honest(kind=DataKind.APP_DEFINED),
    "fl-model": lambda: _honest(kind=DataKind.FL_MODEL),
    "analytic-not-passed-by-default": lambda: _honest({"count": 3}, meta={}, kind=DataKind.ANALYTIC),
    "metrics-carrying-an-array": lambda: _honest({"dice": np.ones(100)}, meta={}, kind=DataKind.METRICS),
    "metrics-carrying-a-list": lambda: _honest({"dice": [0.1] * 100}, meta={}, kind=DataKind.METRICS),
    "metrics-carrying-a-tensor": lambda: _honest({"dice": torch.ones(100)}, meta={}, kind=DataKind.METRICS),
    "metrics-carrying-a-string": lambda: _honest({"dice": "0.1,0.2,0.3"}, meta={}, kind=DataKind.METRICS),
    "metrics-nested": lambda: _honest({"dice": {"a": 0.1}}, meta={}, kind=DataKind.METRICS),
    "metrics-too-many": lambda: _honest({f"v{i}": 0.1 for i in range(1000)}, meta={}, kind=DataKind.METRICS),
    "metrics-carrying-the-update": lambda: _honest(_update(), meta={}, kind=DataKind.METRICS),
    "metrics-with-hostile-meta": lambda: _honest({"dice": 0.5}, meta={"weights": np.ones(4)}, kind=DataKind.METRICS),
    "metrics-with-extra-key": _with(lambda r: r.update(DXO(DataKind.METRICS, {"dice": 0.5}).to_shareable(), weights=np.ones(4))),
    # not a result at all
    "plain-dict": lambda: {"DXO": {"kind": "WEIGHT_DIFF", "data": _update(), "meta": {}}},
    "no-dxo": lambda: Shareable(),
    "dxo-not-a-mapping": _with(lambda r: r.__setitem__("DXO", [1, 2, 3])),
}


@pytest.mark.parametrize("config", CONFIGURATIONS)
@pytest.mark.parametrize("case", HOSTILE)
def test_every_hostile_result_is_refused(config, case, fl_ctx):
    with pytest.raises(UnsafeUpdateError):
        _chain(config)(HOSTILE[case](), fl_ctx)


# --- error replies leave as a bare return code --------------------------------------------------

ERROR_REPLIES = {
    "with-a-dxo": lambda: _with(lambda r: r.set_return_code(ReturnCode.EXECUTION_EXCEPTION))(),
    "with-an-extra-key": lambda: _error_with(weights=_update()),
    "with-headers": lambda: make_reply(ReturnCode.EXECUTION_RESULT_ERROR, headers={"debug": np.ones(4), "note": "x"}),
    "aborted-with-data": lambda: _error_with(ReturnCode.TASK_ABORTED, partial=np.ones(4)),
}


def _error_with(rc=ReturnCode.EXECUTION_EXCEPTION, **items):
    reply = make_reply(rc)
    reply.update(items)
    return reply


@pytest.mark.parametrize("config", CONFIGURATIONS)
@pytest.mark.parametrize("case", ERROR_REPLIES)
def test_error_replies_are_stripped_to_their_return_code(config, case, fl_ctx):
    hostile = ERROR_REPLIES[case]()
    out = _chain(config)(hostile, fl_ctx)
    assert dict(out) == {ReservedHeaderKey.HEADERS: {ReservedHeaderKey.RC: hostile.get_return_code()}}


class _Smuggler(str):
    """A string that carries more than its characters."""

    payload = np.ones(1000)


def test_released_meta_holds_plain_values_never_the_senders_objects(fl_ctx):
    from medflare.filters.percentile_sharing import PercentileSharingFilter

    meta = _meta()
    meta["filter_history"] = [_Smuggler("Earlier")]
    meta["initial_metrics"] = {_Smuggler("dice_mean"): np.float32(0.5)}
    out = from_shareable(PercentileSharingFilter(fraction_shared=0.5, gamma=None).process(_honest(meta=meta), fl_ctx))
    assert type(out.meta["filter_history"][0]) is str
    assert all(type(k) is str and type(v) in (int, float) for k, v in out.meta["initial_metrics"].items())
    assert all(type(r["filter"]) is str and type(r["source"]) is str for r in out.meta["medflare_filters_applied"])


def test_refusals_say_what_was_found_and_where(fl_ctx):
    from medflare.filters.percentile_sharing import PercentileSharingFilter

    f = PercentileSharingFilter(fraction_shared=0.5, gamma=None)
    cases = {
        "undeclared-meta-array": "undeclared key 'update_copy'",
        "undeclared-header-string": "undeclared header 'note'",
        "extra-key-beside-the-dxo": "'weights_copy'] beside its DXO",
        "declared-meta-holding-an-array": r"DXO meta\['train_loss'\] must be a real number",
        "metrics-carrying-an-array": r"METRICS data\['dice'\] must be a number, got ndarray",
        "field-inside-the-dxo": r"fields \['extra'\] beside kind, data and meta",
        "complex-array": "update entry 'w' has dtype complex64",
        "full-weights": "data kind WEIGHTS is not released",
    }
    for case, message in cases.items():
        with pytest.raises(UnsafeUpdateError, match=message):
            f.process(HOSTILE[case](), fl_ctx)
