"""FLamby's Fed-Heart-Disease benchmark, run through medflare on NVFlare.

The protocol of FLamby (Ogier du Terrail et al., NeurIPS 2022 Datasets and Benchmarks;
``flamby/datasets/fed_heart_disease`` and ``flamby/config_heart_disease.json``):

* data: the UCI Heart Disease records of four hospitals as ``medflare data heart`` writes them
  (per-hospital 66/34 split, 13 inputs, binary target, per-hospital standardisation);
* model: logistic regression (``OutcomeNet`` with a table and no hidden layer), seeded;
* **local i** and **pooled**: Adam, learning rate 1e-3, batch 4, 50 epochs, on hospital i's
  training data or on all of it (no federation: these are trained with the same
  ``OutcomeTrainer`` the sites use);
* **FedAvg**: 15 rounds (``get_nb_max_rounds(100)``) of 100 local SGD steps, batch 4,
  learning rate 1e-3, averaged weighted by training cases: ``jobs/heart_disease_fedavg`` in
  the NVFlare simulator;
* **FedYogi**: the same with local SGD at 0.003162 and the server's Yogi at 0.01,
  betas (0.9, 0.999), tau 1e-8: ``jobs/heart_disease_fedyogi``;
* **FedAvg + Gaussian DP** (medflare's, not in FLamby): the FedAvg job with
  ``GaussianPrivacyFilter`` at every site, clipping the update to L2 norm 0.05 (about the
  size of a round's update) and noise calibrated so that the 15 releases spend epsilon in
  {1, 5, 10} at delta 1e-5 (the site-level guarantee: a whole hospital's data is the unit);
* metric: accuracy at threshold 0.5 of the final model on each hospital's test set, averaged
  over hospitals; seeds 42-46 (model initialisation and shuffling).

It prints mean and standard deviation over seeds beside FLamby's published means, and each
method's ratio to pooled training measured in the same run.

    python benchmarks/heart_disease.py                 # 5 seeds, about 20 minutes on 2 cores
    python benchmarks/heart_disease.py --quick         # 1 seed, shortened, no plain FedAvg: a smoke test
    python benchmarks/heart_disease.py --json results.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: FLamby's published mean accuracy over the four hospitals' test sets
FLAMBY = {"pooled": 0.735, "fedavg": 0.685, "fedyogi": 0.731, "best local": 0.722}
DP_EPSILONS = (1.0, 5.0, 10.0)
DP_CLIPPING_NORM = 0.05
EPOCHS_CENTRAL = 50


def _cases(data_dir: str) -> dict[str, dict]:
    from medflare.data.heart_disease import INPUTS
    from medflare.data.outcome_table import load_outcome_table

    out = {}
    for n in range(1, 5):
        site = os.path.join(data_dir, f"site-{n}")
        out[f"site-{n}"] = load_outcome_table(os.path.join(site, "cases.csv"), site, INPUTS, ["label"])
    return out


def _evaluator(cases: dict[str, dict]):
    """A function scoring a state dict on every hospital's test set: {site: accuracy}."""
    from medflare.training.outcome_networks import OutcomeNet
    from medflare.training.outcome_trainer import OutcomeTrainer

    trainers = {
        site: OutcomeTrainer(OutcomeNet(1, 13, None, clinical_hidden=[]), c["train"], c["test"], ["label"], device="cpu")
        for site, c in cases.items()
    }

    def evaluate(weights) -> dict[str, float]:
        scores = {}
        for site, trainer in trainers.items():
            trainer.set_weights(weights)
            scores[site] = trainer.validate()["accuracy"]
        return scores

    return evaluate


def _train_central(train_cases, test_cases, seed: int, epochs: int) -> dict:
    from medflare.training.outcome_networks import OutcomeNet
    from medflare.training.outcome_trainer import OutcomeTrainer

    trainer = OutcomeTrainer(
        OutcomeNet(1, 13, None, clinical_hidden=[], seed=seed), train_cases, test_cases, ["label"],
        batch_size=4, learning_rate=1e-3, optimizer="adam", device="cpu", seed=seed,
    )
    trainer.train(epochs=epochs)
    return trainer.get_weights()


