"""Local against distributed Gaussian noise at the same per-site epsilon, on FLamby's heart-disease hospitals (`make bench-ddp`).

Issue 15: does sharing the noise among the sites under secure aggregation
(:mod:`medflare.privacy.distributed_dp`) keep the model better at the same epsilon? Both DP
rows give every site the same guarantee against the server: its update is clipped to L2 norm C
and what the server can read carries Gaussian noise of multiplier z, solved so that R releases
spend eps at delta 1e-5 (``noise_multiplier_for``, RDP), a whole hospital's data being the unit
of privacy. They differ in who adds the noise and what the server sees:

=============================  ==================================================================
row                            what each site sends; what the server computes
=============================  ==================================================================
local Gaussian DP, eps e       ``gaussian_release(update, C, z)`` in plaintext (what
                               ``GaussianPrivacyFilter`` sends); the mean of the 4 releases
distributed DP (CKKS), eps e   ``gaussian_release(update, C, z / sqrt(4))`` (``site_noise_multiplier``),
                               then ``encrypt_update`` under the sites' CKKS context (what
                               ``DistributedGaussianPrivacyFilter`` sends); the server, whose context
                               has no secret key, reads and checks the ciphertexts
                               (``read_ciphertexts``), takes ``encrypted_mean`` and adds it to its
                               encrypted global model (NVFlare's ``add_to_global_weights``, as its
                               ``HEModelShareableGenerator`` does); every site decrypts the global
                               model (``decrypt_update``) before it trains
=============================  ==================================================================

The sum of the 4 shares carries z, so eps per site against the server is the same; the mean the
model moves by carries per-coordinate noise sd z C / 4 instead of z C / 2. (Against another site,
which knows its own share, distributed noise gives only z sqrt(3/4): see ``distributed_dp``.)
Reference rows, the same loop: pooled (as ``heart_disease.py``: Adam, 50 epochs), FedAvg with
equal weights (no clipping, no noise) and FedAvg clipped to C without noise (what either DP row
would reach with no noise at all). Every federated row weights the sites equally: the DP scopes
withhold case counts, and a weighted mean would protect heavier sites less than z.

Training is the shipped job's (``jobs/heart_disease_fedavg``: the executor's local steps, batch,
learning rate, optimizer and normalisation are read from its config), R = 15 rounds, every site's
model and shuffling seeded by the run's seed, in one process: NVFlare's simulator provisions no
CKKS keys (``medflare run`` refuses HE jobs), so the round loop runs here with the pure functions
the filters, the aggregator and the shareable generator call. The keys are NVFlare's own:
``HEBuilder().initialize`` (CKKS, degree 8192, moduli [60, 40, 40], scale 2**40), the sites'
context with the secret key and the server's without. The noise is seeded (PCG64, not secure), one
stream per (seed, round, site) shared by both DP rows of a seed, so that in round 1 the rows
differ only in the scale of the same draws.

Measured: FLamby's metric, accuracy at 0.5 of the final model on each hospital's test set averaged
over hospitals, and the mean over hospitals of the AUC; mean +- sd over seeds, the ratio to pooled
(means), and per epsilon the per-seed difference distributed - local. The CKKS path is checked
every round: the decrypted new global model against the decrypted old one plus the float64 mean
of the same noised updates (largest absolute error over entries and rounds, which must stay under
``CKKS_TOLERANCE``; the script exits with 1 otherwise).

    python benchmarks/distributed_dp.py                   # 30 seeds, eps 1, 3, 5, 10: 330 runs, ~10 minutes on 2 cores
    python benchmarks/distributed_dp.py --quick           # 1 seed, 2 rounds, eps 10: a smoke test
    python benchmarks/distributed_dp.py --seeds 42 43 --epsilons 1 --json results.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import numpy as np  # noqa: E402

SEEDS = tuple(range(42, 72))
EPSILONS = (1.0, 3.0, 5.0, 10.0)
ROUNDS = 15
#: the decrypted mean may differ from the plaintext mean by this much (CKKS at 2**40 errs by ~1e-7 here)
CKKS_TOLERANCE = 1e-5
#: the job whose training every federated row repeats
JOB = "heart_disease_fedavg"


def _sibling_module(name: str):
    """Import ``benchmarks/<name>.py`` by its path (``benchmarks`` is no package here)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


