"""The site decides whether its site-only model leaves for cross-site evaluation (``local_model``),
and a DP-SGD result made sparse by the site's own filter still passes a job's DP-SGD filter."""

import json

import numpy as np
import pytest

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import FilterKey, FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.workspace import Workspace
from nvflare.app_common.app_constant import AppConstants

from medflare.filters.gaussian_privacy import GaussianPrivacyFilter
from medflare.filters.patient_dp_sgd import PatientDPSGDFilter
from medflare.filters.percentile_sharing import PercentileSharingFilter
from medflare.privacy.budget_ledger import LEDGER_FILE_NAME, PrivacyBudgetLedger
from medflare.privacy.site_budget import SITE_BUDGET_FILE_NAME
from medflare.privacy.update_checks import UnsafeUpdateError
from medflare.sites.site_profiles import resolve_profile
from medflare.transport.sparse_update import SparseTensor
from medflare.wire_contract import DP_SGD, FILTERS_APPLIED, LOCAL_MODEL


@pytest.fixture()
def local(tmp_path):
    (tmp_path / "startup").mkdir()
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / SITE_BUDGET_FILE_NAME).write_text(json.dumps({"max_epsilon": 8.0, "delta": 1e-5, "accountant": "rdp"}))
    return tmp_path / "local"


def _ctx(local, task=AppConstants.TASK_SUBMIT_MODEL):
    ctx = FLContext()
    ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, Workspace(str(local.parent), "site-1"), private=True, sticky=True)
    ctx.set_prop(FLContextKey.FILTER_DIRECTION, FilterKey.OUT, private=True, sticky=False)
    if task is not None:
        ctx.set_prop(FLContextKey.TASK_NAME, task, private=True, sticky=False)
    return ctx


def _record(steps=40):
    return {"mechanism": "dp_sgd", "neighbouring_relation": "add/remove one patient", "noise_multiplier": 1.1,
            "max_grad_norm": 1.0, "sample_rate": 0.05, "steps": steps, "secure_noise": True}


def _model(meta=None, kind=DataKind.WEIGHTS, data=None):
    meta = {LOCAL_MODEL: "site_only"} if meta is None else meta
    data = {"conv.weight": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "fc.bias": np.ones(2, np.float32)} if data is None else data
    result = DXO(data_kind=kind, data=data, meta=meta).to_shareable()
    result.set_header(AppConstants.CURRENT_ROUND, 3)
    return result


def _sharing(**kwargs):
    return PercentileSharingFilter(**{"fraction_shared": 0.1, "gamma": 0.1, **kwargs})


# partial sharing -----------------------------------------------------------------------------

def test_partial_sharing_withholds_the_site_only_model_unless_the_site_releases_it(local):
    with pytest.raises(UnsafeUpdateError, match="data kind WEIGHTS is not released"):
        _sharing().process(_model(), _ctx(local))
    out = from_shareable(_sharing(local_model="release").process(_model(), _ctx(local)))
    assert out.data_kind == DataKind.WEIGHTS
    np.testing.assert_array_equal(out.data["conv.weight"], np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4))
    assert out.get_meta_prop(FILTERS_APPLIED) == [{"filter": "PercentileSharingFilter", "source": "unknown"}]


@pytest.mark.parametrize("task", [AppConstants.TASK_TRAIN, AppConstants.TASK_VALIDATION, "submit_model ", None])
def test_a_released_local_model_leaves_only_as_the_answer_to_submit_model(local, task):
    # a training round returning WEIGHTS would otherwise bypass partial sharing
    with pytest.raises(UnsafeUpdateError, match="WEIGHTS are released only as the site-only model"):
        _sharing(local_model="release").process(_model(), _ctx(local, task))


@pytest.mark.parametrize(
    "data, message",
    [
        ({"w": np.array([1.0, np.nan], np.float32)}, "NaN"),
        ({"w": np.array(["a"])}, "only numbers"),
        ({}, "non-empty"),
        ({"w": [1.0, 2.0]}, "not a numpy array"),
    ],
)
def test_a_released_local_model_is_still_checked(local, data, message):
    with pytest.raises(UnsafeUpdateError, match=message):
        _sharing(local_model="release").process(_model(data=data), _ctx(local))


@pytest.mark.parametrize("meta", [{}, {LOCAL_MODEL: "last_round"}])
def test_only_a_site_only_model_is_released_never_the_last_rounds_weights(local, meta):
    with pytest.raises(UnsafeUpdateError, match="not a site-only model"):
        _sharing(local_model="release").process(_model(meta), _ctx(local))


def test_a_released_local_model_carries_only_declared_meta(local):
    with pytest.raises(UnsafeUpdateError, match=r"must be one of \['site_only', 'last_round'\], got 'site_only_x'"):
        _sharing(local_model="release").process(_model({LOCAL_MODEL: "site_only_x"}), _ctx(local))
    meta = {LOCAL_MODEL: "site_only", "train_loss": 0.3, "secret": "x"}
    with pytest.raises(UnsafeUpdateError, match="secret"):
        _sharing(local_model="release").process(_model(meta), _ctx(local))
    out = from_shareable(_sharing(local_model="release", release_meta=[]).process(_model({LOCAL_MODEL: "site_only", "train_loss": 0.3}), _ctx(local)))
    assert "train_loss" not in out.meta


