"""Distributed Gaussian DP under secure aggregation (:mod:`medflare.filters.distributed_gaussian`):
each site adds z/sqrt(N) of the noise and encrypts in the same step, and is charged z."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey
from nvflare.apis.workspace import Workspace
from nvflare.app_common.app_constant import AppConstants
from nvflare.fuel.sec.security_content_service import SecurityContentService

from medflare.filters.distributed_gaussian import DistributedGaussianPrivacyFilter
from medflare.filters.gaussian_privacy import GaussianPrivacyFilter
from medflare.privacy.budget_ledger import LEDGER_FILE_NAME, PrivacyBudgetLedger
from medflare.privacy.site_budget import SITE_BUDGET_FILE_NAME
from medflare.privacy.update_checks import UnsafeUpdateError
from medflare.transport.ckks_update import decrypt_update
from medflare.wire_contract import ENCRYPTION, GAUSSIAN_DP, HE_ALGORITHM, HE_PROCESSED_KEYS
from tests.he_keys import contexts, install_contexts

Z, N, C = 2.4, 3, 1.0
SIZE = 20_000


def _site(root, monkeypatch, with_key: bool = True) -> FLContext:
    """A site's workspace with its budget file, and its startup kit with or without the CKKS keys."""
    (root / "startup").mkdir(parents=True)
    (root / "local").mkdir()
    (root / "local" / SITE_BUDGET_FILE_NAME).write_text(json.dumps({"max_epsilon": 100.0, "delta": 1e-5, "accountant": "rdp"}))
    ctx = FLContext()
    ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, Workspace(str(root), "site-1"), private=True, sticky=True)
    # NVFlare's service keeps the first folder it is given for the process: forget it for this test
    monkeypatch.setattr(SecurityContentService, "security_content_manager", None)
    monkeypatch.setattr(SecurityContentService, "content_folder", None)
    if with_key:
        install_contexts(str(root / "startup"), ctx)
    else:
        SecurityContentService.initialize(content_folder=str(root / "startup"))
        ctx.set_prop(FLContextKey.SECURE_MODE, False, private=True, sticky=True)
    return ctx


@pytest.fixture()
def fl_ctx(tmp_path, monkeypatch):
    return _site(tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def client_key():
    return contexts()[0]


def _releases(ctx: FLContext) -> list:
    local = ctx.get_prop(FLContextKey.WORKSPACE_OBJECT).get_site_config_dir()
    return PrivacyBudgetLedger.read_releases(f"{local}/{LEDGER_FILE_NAME}")


def _filter(**kwargs) -> DistributedGaussianPrivacyFilter:
    args = dict(clipping_norm=C, num_sites=N, max_update_norm=1600.0, noise_multiplier=Z, max_epsilon=50.0, noise_seed=0)
    args.update(kwargs)
    return DistributedGaussianPrivacyFilter(**args)


def _result(data=None, round_number=1):
    data = {"w": np.zeros(SIZE, np.float32)} if data is None else data
    shareable = DXO(data_kind=DataKind.WEIGHT_DIFF, data=data, meta={"num_train_cases": 24, "train_loss": 0.3}).to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, round_number)
    return shareable


def test_a_zero_update_is_released_as_ciphertexts_of_noise_z_c_over_sqrt_n(fl_ctx, client_key):
    out = _filter().process(_result(), fl_ctx)
    assert set(out) == {ReservedHeaderKey.HEADERS, "DXO"}
    dxo = from_shareable(out)
    assert list(dxo.data) == ["w"] and type(dxo.data["w"]) is bytes
    assert dxo.meta[HE_PROCESSED_KEYS] == {"w": True} and dxo.meta[HE_ALGORITHM] == "CKKS"
    noise = decrypt_update(dxo.data, client_key)["w"]
    assert noise.shape == (SIZE,)
    assert abs(float(np.mean(noise))) < 0.05
    assert float(np.std(noise)) == pytest.approx(Z * C / math.sqrt(N), rel=0.05)
    assert float(np.std(noise)) < 0.75 * Z * C  # a share, not the whole noise