heart = _sibling_module("heart_disease")


@dataclass(frozen=True)
class Settings:
    """The training and privacy settings every run shares.

    Attributes:
        rounds: R, the releases each site makes (and the rounds of FedAvg).
        local_steps, batch_size, learning_rate, optimizer, clinical_normalisation: the job's executor's.
        clipping_norm: C, ``heart_disease.py``'s Gaussian DP rows' (about one round's update).
        delta: delta of the accounting.
        central_epochs: the pooled row's epochs.
    """

    rounds: int
    local_steps: int
    batch_size: int
    learning_rate: float
    optimizer: str
    clinical_normalisation: str
    clipping_norm: float
    delta: float
    central_epochs: int


def job_settings(rounds: int, central_epochs: int) -> Settings:
    """:class:`Settings` with the training of :data:`JOB`'s executor and ``heart_disease.py``'s C and delta."""
    args = heart._read_client_config(JOB)["executors"][0]["executor"]["args"]
    return Settings(
        rounds=rounds, local_steps=args["local_steps"], batch_size=args["batch_size"],
        learning_rate=args["learning_rate"], optimizer=args["optimizer"],
        clinical_normalisation=args["clinical_normalisation"], clipping_norm=heart.DP_CLIPPING_NORM,
        delta=heart.DP_DELTA, central_epochs=central_epochs,
    )


@dataclass(frozen=True)
class Row:
    """One row: ``kind`` in ``pooled``, ``fedavg``, ``clipped``, ``local``, ``distributed``."""

    kind: str
    epsilon: Optional[float] = None

    def label(self, settings: Settings) -> str:
        if self.kind == "local":
            return f"local Gaussian DP, eps {self.epsilon:g}"
        if self.kind == "distributed":
            return f"distributed DP (CKKS), eps {self.epsilon:g}"
        if self.kind == "clipped":
            return f"FedAvg, clipped to C={settings.clipping_norm:g}"
        return {"pooled": "pooled", "fedavg": "FedAvg, equal weights"}[self.kind]


def rows_of(epsilons) -> list[Row]:
    return [Row("pooled"), Row("fedavg"), Row("clipped")] + [Row(kind, e) for e in epsilons for kind in ("local", "distributed")]


# --- one run, in a worker process -------------------------------------------------------------


def _site_trainers(settings: Settings, cases: dict, seed: int) -> dict:
    """Each hospital's trainer, as the job's executor builds it, on a model seeded by ``seed``."""
    from medflare.training.outcome_networks import OutcomeNet
    from medflare.training.outcome_trainer import OutcomeTrainer

    return {
        site: OutcomeTrainer(
            OutcomeNet(1, 13, None, clinical_hidden=[], seed=seed), c["train"], c["test"], ["label"],
            batch_size=settings.batch_size, learning_rate=settings.learning_rate, optimizer=settings.optimizer,
            clinical_normalisation=settings.clinical_normalisation, device="cpu", seed=seed,
        )
        for site, c in sorted(cases.items())
    }


def _score(trainers: dict, weights: dict) -> dict:
    """``{site: {"accuracy", "auc"}}`` of ``weights`` on every hospital's test set."""
    scores = {}
    for site, trainer in trainers.items():
        trainer.set_weights(weights)
        metrics = trainer.validate()
        scores[site] = {"accuracy": metrics["accuracy"], "auc": metrics["auc"]}
    return scores


def _clip(update: dict, clipping_norm: float) -> dict:
    from medflare.privacy.gaussian_mechanism import l2_norm

    factor = min(1.0, clipping_norm / max(l2_norm(update), 1e-30))
    return {k: np.asarray(v) * np.float32(factor) for k, v in update.items()}