@pytest.mark.parametrize("value", ["Release", "dp_sgd", True, None, ""])
def test_a_bad_local_model_choice_is_refused_when_built(value):
    with pytest.raises(ValueError, match=r"local_model must be one of \['withhold', 'release'\]"):
        _sharing(local_model=value)


def test_training_results_are_still_partially_shared_with_the_local_model_released(local):
    diff = {"w": np.arange(100, dtype=np.float32) / 100}
    out = from_shareable(_sharing(local_model="release").process(_model(kind=DataKind.WEIGHT_DIFF, data=diff), _ctx(local, "train")))
    assert np.count_nonzero(out.data["w"]) == 10


# DP-SGD --------------------------------------------------------------------------------------

def test_dp_sgd_releases_the_site_only_model_charged_or_withholds_it(local):
    released = from_shareable(PatientDPSGDFilter(1.0, 1.0).process(_model({DP_SGD: _record(), LOCAL_MODEL: "site_only"}), _ctx(local)))
    assert released.data_kind == DataKind.WEIGHTS and released.get_meta_prop(DP_SGD)["epsilon_site"] > 0
    (release,) = PrivacyBudgetLedger.read_releases(str(local / LEDGER_FILE_NAME))
    assert release["mechanism"] == "dp_sgd" and release["steps"] == 40
    with pytest.raises(UnsafeUpdateError, match="data kind WEIGHTS is not released"):
        PatientDPSGDFilter(1.0, 1.0, local_model="withhold").process(_model({DP_SGD: _record(), LOCAL_MODEL: "site_only"}), _ctx(local))
    assert len(PrivacyBudgetLedger.read_releases(str(local / LEDGER_FILE_NAME))) == 1  # nothing charged for it
    with pytest.raises(ValueError, match=r"local_model must be one of \['dp_sgd', 'withhold'\]"):
        PatientDPSGDFilter(1.0, 1.0, local_model="release")


def test_a_site_only_model_without_a_dp_sgd_record_never_leaves_a_dp_sgd_site(local):
    with pytest.raises(UnsafeUpdateError, match="no DP-SGD record"):
        PatientDPSGDFilter(1.0, 1.0).process(_model(), _ctx(local))


def test_a_gaussian_site_never_releases_the_site_only_model(local):
    with pytest.raises(UnsafeUpdateError, match="data kind WEIGHTS is not released"):
        GaussianPrivacyFilter(clipping_norm=1.0, noise_multiplier=2.4).process(_model(), _ctx(local))


# a DP-SGD result after the site's sparse partial sharing (the clinical_sparse scope) -------------

def test_a_dp_sgd_update_made_sparse_by_the_site_passes_the_jobs_dp_sgd_filter(local):
    diff = {"w": np.arange(1, 101, dtype=np.float32) / 1000, "n": np.array(3, np.int64)}
    update = _model({DP_SGD: _record()}, DataKind.WEIGHT_DIFF, diff)
    sparse = _sharing(sparse_transport=True, gamma=None).process(update, _ctx(local, "train"))
    assert isinstance(from_shareable(sparse).data["w"], SparseTensor)
    out = from_shareable(PatientDPSGDFilter(1.0, 1.0).process(sparse, _ctx(local, "train")))
    assert isinstance(out.data["w"], SparseTensor) and out.data["w"].num_kept == 10
    assert out.get_meta_prop(DP_SGD)["epsilon_site"] > 0
    assert len(PrivacyBudgetLedger.read_releases(str(local / LEDGER_FILE_NAME))) == 1


def test_sparse_entries_with_bad_values_are_refused_and_filters_that_compute_refuse_them(local):
    diff = {"w": np.arange(1, 101, dtype=np.float32) / 1000}
    sparse = _sharing(sparse_transport=True, gamma=None).process(_model({DP_SGD: _record()}, DataKind.WEIGHT_DIFF, diff), _ctx(local, "train"))
    tensor = from_shareable(sparse).data["w"]
    poisoned = SparseTensor(tensor.shape, tensor.dtype, tensor.encoding, np.full_like(tensor.values, np.nan), tensor.indices, tensor.bitmask)
    bad = _model({DP_SGD: _record()}, DataKind.WEIGHT_DIFF, {"w": poisoned})
    with pytest.raises(UnsafeUpdateError, match="NaN"):
        PatientDPSGDFilter(1.0, 1.0).process(bad, _ctx(local, "train"))
    assert not (local / LEDGER_FILE_NAME).exists()  # refused before anything was charged
    with pytest.raises(UnsafeUpdateError, match="parameter names"):
        PatientDPSGDFilter(1.0, 1.0).process(_model({DP_SGD: _record()}, DataKind.WEIGHT_DIFF, {7: tensor}), _ctx(local, "train"))
    # a filter that computes on the values (noise, clipping) cannot take sparse entries
    with pytest.raises(UnsafeUpdateError, match="SparseTensor"):
        GaussianPrivacyFilter(clipping_norm=1.0, noise_multiplier=2.4).process(sparse, _ctx(local, "train"))


# the shipped profiles ------------------------------------------------------------------------

@pytest.mark.parametrize("profile", ["research", "clinical"])
def test_each_profiles_default_scope_says_what_happens_to_the_local_model(profile):
    chosen = resolve_profile(profile)
    scope = next(s for s in chosen.privacy["scopes"] if s["name"] == chosen.default_scope)
    choices = [f["args"]["local_model"] for f in scope["task_result_filters"]]
    assert choices == (["release"] if profile == "research" else ["dp_sgd"])
    assert "site-only model" in scope["properties"]["description"]