def test_the_record_states_the_sum_s_z_and_the_share(fl_ctx):
    dxo = from_shareable(_filter().process(_result(), fl_ctx))
    record = dxo.meta[GAUSSIAN_DP]
    assert record["noise_multiplier"] == Z
    assert record["distributed_sites"] == N
    assert record["site_noise_multiplier"] == pytest.approx(Z / math.sqrt(N), rel=1e-12)
    assert record["site_noise_multiplier"] == pytest.approx(1.386, abs=1e-3)
    assert record["clipping_norm"] == C and record["secure_noise"] is False


def test_the_epsilon_charged_is_that_of_the_plain_gaussian_filter_at_z(tmp_path, monkeypatch):
    distributed_ctx = _site(tmp_path / "distributed", monkeypatch)
    distributed = from_shareable(_filter().process(_result(), distributed_ctx)).meta[GAUSSIAN_DP]
    plain_ctx = _site(tmp_path / "plain", monkeypatch)
    plain_filter = GaussianPrivacyFilter(clipping_norm=C, noise_multiplier=Z, max_epsilon=50.0, noise_seed=0)
    plain = from_shareable(plain_filter.process(_result({"w": np.zeros(8, np.float32)}), plain_ctx)).meta[GAUSSIAN_DP]
    for field in ("epsilon_round", "epsilon_run", "epsilon_site", "noise_multiplier", "delta", "accountant"):
        assert distributed[field] == plain[field], field
    assert _releases(distributed_ctx)[0]["epsilon_after"] == _releases(plain_ctx)[0]["epsilon_after"]


def test_the_encryption_record_weights_equally_and_states_n(fl_ctx):
    dxo = from_shareable(_filter().process(_result(), fl_ctx))
    assert dxo.meta[ENCRYPTION] == {
        "scheme": "CKKS",
        "weighted_by": "equal",
        "weight": 1.0,
        "max_update_norm": 1600.0,
        "num_values": SIZE,
        "distributed_dp_sites": N,
    }
    # nothing data-dependent leaves: the case count is not released, so nothing can weight by it
    assert "num_train_cases" not in dxo.meta and "train_loss" not in dxo.meta


def test_the_site_ledger_is_charged_z_once_per_release(fl_ctx):
    dp = _filter()
    dp.process(_result(round_number=1), fl_ctx)
    dp.process(_result(round_number=2), fl_ctx)
    releases = _releases(fl_ctx)
    assert [r["source"] for r in releases] == ["DistributedGaussianPrivacyFilter"] * 2
    assert [r["noise_multiplier"] for r in releases] == [Z, Z]  # z, not the share z/sqrt(N)
    assert [r["round"] for r in releases] == [1, 2]
    assert releases[1]["epsilon_after"] > releases[0]["epsilon_after"] > 0


def test_the_released_update_is_clipped_to_c_before_the_share_is_added(tmp_path, monkeypatch, client_key):
    # the same seeded noise on an update and on zero: the difference is the clipped update
    update = np.full(SIZE, 10.0 / math.sqrt(SIZE), np.float32)  # L2 norm 10, clipped to 1
    released = {}
    for name, data in (("update", update), ("zero", np.zeros(SIZE, np.float32))):
        ctx = _site(tmp_path / name, monkeypatch)
        released[name] = decrypt_update(from_shareable(_filter().process(_result({"w": data}), ctx)).data, client_key)["w"]
    np.testing.assert_allclose(released["update"] - released["zero"], update / 10.0, atol=1e-5)


def test_no_context_is_refused_before_the_ledger_is_charged(tmp_path, monkeypatch):
    ctx = _site(tmp_path, monkeypatch, with_key=False)
    with pytest.raises(UnsafeUpdateError, match="CKKS context 'client_context.tenseal'"):
        _filter().process(_result(), ctx)
    assert _releases(ctx) == []
    assert not (tmp_path / "local" / LEDGER_FILE_NAME).exists()