class CKKSServer:
    """The server's side of a distributed DP round, and the sites' decryption of its model.

    It holds the global model as NVFlare's ``HEModelShareableGenerator`` does: plaintext until the
    first encrypted mean is added, CKKS vectors (under the server's context, no secret key) from
    then on.
    """

    def __init__(self, serialized_contexts: tuple, weights: dict):
        from medflare.transport.ckks_update import load_context

        self.client = load_context(serialized_contexts[0])
        self.server = load_context(serialized_contexts[1])
        if self.server.is_private() or not self.client.is_private():
            raise RuntimeError("the server's context holds the secret key, or a site's lacks it")
        self.shapes = {k: np.shape(v) for k, v in weights.items()}
        self.sizes = {k: int(np.size(v)) for k, v in weights.items()}
        self.model = {k: np.asarray(v) for k, v in weights.items()}
        self.decrypted = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
        self.max_error = 0.0
        self.upload_bytes = 0

    def round(self, releases: list[dict]) -> dict:
        """Encrypt each site's release, aggregate under encryption, decrypt the new model; float32 weights."""
        from nvflare.app_opt.he.model_shareable_generator import add_to_global_weights

        from medflare.transport.ckks_update import decrypt_update, encrypt_update, encrypted_mean, read_ciphertexts

        uploads = [encrypt_update(release, self.client) for release in releases]  # each site, weight 1
        self.upload_bytes = sum(len(b) for b in uploads[0].values())
        contributions = [read_ciphertexts(upload, self.server, self.sizes) for upload in uploads]
        mean = encrypted_mean(contributions, [1.0] * len(contributions))
        self.model = {name: add_to_global_weights(mean[name], self.model, name)[0] for name in mean}
        download = {name: vector.serialize() for name, vector in self.model.items()}
        decrypted = decrypt_update(download, self.client, self.shapes)  # what every site loads
        expected = {
            k: self.decrypted[k] + sum(np.asarray(r[k], dtype=np.float64) for r in releases) / len(releases)
            for k in decrypted
        }
        error = max(float(np.max(np.abs(decrypted[k] - expected[k]))) for k in decrypted)
        self.max_error = max(self.max_error, error)
        self.decrypted = decrypted
        return {k: v.astype(np.float32) for k, v in decrypted.items()}


def federate(settings: Settings, row: Row, seed: int, trainers: dict, contexts: Optional[tuple]) -> tuple[dict, dict]:
    """R rounds of FedAvg (equal weights) with ``row``'s release; the final global weights and what was spent."""
    from medflare.privacy.accounting import epsilon_spent, noise_multiplier_for
    from medflare.privacy.distributed_dp import site_noise_multiplier
    from medflare.privacy.gaussian_mechanism import gaussian_release, l2_norm
    from medflare.privacy.noise_sources import SeededGaussianNoise

    noised = row.kind in ("local", "distributed")
    z = noise_multiplier_for(row.epsilon, settings.delta, settings.rounds) if noised else None
    z_release = site_noise_multiplier(z, len(trainers)) if row.kind == "distributed" else z
    weights = next(iter(trainers.values())).get_weights()
    server = CKKSServer(contexts, weights) if row.kind == "distributed" else None
    norms, released_norms = [], []
    for rnd in range(settings.rounds):
        releases = []
        for index, trainer in enumerate(trainers.values()):
            trainer.set_weights(weights)
            trainer.train(steps=settings.local_steps)
            update = trainer.weight_diff(trainer.get_weights(), weights)
            norms.append(l2_norm(update))
            if row.kind == "clipped":
                update = _clip(update, settings.clipping_norm)
            elif noised:  # the same stream in both DP rows of a seed: scaled by z, or by z / sqrt(N)
                noise = SeededGaussianNoise(seed * 1_000_003 + rnd * 101 + index)
                update, _ = gaussian_release(update, settings.clipping_norm, z_release, noise)
            released_norms.append(l2_norm(update))
            releases.append(update)
        if server is not None:
            weights = server.round(releases)
        else:
            weights = {k: v + sum(r[k] for r in releases) / len(releases) for k, v in weights.items()}
    spent = {"update_norm_median": float(np.median(norms)), "released_norm_max": float(max(released_norms))}
    if noised:
        spent.update(noise_multiplier=z, site_noise_multiplier=z_release, sites=len(trainers),
                     site_epsilon=epsilon_spent([(z, settings.rounds)], settings.delta))
    if server is not None:
        spent.update(ckks_max_abs_error=server.max_error, ciphertext_bytes_per_upload=server.upload_bytes)
    return weights, spent