def _job_copy(job: str, dest: str, seed: int, rounds: int, epsilon) -> str:
    """The shipped job with this seed, ``rounds`` rounds, no cross-site evaluation (the final
    model is scored here), and for DP the Gaussian filter at every site."""
    from medflare.cli.run_job import set_num_rounds

    shutil.copytree(os.path.join(REPO, "jobs", job), dest)
    name = os.path.basename(dest)
    meta_path = os.path.join(dest, "meta.json")
    meta = json.load(open(meta_path))
    meta["name"] = name
    json.dump(meta, open(meta_path, "w"), indent=2)
    server_path = os.path.join(dest, "app", "config", "config_fed_server.json")
    server = json.load(open(server_path))
    set_num_rounds(server, rounds)
    server["model_args"]["seed"] = seed
    server["workflows"] = [w for w in server["workflows"] if "CrossSiteModelEval" not in w["path"]]
    json.dump(server, open(server_path, "w"), indent=2)
    client_path = os.path.join(dest, "app", "config", "config_fed_client.json")
    client = json.load(open(client_path))
    args = client["executors"][0]["executor"]["args"]
    args["model"]["args"]["seed"] = seed
    args["seed"] = seed
    args["local_model"] = "last_round"
    if epsilon is not None:
        client["task_result_filters"] = [
            {
                "tasks": ["train"],
                "filters": [
                    {
                        "path": "medflare.filters.gaussian_privacy.GaussianPrivacyFilter",
                        "args": {
                            "clipping_norm": DP_CLIPPING_NORM,
                            "target_epsilon": epsilon,
                            "num_rounds": rounds,
                            "target_delta": 1e-5,
                            "max_epsilon": epsilon * 1.001,
                        },
                    }
                ],
            }
        ]
    json.dump(client, open(client_path, "w"), indent=2)
    return dest


def _run_federated(job_dir: str, data_dir: str, workspace: str) -> dict:
    import torch

    from medflare.cli.run_job import RunOptions, run_job

    result = run_job(RunOptions(job_dir=job_dir, sites=4, workspace=workspace, data_dir=data_dir, threads=4), log=lambda m: None)
    path = os.path.join(result["server_run_dir"], "app_server", "FL_global_model.pt")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    state = saved["model"] if isinstance(saved, dict) and "model" in saved else saved
    return {"weights": {k: np.asarray(v) for k, v in state.items()}, "seconds": result["wall_seconds"]}


