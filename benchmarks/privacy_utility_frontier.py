"""The privacy-utility frontier of Li et al. 2019 on BraTS-layout hospitals (`make bench-frontier`).

Every row trains the same network with the same trainer, the same budget of local epochs and the
same seeds on hospitals from ``medflare data brats`` (more sites and subjects than the demo), and
is scored on the pooled validation subjects of all sites:

============================  ===============================================================
row                           what is trained
============================  ===============================================================
centralized                   one model on the pooled training subjects of all sites, E epochs
site alone                    each site's own model on its own subjects, E epochs (the mean over sites is the row)
FedAvg                        R rounds of e local epochs (R e = E), updates averaged by number of training cases
sharing 100/60/40/10 %        FedAvg where each site sends only the largest fraction of its update
                              (``share_largest_fraction``, the computation of ``PercentileSharingFilter``)
Gaussian DP, site eps 8/30    each update clipped to L2 norm C and noised (``gaussian_release``), the noise
                              calibrated so that R releases spend eps at delta 1e-5 per *site*
distributed DP, site eps 8/30 the Gaussian DP row with the noise shared among the N sites under secure
                              aggregation (``medflare.privacy.distributed_dp``): the same C, the same z
                              for the same R releases and eps, the same seeds and noise draws, but each
                              site adds z/sqrt(N) of it (``site_noise_multiplier``), so the sum of the N
                              releases, all the server sees, carries z: the same eps per site against
                              the server, with sqrt(N) less noise in the global mean
DP-SGD, patient eps 1/4/8     every local step is DP-SGD (per-patient clipping, Poisson sampling, noise);
                              each site's noise multiplier is calibrated to its own sample rate and steps
                              so that each of its *patients* spends eps at delta 1e-5 over the whole run
============================  ===============================================================

The network is medflare's ``SeededDPSegResNet`` (GroupNorm, no running statistics) in every row,
so that the only difference between rows is the privacy mechanism. The federated rows run the
round loop in one process, calling the same pure functions the filters call; NVFlare's transport
and the site's policy are exercised by the shipped jobs' simulator and POC tests, not here.
Aggregation is as medflare's ``ValidatedAggregator``: weighted by training cases when the scope
releases them (FedAvg, sharing), equal weights when it withholds them (both DP rows, whose
``release_meta`` is empty). Noise is seeded here, for reproducible rows (the shipped scopes draw
it from the operating system).

The distributed DP rows average the N noised updates in plaintext: that is what the server's
CKKS mean decrypts to (``medflare.transport.ckks_update``: an absolute error of about 3e-8 on
updates of this size, a few float32 steps of a weight, far below the noise of either row).
Encrypting this network's 1.2M parameters at every site and round would double a run's time;
``benchmarks/distributed_dp.py`` runs the real CKKS arithmetic on the heart-disease model.

Printed: Dice per region (TC, WT, ET) and their mean, mean +- sd over seeds, and the ratio of the
mean Dice to the same seed's centralized run (mean +- sd), with the issue's targets as PASS/FAIL
lines. Saved in ``--out``: ``frontier.json`` (every run), ``dice_vs_fraction_shared.png`` and
``dice_vs_epsilon.png``.

Reference: W. Li et al., "Privacy-preserving Federated Brain Tumour Segmentation", MLMI 2019
(arXiv:1910.00962): 13 BraTS sites, partial sharing of 40 % and 10 % reached the Dice of
training on the pooled data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from typing import Optional

REGIONS = ("tc", "wt", "et")
DELTA = 1e-5


@dataclass(frozen=True)
class FrontierConfig:
    """One size of the benchmark.

    Attributes:
        sites, cases_per_site, size: the hospitals (``medflare data brats --sites --cases --size``).
        rounds, local_epochs: R and e; every row trains E = R e epochs of its data.
        seeds: seeds of the network's initialisation, crops, sampling and noise.
        batch_size: crops per non-private step; also DP-SGD's expected patients per step.
        learning_rate: Adam's, in every row.
        gaussian_clip: C of the site-level Gaussian rows (the typical norm of one round's update
            is printed by the FedAvg rows, measured in the same run).
        max_grad_norm: C of DP-SGD, per patient and step.
        fractions, gaussian_epsilons, distributed_epsilons, dp_sgd_epsilons: the frontier's
            points (``distributed_epsilons`` should be among ``gaussian_epsilons``: the rows
            are compared in pairs).
    """

    sites: int
    cases_per_site: int
    size: int
    rounds: int
    local_epochs: int
    seeds: tuple
    batch_size: int = 2
    learning_rate: float = 0.005
    gaussian_clip: float = 1.0
    max_grad_norm: float = 1.0
    fractions: tuple = (1.0, 0.6, 0.4, 0.1)
    gaussian_epsilons: tuple = (8.0, 30.0)
    distributed_epsilons: tuple = (8.0, 30.0)
    dp_sgd_epsilons: tuple = (1.0, 4.0, 8.0)


#: the full run (`make bench-frontier`): 51 runs, about 37 minutes on 2 cores (45 runs in 33
#: minutes measured 2026-12-01, before the distributed DP rows; ~70 s a run)
FULL = FrontierConfig(sites=6, cases_per_site=8, size=32, rounds=8, local_epochs=1, seeds=(0, 1, 2))
QUICK = FrontierConfig(
    sites=3, cases_per_site=4, size=16, rounds=2, local_epochs=1, seeds=(0,),
    fractions=(1.0, 0.1), gaussian_epsilons=(30.0,), distributed_epsilons=(30.0,), dp_sgd_epsilons=(8.0,),
)
#: the kinds of row, for ``--rows``
KINDS = ("centralized", "site_alone", "fedavg", "sharing", "gaussian", "distributed", "dp_sgd")


@dataclass(frozen=True)
class Row:
    """One row of the table: ``kind`` with its parameter (fraction shared or epsilon)."""

    kind: str
    value: Optional[float] = None

    @property
    def label(self) -> str:
        if self.kind == "sharing":
            return f"sharing {self.value:.0%}"
        if self.kind == "gaussian":
            return f"Gaussian DP, site eps {self.value:g}"
        if self.kind == "distributed":
            return f"distributed DP, site eps {self.value:g}"
        if self.kind == "dp_sgd":
            return f"DP-SGD, patient eps {self.value:g}"
        return {"centralized": "centralized", "site_alone": "site alone (mean of sites)", "fedavg": "FedAvg"}[self.kind]


def rows_of(config: FrontierConfig, kinds=KINDS) -> list[Row]:
    """The rows of ``config``, only those of ``kinds``."""
    rows = (
        [Row("centralized"), Row("site_alone"), Row("fedavg")]
        + [Row("sharing", f) for f in config.fractions]
        + [Row("gaussian", e) for e in config.gaussian_epsilons]
        + [Row("distributed", e) for e in config.distributed_epsilons]
        + [Row("dp_sgd", e) for e in config.dp_sgd_epsilons]
    )
    return [row for row in rows if row.kind in kinds]


# --- one run, in a worker process -------------------------------------------------------------


def _site_files(data_configs: dict) -> dict:
    from medflare.data.brats_layout import load_datalist
    from medflare.data.site_data_config import read_site_data_config

    files = {}
    for site, path in sorted(data_configs.items()):
        config = read_site_data_config(path)
        files[site] = load_datalist(config.datalist, config.data_root)
    return files


def _network(seed: int):
    from medflare.training.seeded_networks import SeededDPSegResNet

    return SeededDPSegResNet(
        spatial_dims=3, in_channels=4, out_channels=3, init_filters=8,
        blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], dropout_prob=0.0, seed=seed,
    )


def _trainer(config: FrontierConfig, train_files, val_files, seed: int, dp_sgd=None):
    from medflare.training.segmentation_trainer import SegmentationTrainer

    roi = min(32, config.size)
    return SegmentationTrainer(
        _network(seed), train_files, val_files, roi_size=(roi,) * 3, val_roi_size=(roi,) * 3,
        batch_size=config.batch_size, learning_rate=config.learning_rate, device="auto", amp=True,
        seed=seed, crops_per_patient=1, dp_sgd=dp_sgd,
    )


def _dice(scores: dict) -> dict:
    return {r: scores[f"dice_{r}"] for r in REGIONS} | {"mean": scores["dice_mean"]}


def dp_sgd_plan(config: FrontierConfig, epsilon: float, sizes: dict) -> dict:
    """Per site: ``(noise multiplier, q, steps)`` that spend ``epsilon`` per patient over the run.

    q = m / N with m the batch size and N the site's training patients; steps = R e ceil(1/q),
    what ``SegmentationTrainer.train(epochs=e)`` takes per round. The noise multiplier is what an
    executor given ``dp_sgd.target_epsilon`` solves (:func:`medflare.privacy.dp_sgd.settings_for_target`);
    sites of equal size share one calibration (Opacus's ``get_noise_multiplier``, a few seconds each).
    """
    from medflare.privacy.dp_sgd import DPSGDTarget, patient_sample_rate, settings_for_target, steps_per_epoch

    target = DPSGDTarget(epsilon, config.max_grad_norm, config.batch_size, target_delta=DELTA)
    plan, cache = {}, {}
    for site, n in sorted(sizes.items()):
        q = patient_sample_rate(config.batch_size, n)
        steps = config.rounds * config.local_epochs * steps_per_epoch(q)
        if (q, steps) not in cache:
            cache[(q, steps)] = settings_for_target(target, q, steps).noise_multiplier
        plan[site] = (cache[(q, steps)], q, steps)
    return plan


def run_one(config: FrontierConfig, row: Row, seed: int, data_configs: dict, plan: Optional[dict] = None) -> dict:
    """Train one row at one seed (``plan``: :func:`dp_sgd_plan` for a DP-SGD row); returns its
    Dice and what it spent."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from medflare.privacy.dp_sgd import dp_sgd_epsilon
    from medflare.privacy.gaussian_mechanism import gaussian_release, l2_norm
    from medflare.privacy.accounting import epsilon_spent, noise_multiplier_for
    from medflare.privacy.distributed_dp import site_noise_multiplier
    from medflare.privacy.noise_sources import SeededGaussianNoise
    from medflare.privacy.percentile_sharing import share_largest_fraction

    start = time.perf_counter()
    files = _site_files(data_configs)
    pooled_val = [v for _, (_, val) in sorted(files.items()) for v in val]
    epochs = config.rounds * config.local_epochs
    out = {"row": row.label, "kind": row.kind, "value": row.value, "seed": seed}

    if row.kind == "centralized":
        pooled_train = [t for _, (train, _) in sorted(files.items()) for t in train]
        trainer = _trainer(config, pooled_train, pooled_val, seed)
        trainer.train(epochs=epochs)
        out["dice"] = _dice(trainer.validate())
    elif row.kind == "site_alone":
        per_site = {}
        for site, (train, _) in sorted(files.items()):
            trainer = _trainer(config, train, pooled_val, seed)
            trainer.train(epochs=epochs)
            per_site[site] = _dice(trainer.validate())
        out["per_site"] = per_site
        out["dice"] = {k: float(np.nanmean([d[k] for d in per_site.values()])) for k in (*REGIONS, "mean")}
    else:
        from medflare.privacy.dp_sgd import DPSGDSettings

        dp = {
            site: (DPSGDSettings(z, config.max_grad_norm, config.batch_size, secure_noise=False), q, steps)
            for site, (z, q, steps) in (plan or {}).items()
        }
        trainers = {
            site: _trainer(config, train, pooled_val, seed, dp_sgd=dp[site][0] if dp else None)
            for site, (train, _) in sorted(files.items())
        }
        sizes = {site: t.num_train_cases for site, t in trainers.items()}
        weighted = row.kind in ("fedavg", "sharing")
        noised = row.kind in ("gaussian", "distributed")
        # z is charged to every site in both rows; under distributed DP each site adds z/sqrt(N) of it
        z_site = noise_multiplier_for(row.value, DELTA, config.rounds) if noised else None
        z_release = site_noise_multiplier(z_site, len(trainers)) if row.kind == "distributed" else z_site
        evaluator = next(iter(trainers.values()))
        global_weights = evaluator.get_weights()
        norms, steps = [], {site: 0 for site in trainers}
        for rnd in range(config.rounds):
            released = {}
            for index, (site, trainer) in enumerate(trainers.items()):
                trainer.set_weights(global_weights)
                result = trainer.train(epochs=config.local_epochs)
                steps[site] += result.steps
                update = trainer.weight_diff(trainer.get_weights(), global_weights)
                norms.append(l2_norm(update))
                if row.kind == "sharing":
                    update, _ = share_largest_fraction(update, row.value, None)
                elif noised:  # the same draws in both rows, scaled by z or z/sqrt(N)
                    noise = SeededGaussianNoise(seed * 1_000_003 + rnd * 101 + index)
                    update, _ = gaussian_release(update, config.gaussian_clip, z_release, noise)
                released[site] = update
            # equal weights for the DP rows: for distributed DP the mean of the N noised updates,
            # what the server's CKKS mean decrypts to (module docstring)
            total = sum(sizes.values()) if weighted else len(released)
            global_weights = {
                k: v + sum((sizes[s] if weighted else 1) * released[s][k] for s in released) / total
                for k, v in global_weights.items()
            }
        evaluator.set_weights(global_weights)
        out["dice"] = _dice(evaluator.validate())
        out["update_norm_median"] = float(statistics.median(norms))
        if noised:
            out["noise_multiplier"] = z_site
            out["site_noise_multiplier"] = z_release
            out["sites"] = len(trainers)
            out["num_parameters"] = int(sum(np.size(v) for v in global_weights.values()))
            out["site_epsilon"] = epsilon_spent([(z_site, config.rounds)], DELTA)
        if row.kind == "dp_sgd":
            out["patient_epsilon"] = {
                site: dp_sgd_epsilon(settings.noise_multiplier, q, steps[site], DELTA)
                for site, (settings, q, _) in dp.items()
            }
            out["noise_multiplier"] = {site: settings.noise_multiplier for site, (settings, _, _) in dp.items()}
            out["steps"] = steps
    out["seconds"] = time.perf_counter() - start
    return out


def run_key(config: FrontierConfig, row: Row, seed: int) -> str:
    """What determines one run's result: the config without its seed list, the row and the seed."""
    settings = {k: v for k, v in asdict(config).items() if k != "seeds"}
    return json.dumps({"config": settings, "row": row.label, "seed": seed}, sort_keys=True)


def load_finished(path: str) -> dict:
    """Runs already in ``path`` (one JSON object per line, each with its ``key``); a torn last
    line (an interrupted run) is ignored."""
    finished = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    run = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(run, dict) and "key" in run:
                    finished[run["key"]] = run
    return finished


def _init_worker():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import logging

    logging.disable(logging.WARNING)


# --- the table --------------------------------------------------------------------------------


def _mean_sd(values) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def summarise(config: FrontierConfig, runs: list[dict]) -> tuple[str, dict]:
    """The markdown table, and per row the mean ratio to centralized (for the targets)."""
    central = {r["seed"]: r["dice"]["mean"] for r in runs if r["kind"] == "centralized"}
    fedavg = {r["seed"]: r["dice"]["mean"] for r in runs if r["kind"] == "fedavg"}
    lines = [
        "| row | Dice TC | Dice WT | Dice ET | mean Dice | / centralized | / FedAvg |",
        "|---|---|---|---|---|---|---|",
    ]
    ratios = {}
    for row in rows_of(config):
        mine = [r for r in runs if r["row"] == row.label]
        if not mine:
            continue
        to_central = [r["dice"]["mean"] / central[r["seed"]] for r in mine if r["seed"] in central]
        to_fedavg = [r["dice"]["mean"] / fedavg[r["seed"]] for r in mine if r["seed"] in fedavg]
        ratios[row.label] = {
            "central": statistics.mean(to_central) if to_central else math.nan,
            "fedavg": statistics.mean(to_fedavg) if to_fedavg else math.nan,
        }
        cells = [_mean_sd([r["dice"][k] for r in mine]) for k in (*REGIONS, "mean")]
        lines.append(f"| {row.label} | " + " | ".join(cells) + f" | {_mean_sd(to_central)} | {_mean_sd(to_fedavg)} |")
    return "\n".join(lines), ratios


TARGETS = (
    # (row label, against, at least)
    ("FedAvg", "central", 0.98),
    ("sharing 40%", "central", 0.97),
    ("sharing 10%", "central", 0.95),
    ("DP-SGD, patient eps 1", "fedavg", 0.8),
    ("DP-SGD, patient eps 4", "fedavg", 0.8),
    ("DP-SGD, patient eps 8", "fedavg", 0.8),
)


def target_lines(ratios: dict) -> list[str]:
    lines = []
    for label, against, bound in TARGETS:
        if label not in ratios:
            continue
        value = ratios[label][against]
        verdict = "PASS" if value >= bound else "FAIL"
        name = "centralized" if against == "central" else "non-private FedAvg"
        lines.append(f"{verdict}  {label}: {value:.3f}x {name} mean Dice (target >= {bound}x)")
    return lines


def privacy_lines(runs: list[dict]) -> list[str]:
    lines = []
    for kind in ("gaussian", "distributed", "dp_sgd"):
        for value in sorted({r["value"] for r in runs if r["kind"] == kind}):
            mine = [r for r in runs if r["kind"] == kind and r["value"] == value]
            if kind == "gaussian":
                r = mine[0]
                lines.append(
                    f"Gaussian DP, site eps {value:g}: noise multiplier {r['noise_multiplier']:.3f} per release, "
                    f"epsilon spent per site {r['site_epsilon']:.2f}; median update norm before clipping "
                    f"{statistics.median(x['update_norm_median'] for x in mine):.3g}"
                )
            elif kind == "distributed":
                r = mine[0]
                lines.append(
                    f"distributed DP, site eps {value:g}: each of {r['sites']} sites adds noise multiplier "
                    f"{r['site_noise_multiplier']:.3f} (z/sqrt({r['sites']})), the sum carries {r['noise_multiplier']:.3f}; "
                    f"epsilon spent per site against the server {r['site_epsilon']:.2f}"
                )
            else:
                eps = [e for r in mine for e in r["patient_epsilon"].values()]
                zs = [z for r in mine for z in r["noise_multiplier"].values()]
                lines.append(
                    f"DP-SGD, patient eps {value:g}: per-patient epsilon spent {min(eps):.2f}-{max(eps):.2f} over sites, "
                    f"noise multiplier {min(zs):.2f}-{max(zs):.2f}"
                )
    fed = [r["update_norm_median"] for r in runs if r["kind"] == "fedavg"]
    if fed:
        lines.append(f"FedAvg: median L2 norm of one site's round update {statistics.median(fed):.3g}")
    return lines


def local_vs_distributed_lines(config: FrontierConfig, runs: list[dict]) -> list[str]:
    """At each epsilon run both ways: the two rows' mean Dice and ratio to centralized, the
    per-seed difference (distributed - local, the same seeds and noise draws), and the noise in
    one round's global mean against the clipped signal.

    With N sites the mean of N local releases has per-coordinate noise sd z C / sqrt(N), the
    distributed mean z C / N; over d parameters its norm is about sd sqrt(d), while the mean
    of the clipped updates has norm at most C.
    """
    central = {r["seed"]: r["dice"]["mean"] for r in runs if r["kind"] == "centralized"}
    lines = []
    for value in sorted({r["value"] for r in runs if r["kind"] == "distributed"}):
        pair = {kind: {r["seed"]: r for r in runs if r["kind"] == kind and r["value"] == value} for kind in ("gaussian", "distributed")}
        if not pair["gaussian"]:
            continue
        cells = []
        for kind, name in (("gaussian", "local"), ("distributed", "distributed")):
            mine = list(pair[kind].values())
            ratio = [r["dice"]["mean"] / central[r["seed"]] for r in mine if r["seed"] in central]
            cells.append(f"{name} {_mean_sd([r['dice']['mean'] for r in mine])} ({_mean_sd(ratio)}x centralized)")
        seeds = sorted(set(pair["gaussian"]) & set(pair["distributed"]))
        diff = [pair["distributed"][s]["dice"]["mean"] - pair["gaussian"][s]["dice"]["mean"] for s in seeds]
        r = next(iter(pair["distributed"].values()))
        n, z, c, d = r["sites"], r["noise_multiplier"], config.gaussian_clip, r["num_parameters"]
        lines.append(
            f"site eps {value:g}, local vs distributed: mean Dice {cells[0]} vs {cells[1]}; distributed - local "
            f"{_mean_sd(diff)} over seeds {seeds}; noise norm of one round's global mean ~ {z * c / math.sqrt(n) * math.sqrt(d):.3g} "
            f"(local, z C sqrt(d/N)) vs {z * c / n * math.sqrt(d):.3g} (distributed, z C sqrt(d)/N), signal at most C = {c:g}"
        )
    return lines


def plot(config: FrontierConfig, runs: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean_sd(kind, value=None):
        values = [r["dice"]["mean"] for r in runs if r["kind"] == kind and (value is None or r["value"] == value)]
        values = [v for v in values if math.isfinite(v)]
        return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0) if values else (math.nan, 0.0)

    def references(ax):
        for kind, style, label in (("centralized", "k--", "centralized"), ("fedavg", "b:", "FedAvg"), ("site_alone", "r-.", "site alone")):
            m, _ = mean_sd(kind)
            if math.isfinite(m):
                ax.axhline(m, linestyle=style[1:], color=style[0], label=label)

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    fractions = sorted(config.fractions)
    points = [mean_sd("sharing", f) for f in fractions]
    ax.errorbar([100 * f for f in fractions], [p[0] for p in points], yerr=[p[1] for p in points], marker="o", label="partial sharing")
    references(ax)
    ax.set_xlabel("fraction of each update shared (%)")
    ax.set_ylabel("mean Dice (pooled validation)")
    ax.set_title(f"{config.sites} BraTS-layout sites, {len(config.seeds)} seeds")
    ax.legend(loc="center right", fontsize=8, framealpha=0.9)
    paths.append(os.path.join(out_dir, "dice_vs_fraction_shared.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, label in (
        ("gaussian", "Gaussian DP, local noise (one site's data)"),
        ("distributed", "Gaussian DP, noise shared under secure agg. (one site's data)"),
        ("dp_sgd", "DP-SGD (one patient)"),
    ):
        values = sorted({r["value"] for r in runs if r["kind"] == kind})
        if not values:
            continue
        points = [mean_sd(kind, v) for v in values]
        ax.errorbar(values, [p[0] for p in points], yerr=[p[1] for p in points], marker="o", label=label)
    references(ax)
    ax.set_xscale("log")
    ax.set_xlabel("epsilon at delta 1e-5 (unit of privacy in the legend)")
    ax.set_ylabel("mean Dice (pooled validation)")
    ax.set_title(f"{config.sites} BraTS-layout sites, {len(config.seeds)} seeds")
    ax.legend(loc="center right", fontsize=8, framealpha=0.9)
    paths.append(os.path.join(out_dir, "dice_vs_epsilon.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


# --- main -------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 small sites, 1 seed, 2 rounds, one point per mechanism: a smoke test")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    parser.add_argument("--sites", type=int, help="override the number of sites")
    parser.add_argument(
        "--rows", nargs="+", choices=KINDS, default=list(KINDS),
        help="run only these kinds of row (default all); e.g. centralized fedavg gaussian distributed: local against distributed DP",
    )
    parser.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="runs at a time (one thread each)")
    parser.add_argument("--out", default=os.path.join("workspace", "bench_frontier"), help="folder for data, JSON and PNGs")
    parser.add_argument("--json", help="also write every run here")
    parser.add_argument("--fresh", action="store_true", help="rerun every run (default: keep the runs of the same settings already in OUT/runs.jsonl)")
    args = parser.parse_args(argv)

    from dataclasses import replace

    config = QUICK if args.quick else FULL
    if args.seeds is not None:
        config = replace(config, seeds=tuple(args.seeds))
    if args.sites is not None:
        config = replace(config, sites=args.sites)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if config.sites < 2:
        parser.error(f"--sites must be >= 2 (a federation to compare with centralized training), got {config.sites}")
    if any(seed < 0 for seed in config.seeds) or len(set(config.seeds)) != len(config.seeds):
        parser.error(f"--seeds must be distinct ints >= 0, got {list(config.seeds)}")

    from medflare.data.brats_synthetic import generate_sites

    os.makedirs(args.out, exist_ok=True)
    data_dir = os.path.join(args.out, f"data_{config.sites}x{config.cases_per_site}_{config.size}")
    data_configs = generate_sites(data_dir, config.sites, cases_per_site=config.cases_per_site, size=config.size, seed=0)
    print(f"# privacy-utility frontier: {config.sites} sites x ~{config.cases_per_site} subjects at {config.size}^3, "
          f"{config.rounds} rounds x {config.local_epochs} local epochs (E = {config.rounds * config.local_epochs}), "
          f"seeds {list(config.seeds)}, {args.jobs} runs at a time; load average {os.getloadavg()[0]:.2f}", flush=True)

    rows = rows_of(config, args.rows)
    sizes = {site: len(train) for site, (train, _) in _site_files(data_configs).items()}
    plans = {row.value: dp_sgd_plan(config, row.value, sizes) for row in rows if row.kind == "dp_sgd"}
    cost = {"dp_sgd": 3, "site_alone": 1, "centralized": 1}
    work = sorted(((row, seed) for row in rows for seed in config.seeds), key=lambda rs: -cost.get(rs[0].kind, 1))
    start = time.perf_counter()
    runs_path = os.path.join(args.out, "runs.jsonl")
    finished = {} if args.fresh else load_finished(runs_path)
    runs = []
    for row, seed in list(work):
        key = run_key(config, row, seed)
        if key in finished:
            runs.append(finished[key])
            work.remove((row, seed))
            print(f"  {row.label:<28} seed {seed}: mean Dice {finished[key]['dice']['mean']:.3f} (kept from {runs_path})")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool, open(
        runs_path, "a"
    ) as log:
        futures = {
            pool.submit(run_one, config, row, seed, data_configs, plans.get(row.value) if row.kind == "dp_sgd" else None): (row, seed)
            for row, seed in work
        }
        for future in as_completed(futures):
            row, seed = futures[future]
            run = future.result()
            runs.append(run)
            log.write(json.dumps({"key": run_key(config, row, seed), **run}) + "\n")
            log.flush()
            print(f"  {row.label:<28} seed {seed}: mean Dice {run['dice']['mean']:.3f} ({run['seconds']:.0f} s)", flush=True)
    wall = time.perf_counter() - start

    table, ratios = summarise(config, runs)
    print()
    print(table)
    print()
    for line in privacy_lines(runs) + local_vs_distributed_lines(config, runs) + target_lines(ratios):
        print(line)
    paths = plot(config, runs, args.out)
    result = {"config": asdict(config), "rows": list(args.rows), "wall_seconds": wall, "runs": runs, "ratios": ratios}
    for path in [os.path.join(args.out, "frontier.json")] + ([args.json] if args.json else []):
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    print(f"\nwall time {wall:.0f} s; wrote {', '.join(paths)} and {os.path.join(args.out, 'frontier.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