def run_one(settings: Settings, row: Row, seed: int, data_dir: str, contexts: Optional[tuple]) -> dict:
    """Train ``row`` at ``seed``; its scores on every hospital and what it spent."""
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    cases = heart._cases(data_dir)
    trainers = _site_trainers(settings, cases, seed)
    out = {"row": row.label(settings), "kind": row.kind, "epsilon": row.epsilon, "seed": seed}
    if row.kind == "pooled":
        pooled = [c for site in sorted(cases) for c in cases[site]["train"]]
        weights = heart._train_central(pooled, cases["site-1"]["test"], seed, settings.central_epochs)
    else:
        weights, spent = federate(settings, row, seed, trainers, contexts)
        out.update(spent)
    out["scores"] = _score(trainers, weights)
    out["accuracy"] = float(np.mean([s["accuracy"] for s in out["scores"].values()]))
    aucs = [s["auc"] for s in out["scores"].values() if math.isfinite(s["auc"])]
    out["auc"] = float(np.mean(aucs)) if aucs else math.nan
    out["seconds"] = time.perf_counter() - start
    return out


def _init_worker():
    import logging

    logging.disable(logging.WARNING)


def _run_all(work: list[tuple], jobs: int) -> list[dict]:
    """:func:`run_one` of every argument tuple, ``jobs`` at a time in spawned processes (in this one for 1)."""

    def report(run):
        print(f"  {run['row']:<32} seed {run['seed']}: accuracy {run['accuracy']:.3f}, AUC {run['auc']:.3f} "
              f"({run['seconds']:.1f} s)", flush=True)
        return run

    if jobs == 1:
        _init_worker()
        return [report(run_one(*task)) for task in work]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        return [report(future.result()) for future in [pool.submit(run_one, *task) for task in work]]


def nvflare_contexts() -> tuple[bytes, bytes]:
    """``(sites' context with the secret key, server's without)``, serialized as ``nvflare provision``'s HEBuilder writes them."""
    from nvflare.lighter.impl.he import HEBuilder

    builder = HEBuilder()
    builder.initialize(None, None)
    return builder.get_serialized_context(is_client=True), builder.get_serialized_context(is_client=False)


# --- the tables -------------------------------------------------------------------------------


def _mean_sd(values) -> tuple[float, float]:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarise(settings: Settings, epsilons, runs: list[dict]) -> dict:
    """Per row: accuracy and AUC (mean, sd, per seed) and the mean accuracy per hospital."""
    rows = {}
    for row in rows_of(epsilons):
        mine = sorted((r for r in runs if r["row"] == row.label(settings)), key=lambda r: r["seed"])
        if not mine:
            continue
        summary = {"kind": row.kind, "epsilon": row.epsilon, "seeds": [r["seed"] for r in mine]}
        for metric in ("accuracy", "auc"):
            mean, sd = _mean_sd([r[metric] for r in mine])
            summary[metric] = {"mean": mean, "sd": sd, "per_seed": [r[metric] for r in mine]}
        sites = sorted(mine[0]["scores"])
        summary["per_hospital"] = {s: float(np.mean([r["scores"][s]["accuracy"] for r in mine])) for s in sites}
        for key in ("noise_multiplier", "site_noise_multiplier", "site_epsilon"):
            if key in mine[0]:
                summary[key] = mine[0][key]
        if row.kind == "distributed":
            summary["ckks_max_abs_error"] = max(r["ckks_max_abs_error"] for r in mine)
            summary["ciphertext_bytes_per_upload"] = mine[0]["ciphertext_bytes_per_upload"]
        rows[row.label(settings)] = summary
    return rows


