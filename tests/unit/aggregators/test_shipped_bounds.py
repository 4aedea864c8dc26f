"""Every shipped job's ``max_update_norm`` admits an honest update under every shipped site
profile, at the job's real model size, and the chosen bounds are what docs/aggregation.md says.

A site's result passes its privacy scope's filters (``site_configs/*/privacy.json``) and then the
job's own result filters; here the same pure functions the filters call are applied in that order
to an update of the job's network (``d`` floating parameters) and of the plain-update norm
measured with ``medflare run jobs/<job> --rounds 2`` (docs/aggregation.md).
"""

from __future__ import annotations

import glob
import json
import math
import os

import numpy as np
import pytest

from medflare.aggregators.contribution_checks import checked_contribution, model_spec
from medflare.privacy.accounting import noise_multiplier_for
from medflare.privacy.distributed_dp import site_noise_multiplier
from medflare.privacy.gaussian_mechanism import gaussian_release
from medflare.privacy.noise_sources import SeededGaussianNoise
from medflare.privacy.percentile_sharing import share_largest_fraction
from medflare.training.model_spec import build_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
JOBS = sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(REPO, "jobs", "*", "meta.json")))

#: the largest plain-update norm measured in two rounds of each job's demo (docs/aggregation.md);
#: for the DP-SGD jobs, the largest DP-SGD update (its noise included) over the whole demo run
MEASURED_PLAIN_NORM = {
    "brats_dpsgd": 12.6,
    "brats_fedavg": 30.0,
    "brats_fedyogi": 30.0,
    "brats_gaussian_dp": 30.0,
    "brats_he": 30.0,
    "brats_percentile": 30.0,
    "cxr_emr_dpsgd": 53.4,
    "cxr_emr_fedavg": 16.2,
    "heart_disease_dpsgd": 0.44,
    "heart_disease_fedavg": 0.063,
    "heart_disease_fedyogi": 0.19,
    "heart_disease_he": 0.063,
}
#: (max_update_norm, max_weight) as documented in docs/aggregation.md
DOCUMENTED = {
    "brats_dpsgd": (2700.0, 2400),
    "brats_fedavg": (2700.0, 2400),
    "brats_fedyogi": (2700.0, 2400),
    "brats_gaussian_dp": (1900.0, 2400),
    "brats_he": (1600.0, 2400),
    "brats_percentile": (40.0, 2400),
    "cxr_emr_dpsgd": (1400.0, 1800),
    "cxr_emr_fedavg": (1400.0, 1800),
    "heart_disease_dpsgd": (25.0, 20000),
    "heart_disease_fedavg": (25.0, 20000),
    "heart_disease_fedyogi": (25.0, 20000),
    "heart_disease_he": (1600.0, 20000),
}


def _config(job, side):
    with open(os.path.join(REPO, "jobs", job, "app", "config", f"config_fed_{side}.json")) as f:
        return json.load(f)


def _aggregator_args(job):
    return next(c for c in _config(job, "server")["components"] if c["id"] == "aggregator")["args"]


def _encrypted(job) -> bool:
    return next(c for c in _config(job, "server")["components"] if c["id"] == "aggregator")["path"].endswith("EncryptedSumAggregator")


def _encrypting(filters) -> bool:
    return bool(filters) and filters[-1]["path"].endswith(("HEUpdateEncryptor", "DistributedGaussianPrivacyFilter"))


def _site_scopes(job=None):
    """Every shipped scope; for a job, those whose results its aggregator can take (an HE job
    takes only what a scope ending with the encryptor sends, a plain job never that)."""
    if job is not None:
        return [(name, f) for name, f in _site_scopes() if _encrypting(f) == _encrypted(job)]
    scopes = []
    for path in sorted(glob.glob(os.path.join(REPO, "site_configs", "*", "privacy.json"))):
        with open(path) as f:
            for scope in json.load(f)["scopes"]:
                scopes.append((f"{os.path.basename(os.path.dirname(path))}/{scope['name']}", scope["task_result_filters"]))
    return scopes


def _job_filters(job):
    return [f for group in _config(job, "client").get("task_result_filters", []) for f in group["filters"]]