def _summary(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values)) if len(values) > 1 else 0.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44, 45, 46])
    parser.add_argument("--quick", action="store_true", help="one seed, 2 rounds, 5 epochs, FedYogi and epsilon 10 only: a smoke test")
    parser.add_argument("--parallel", type=int, default=2, help="simulator runs at a time (default 2)")
    parser.add_argument("--workspace", default=None, help="where data and runs go (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="write every number to this file")
    args = parser.parse_args(argv)
    seeds = args.seeds[:1] if args.quick else args.seeds
    rounds = 2 if args.quick else 15
    epochs = 5 if args.quick else EPOCHS_CENTRAL
    epsilons = (10.0,) if args.quick else DP_EPSILONS

    from medflare.data.heart_disease import write_heart_sites

    started = time.time()
    workspace = args.workspace or tempfile.mkdtemp(prefix="medflare_heart_bench_")
    data_dir = os.path.join(workspace, "data")
    write_heart_sites(data_dir)
    cases = _cases(data_dir)
    evaluate = _evaluator(cases)
    sites = sorted(cases)
    scores: dict[str, list[dict[str, float]]] = {}

    for seed in seeds:
        pooled_train = [c for site in sites for c in cases[site]["train"]]
        scores.setdefault("pooled", []).append(evaluate(_train_central(pooled_train, cases["site-1"]["test"], seed, epochs)))
        for i, site in enumerate(sites):
            weights = _train_central(cases[site]["train"], cases[site]["test"], seed, epochs)
            scores.setdefault(f"local {i}", []).append(evaluate(weights))
    central_seconds = time.time() - started
    print(f"local and pooled training, {len(seeds)} seed(s): {central_seconds:.0f} s", flush=True)

    runs = []
    for seed in seeds:
        if not args.quick:  # plain FedAvg on these hospitals also runs in tests/integration/test_outcome_jobs_simulator.py
            runs.append(("fedavg", "heart_disease_fedavg", seed, None))
        runs.append(("fedyogi", "heart_disease_fedyogi", seed, None))
        for eps in epsilons:
            runs.append((f"fedavg dp eps={eps:g}", "heart_disease_fedavg", seed, eps))
    jobs_dir = os.path.join(workspace, "jobs")
    os.makedirs(jobs_dir, exist_ok=True)
    federated_seconds = []

    def run_one(run):
        method, job, seed, eps = run
        tag = method.replace(" ", "_").replace("=", "")
        dest = _job_copy(job, os.path.join(jobs_dir, f"{tag}_s{seed}"), seed, rounds, eps)
        return method, _run_federated(dest, data_dir, os.path.join(workspace, "ws"))

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        for method, out in pool.map(run_one, runs):
            scores.setdefault(method, []).append(evaluate(out["weights"]))
            federated_seconds.append(out["seconds"])
            print(f"  {method}: {np.mean(list(scores[method][-1].values())):.3f} in {out['seconds']:.0f} s", flush=True)

    rows = {}
    for method, per_seed in scores.items():
        means = [float(np.mean([s[site] for site in sites])) for s in per_seed]
        mean, std = _summary(means)
        rows[method] = {
            "mean": mean,
            "std": std,
            "per_seed": means,
            "per_hospital": {site: float(np.mean([s[site] for s in per_seed])) for site in sites},
        }
    best_local = max((m for m in rows if m.startswith("local")), key=lambda m: rows[m]["mean"])
    pooled = rows["pooled"]["mean"]

    print()
    print("FLamby Fed-Heart-Disease through medflare on NVFlare: mean accuracy over the 4 hospitals' test sets")
    print(f"seeds {seeds}; {rounds} rounds; ratio = method / pooled measured in this run")
    header = f"{'method':<22} {'accuracy':>9} {'sd':>6} {'ratio':>6} {'FLamby':>7}   " + " ".join(f"{s:>7}" for s in sites)
    print(header)
    print("-" * len(header))
    for method, row in rows.items():
        published = FLAMBY.get(method, FLAMBY["best local"] if method == best_local else None)
        print(
            f"{method + (' (best)' if method == best_local else ''):<22} {row['mean']:>9.3f} {row['std']:>6.3f} "
            f"{row['mean'] / pooled:>6.3f} {('%.3f' % published) if published else '-':>7}   "
            + " ".join(f"{row['per_hospital'][s]:>7.3f}" for s in sites)
        )
    print("\nhospitals: site-1 Cleveland, site-2 Hungary, site-3 Switzerland, site-4 VA Long Beach")
    print(
        f"time: local+pooled {central_seconds:.0f} s; {len(federated_seconds)} simulator runs, "
        f"median {np.median(federated_seconds):.0f} s each; total {time.time() - started:.0f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"seeds": seeds, "rounds": rounds, "epochs_central": epochs, "flamby": FLAMBY, "methods": rows,
                 "dp": {"clipping_norm": DP_CLIPPING_NORM, "delta": 1e-5, "epsilons": list(epsilons)}},
                f, indent=2,
            )
    if not args.workspace:
        shutil.rmtree(workspace, ignore_errors=True)
    return 0 if all(math.isfinite(r["mean"]) for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