def compare(settings: Settings, epsilons, runs: list[dict]) -> list[dict]:
    """Per epsilon: local and distributed side by side, and distributed - local per seed."""
    out = []
    for eps in epsilons:
        local = {r["seed"]: r for r in runs if r["kind"] == "local" and r["epsilon"] == eps}
        dist = {r["seed"]: r for r in runs if r["kind"] == "distributed" and r["epsilon"] == eps}
        seeds = sorted(set(local) & set(dist))
        if not seeds:
            continue
        z, n = dist[seeds[0]]["noise_multiplier"], dist[seeds[0]]["sites"]
        entry = {"epsilon": eps, "seeds": seeds, "noise_multiplier": z, "sites": n,
                 "site_epsilon": {"local": local[seeds[0]]["site_epsilon"], "distributed": dist[seeds[0]]["site_epsilon"]},
                 # per-coordinate noise sd of one round's global mean
                 "mean_noise_sd": {"local": z * settings.clipping_norm / math.sqrt(n), "distributed": z * settings.clipping_norm / n}}
        for metric in ("accuracy", "auc"):
            diff = [dist[s][metric] - local[s][metric] for s in seeds]
            mean, sd = _mean_sd(diff)
            entry[metric] = {
                "local": _mean_sd([local[s][metric] for s in seeds]),
                "distributed": _mean_sd([dist[s][metric] for s in seeds]),
                "difference": {"mean": mean, "sd": sd, "se": sd / math.sqrt(len(seeds)), "per_seed": diff,
                               "distributed_better": sum(d > 0 for d in diff), "equal": sum(d == 0 for d in diff)},
            }
        out.append(entry)
    return out


def print_tables(settings: Settings, rows: dict, comparisons: list[dict]) -> None:
    pooled = rows.get("pooled", {}).get("accuracy", {}).get("mean", math.nan)
    seeds = next(iter(rows.values()))["seeds"]
    print("\nlocal against distributed Gaussian DP on FLamby Fed-Heart-Disease (4 hospitals), in process, real CKKS")
    print(f"seeds {seeds}; {settings.rounds} rounds of {settings.local_steps} local steps ({JOB}'s training), "
          f"equal weights; C = {settings.clipping_norm:g}, delta {settings.delta:g}; ratio = accuracy / pooled (means)")
    sites = sorted(next(iter(rows.values()))["per_hospital"])
    header = f"{'row':<32} {'accuracy':>8} {'sd':>6} {'ratio':>6} {'AUC':>6} {'sd':>6} {'z':>7} {'z/site':>7}   " + " ".join(f"{s:>7}" for s in sites)
    print(header)
    print("-" * len(header))
    for label, row in rows.items():
        acc, auc = row["accuracy"], row["auc"]
        z = f"{row['noise_multiplier']:.3f}" if "noise_multiplier" in row else "-"
        zs = f"{row['site_noise_multiplier']:.3f}" if "site_noise_multiplier" in row else "-"
        print(f"{label:<32} {acc['mean']:>8.3f} {acc['sd']:>6.3f} {acc['mean'] / pooled:>6.3f} {auc['mean']:>6.3f} {auc['sd']:>6.3f} "
              f"{z:>7} {zs:>7}   " + " ".join(f"{row['per_hospital'][s]:>7.3f}" for s in sites))
    print("\nhospitals: site-1 Cleveland, site-2 Hungary, site-3 Switzerland, site-4 VA Long Beach")
    print("\nat the same per-site epsilon against the server (distributed - local, paired by seed; mean +- sd, se):")
    for c in comparisons:
        acc, auc = c["accuracy"], c["auc"]
        d, e = acc["difference"], auc["difference"]
        print(
            f"  eps {c['epsilon']:g} (z {c['noise_multiplier']:.3f}, spent {c['site_epsilon']['local']:.3f} / "
            f"{c['site_epsilon']['distributed']:.3f}; noise sd of the mean {c['mean_noise_sd']['local']:.4f} -> "
            f"{c['mean_noise_sd']['distributed']:.4f} per coordinate): accuracy {acc['local'][0]:.3f} +- {acc['local'][1]:.3f} -> "
            f"{acc['distributed'][0]:.3f} +- {acc['distributed'][1]:.3f}, difference {d['mean']:+.3f} +- {d['sd']:.3f} "
            f"(se {d['se']:.3f}, better in {d['distributed_better']}/{len(c['seeds'])} seeds); AUC {auc['local'][0]:.3f} -> "
            f"{auc['distributed'][0]:.3f}, difference {e['mean']:+.3f} +- {e['sd']:.3f} (se {e['se']:.3f})"
        )
    errors = [row["ckks_max_abs_error"] for row in rows.values() if "ckks_max_abs_error" in row]
    if errors:
        verdict = "PASS" if max(errors) < CKKS_TOLERANCE else "FAIL"
        print(f"\n{verdict}  CKKS: largest |decrypted global - (previous + plaintext mean)| over all rounds and runs "
              f"{max(errors):.2e} (tolerance {CKKS_TOLERANCE:g})")