def _apply(update, filters, rng_seed):
    for n, component in enumerate(filters):
        name, args = component["path"].rsplit(".", 1)[1], component["args"]
        if name == "DistributedGaussianPrivacyFilter":  # a share of the noise, norm-checked, then encrypted
            z = site_noise_multiplier(args["noise_multiplier"], args["num_sites"])
            update, _ = gaussian_release(update, args["clipping_norm"], z, SeededGaussianNoise(rng_seed + n))
            norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in update.values() if v.dtype.kind == "f"))
            assert norm <= args["max_update_norm"], f"the site refuses its own honest release of norm {norm:.4g}"
        elif name == "GaussianPrivacyFilter":
            z = args.get("noise_multiplier") or noise_multiplier_for(
                args["target_epsilon"], args["target_delta"], args["num_rounds"], args.get("accountant", "rdp")
            )
            update, _ = gaussian_release(update, args["clipping_norm"], z, SeededGaussianNoise(rng_seed + n))
        elif name == "PercentileSharingFilter":
            update, _ = share_largest_fraction(update, args["fraction_shared"], args.get("gamma"))
        elif name == "PatientDPSGDFilter":
            pass  # DP-SGD's noise is added in training, at every step; the filter checks its record only
        elif name == "HEUpdateEncryptor":  # the site checks the norm the server cannot, then encrypts
            norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in update.values() if v.dtype.kind == "f"))
            assert norm <= args["max_update_norm"], f"the site's encryptor refuses an honest update of norm {norm:.4g}"
        else:
            raise AssertionError(f"no pure function known for {component['path']}; add it to this test")
    return update


def _envelope(filters, d, plain_norm):
    """The largest norm a filter chain lets out: C + zC (sqrt(d) + 6) after a Gaussian release
    (the noise norm exceeds its mean sqrt(d) zC by t zC with probability <= exp(-t^2 / 2), so
    t = 6 fails once in 6e7 releases), gamma sqrt(round(f d)) after clipped sharing."""
    bound = plain_norm
    for component in filters:
        args = component["args"]
        if component["path"].endswith("DistributedGaussianPrivacyFilter"):
            z = site_noise_multiplier(args["noise_multiplier"], args["num_sites"])
            bound = args["clipping_norm"] * (1 + z * (math.sqrt(d) + 6))
        elif component["path"].endswith("GaussianPrivacyFilter"):
            z = args.get("noise_multiplier") or noise_multiplier_for(
                args["target_epsilon"], args["target_delta"], args["num_rounds"], args.get("accountant", "rdp")
            )
            bound = args["clipping_norm"] * (1 + z * (math.sqrt(d) + 6))
        elif args.get("gamma") is not None:
            bound = min(bound, args["gamma"] * math.sqrt(round(args["fraction_shared"] * d)))
    return bound


def _plain_update(job):
    state = build_model(_config(job, "client")["executors"][0]["executor"]["args"]["model"]).state_dict()
    rng = np.random.default_rng(0)
    update = {}
    for key, value in state.items():
        array = value.numpy()
        update[key] = rng.standard_normal(array.shape).astype(array.dtype) if array.dtype.kind == "f" else np.zeros_like(array)
    scale = MEASURED_PLAIN_NORM[job] / math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in update.values()))
    return {k: (v * scale).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in update.items()}, model_spec(state)


@pytest.mark.parametrize("job", JOBS)
def test_the_norm_bound_admits_every_shipped_site_profile(job):
    plain, spec = _plain_update(job)
    bound = _aggregator_args(job)["max_update_norm"]
    scopes = _site_scopes(job)
    assert scopes, f"{job}: no shipped scope sends what its aggregator takes"
    norms = {}
    for seed, (scope, site_filters) in enumerate(scopes):
        released = _apply(plain, site_filters + _job_filters(job), 100 * seed)
        if _encrypted(job):  # the server sees the bound the site checked, not the norm
            site_bound = site_filters[-1]["args"]["max_update_norm"]
            assert site_bound <= bound, f"{job}: {scope} checks {site_bound}, the job admits at most {bound}"
            norms[scope] = site_bound
        else:
            _, norms[scope] = checked_contribution(released, spec, bound)  # raises when refused
    d = sum(math.prod(shape) for shape, dtype in spec.values() if np.dtype(dtype).kind == "f")
    envelope = max(_envelope(f + _job_filters(job), d, MEASURED_PLAIN_NORM[job]) for _, f in scopes)
    if _encrypted(job):  # every honest release passes its site's check; the job admits the largest
        for scope, site_filters in scopes:
            own = _envelope(site_filters + _job_filters(job), d, MEASURED_PLAIN_NORM[job])
            assert own <= norms[scope], f"{job}: {scope} checks {norms[scope]}, its honest envelope is {own:.4g}"
        assert bound == max(norms.values()), (norms, bound)
        return
    assert max(norms.values()) <= envelope * (1 + 1e-6) and envelope <= bound, (norms, envelope)  # float32 gamma
    assert bound <= 1.2 * envelope, f"{job}: max_update_norm {bound} is looser than needed ({envelope:.4g})"


@pytest.mark.parametrize("job", JOBS)
def test_the_shipped_bounds_are_the_documented_ones(job):
    args = _aggregator_args(job)
    assert (args["max_update_norm"], args["max_weight"]) == DOCUMENTED[job]
    with open(os.path.join(REPO, "docs", "aggregation.md")) as f:
        docs = f.read()
    assert f"| `{job}` |" in docs