def test_a_noised_update_above_max_update_norm_is_refused(fl_ctx):
    # 20,000 coordinates of noise 1.39 have norm about 196: above a bound of 50
    with pytest.raises(UnsafeUpdateError, match="the noised update's L2 norm .* exceeds max_update_norm 50; not sent"):
        _filter(max_update_norm=50.0).process(_result(), fl_ctx)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_updates_are_refused_before_the_ledger_is_charged(bad, fl_ctx):
    data = {"w": np.zeros(SIZE, np.float32)}
    data["w"][5] = bad
    with pytest.raises(UnsafeUpdateError):
        _filter().process(_result(data), fl_ctx)
    assert _releases(fl_ctx) == []


def test_weights_are_not_released(fl_ctx):
    shareable = DXO(data_kind=DataKind.WEIGHTS, data={"w": np.zeros(4, np.float32)}, meta={}).to_shareable()
    with pytest.raises(UnsafeUpdateError, match="data kind WEIGHTS is not released"):
        _filter().process(shareable, fl_ctx)
    assert _releases(fl_ctx) == []


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_sites": 1}, ValueError, r"num_sites must be an int in \[2, inf\], got 1"),
        ({"num_sites": True}, TypeError, r"num_sites must be an int .* got True \(bool\)"),
        ({"num_sites": "3"}, TypeError, r"num_sites must be an int .* got '3' \(str\)"),
        ({"num_sites": 3.0}, TypeError, r"num_sites must be an int"),
        ({"max_update_norm": 0}, ValueError, "max_update_norm must be in"),
        ({"max_update_norm": float("nan")}, ValueError, "max_update_norm must be a finite"),
        ({"max_update_norm": "1600"}, TypeError, "max_update_norm must be a real number"),
        ({"tenseal_context_file": ""}, TypeError, "tenseal_context_file must be a file name"),
        ({"noise_multiplier": 0.0}, ValueError, "noise_multiplier must be in"),
        ({"clipping_norm": -1.0}, ValueError, "clipping_norm must be in"),
    ],
    ids=["one-site", "sites-bool", "sites-str", "sites-float", "norm-zero", "norm-nan", "norm-str", "context-empty",
         "z-zero", "clipping-negative"],
)
def test_bad_arguments_are_refused_naming_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        _filter(**kwargs)


def test_the_share_of_a_solved_noise_multiplier_is_z_over_sqrt_n():
    dp = _filter(noise_multiplier=None, target_epsilon=8.0, num_rounds=5)
    assert dp.site_noise_multiplier == pytest.approx(dp.effective_noise_multiplier / math.sqrt(N), rel=1e-12)
    assert (dp.num_sites, dp.max_update_norm, dp.tenseal_context_file) == (N, 1600.0, "client_context.tenseal")


def test_a_truncated_ledger_blocks_the_next_release_and_nothing_leaves(fl_ctx):
    dp = _filter()
    dp.process(_result(round_number=1), fl_ctx)
    dp.process(_result(round_number=2), fl_ctx)
    local = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT).get_site_config_dir()
    path = f"{local}/{LEDGER_FILE_NAME}"
    with open(path) as f:
        ledger = json.load(f)
    ledger["records"] = ledger["records"][:1]  # a rollback: the second release forgotten
    with open(path, "w") as f:
        json.dump(ledger, f)
    with pytest.raises(UnsafeUpdateError, match="(?i)ledger"):
        dp.process(_result(round_number=3), fl_ctx)


def test_an_exhausted_budget_blocks_the_release_before_any_noise_is_encrypted(fl_ctx):
    dp = _filter(max_epsilon=2.0)  # one release at z = 2.4 spends about 1.8; a second would exceed 2
    dp.process(_result(round_number=1), fl_ctx)
    with pytest.raises(UnsafeUpdateError, match="(?i)epsilon|budget"):
        dp.process(_result(round_number=2), fl_ctx)
    assert len(_releases(fl_ctx)) == 1