# --- main -------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 rounds, 5 pooled epochs, eps 10: a smoke test")
    parser.add_argument("--seeds", type=int, nargs="+", help=f"default {SEEDS[0]}-{SEEDS[-1]}")
    parser.add_argument("--epsilons", type=float, nargs="+", help=f"per-site epsilons at delta {heart.DP_DELTA:g} (default {list(EPSILONS)})")
    parser.add_argument(
        "--jobs", type=int, default=None,
        help="runs at a time, one thread each (default 2, or the cores if fewer; 1 with --quick); 1 runs in this process",
    )
    parser.add_argument("--json", help="write every run and the tables here")
    args = parser.parse_args(argv)
    if args.jobs is None:
        args.jobs = 1 if args.quick else max(1, min(2, os.cpu_count() or 1))
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.seeds is not None and (any(s < 0 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds)):
        parser.error(f"--seeds must be distinct ints >= 0, got {args.seeds}")
    if args.epsilons is not None and any(not math.isfinite(e) or e <= 0 for e in args.epsilons):
        parser.error(f"--epsilons must be positive finite numbers, got {args.epsilons}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    seeds = tuple(args.seeds) if args.seeds else (SEEDS[:1] if args.quick else SEEDS)
    epsilons = tuple(args.epsilons) if args.epsilons else ((10.0,) if args.quick else EPSILONS)
    settings = job_settings(2 if args.quick else ROUNDS, 5 if args.quick else heart.EPOCHS_CENTRAL)

    from medflare.data.heart_disease import write_heart_sites

    started = time.perf_counter()
    workspace = tempfile.mkdtemp(prefix="medflare_ddp_bench_")
    data_dir = os.path.join(workspace, "data")
    write_heart_sites(data_dir)
    contexts = nvflare_contexts()
    print(f"# local vs distributed DP, heart disease: seeds {list(seeds)}, eps {list(epsilons)}, {settings.rounds} rounds, "
          f"{args.jobs} runs at a time; load average {os.getloadavg()[0]:.2f}", flush=True)
    work = [(settings, row, seed, data_dir, contexts if row.kind == "distributed" else None) for row in rows_of(epsilons) for seed in seeds]
    try:
        runs = _run_all(work, args.jobs)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    wall = time.perf_counter() - started

    rows = summarise(settings, epsilons, runs)
    comparisons = compare(settings, epsilons, runs)
    print_tables(settings, rows, comparisons)
    print(f"\nwall time {wall:.0f} s ({len(runs)} runs, {args.jobs} at a time; median run {np.median([r['seconds'] for r in runs]):.1f} s)")
    ckks_ok = all(row["ckks_max_abs_error"] < CKKS_TOLERANCE for row in rows.values() if "ckks_max_abs_error" in row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": asdict(settings), "job": JOB, "seeds": list(seeds), "epsilons": list(epsilons),
                       "ckks_tolerance": CKKS_TOLERANCE, "wall_seconds": wall, "rows": rows, "comparisons": comparisons,
                       "runs": runs}, f, indent=2)
    finite = all(math.isfinite(r["accuracy"]) for r in runs)
    return 0 if finite and ckks_ok else 1


if __name__ == "__main__":
    sys.exit(main())
