"""Memory and step time of the outcome trainer's images held in memory against streamed (`make bench-outcome-data`).

    python benchmarks/outcome_data_memory.py [--quick] [--cases N] [--size S] [--json PATH]

Writes N synthetic 256x256 greyscale PNG radiographs (smooth gradients and noise, drawn with
numpy and saved with PIL; not anatomy) and their outcome table into a temporary folder, then
runs each mode in a fresh Python process and reports, per mode:

* **peak RSS increase** (MiB): ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after building the
  trainer and training, minus its value once torch, MONAI and the network are loaded (so both
  modes pay the same imports and model before the baseline). It includes the training
  activations of a batch, identical in both modes;
* **build seconds**: reading the table and building the trainer (in memory: reading and
  resizing every image; streamed: the quality pass that reads each image once and drops it);
* **step ms**: median wall time of one optimizer step after a warm-up step (streamed: the batch's
  images are read inside the step), and **fetch ms**: the median time to get one batch's
  inputs alone (slicing the tensor, or reading and resizing the batch's images). Step times on
  a shared machine are noisy; the fetch time is the streamed mode's own cost.

and the ratio of the two peaks, against the physical floor of the in-memory images,
:math:`N \\cdot H \\cdot W \\cdot 4` bytes (one float32 tensor). ``--quick`` takes 64 cases and
1 step (CI).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "custom"))

MODES = {
    "in memory": {"data_loading": "memory"},
    "streamed": {"data_loading": "stream"},
}


def write_site(root: str, cases: int, size: int, seed: int = 0) -> str:
    """``cases`` PNGs of ``size`` x ``size`` and ``table.csv`` (80 % train) under ``root``; returns the table."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    y, x = np.mgrid[0:size, 0:size] / size
    rows = []
    for i in range(cases):
        a, b = rng.uniform(-1, 1, 2)
        pixels = 128 + 60 * (a * x + b * y) + rng.normal(0, 20, (size, size))
        name = f"images/case-{i:05d}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(root, name), compress_level=1)
        rows.append({"case_id": f"case-{i:05d}", "split": "train" if i % 5 else "test", "image": name, "label": int(a > 0)})
    table = os.path.join(root, "table.csv")
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case_id", "split", "image", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return table


def network(size: int):
    from medflare.training.outcome_networks import OutcomeNet

    image_network = {
        "path": "monai.networks.nets.ResNet",
        "args": {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [8, 16, 32, 64], "spatial_dims": 2,
                 "n_input_channels": 1, "num_classes": 16},
    }
    return OutcomeNet(num_outputs=1, image_network=image_network, image_features=16, seed=0)


def child(args) -> None:
    """One mode in this (fresh) process; prints one JSON line."""
    import resource

    import torch

    from medflare.data.outcome_table import load_outcome_table
    from medflare.training.outcome_trainer import OutcomeTrainer
    from medflare.training.xray_dataset import _dataset_classes

    _dataset_classes()  # import monai.data before the baseline, in both modes
    model = network(args.size)

    def peak_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    baseline = peak_mib()
    start = time.perf_counter()
    cases = load_outcome_table(args.table, os.path.dirname(args.table), [], ["label"], "image")
    trainer = OutcomeTrainer(
        model, cases["train"], cases["test"], ["label"], image_size=(args.size, args.size), batch_size=args.batch_size,
        device=args.device, seed=0, num_workers=args.num_workers if args.mode == "streamed" else 0, **MODES[args.mode],
    )
    built = time.perf_counter() - start
    after_build = peak_mib()
    trainer.train(steps=1)  # warm-up
    steps = [trainer.train(steps=1).seconds for _ in range(args.steps)]
    fetches = []
    for _ in range(args.steps):  # the batch's inputs alone: slicing the tensor, or reading the images
        start = time.perf_counter()
        for _batch in trainer._batches("train", [list(range(args.batch_size))], augment=False):
            pass
        fetches.append(time.perf_counter() - start)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    print(json.dumps({
        "mode": args.mode,
        "train_cases": trainer.num_train_cases,
        "test_cases": trainer.num_test_cases,
        "baseline_mib": baseline,
        "peak_increase_after_build_mib": after_build - baseline,
        "peak_increase_mib": peak_mib() - baseline,
        "build_s": built,
        "step_s": statistics.median(steps),
        "fetch_s": statistics.median(fetches),
        "device": str(trainer.device),
    }))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 cases, 1 step (CI)")
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--size", type=int, default=256, help="image side, written and trained on")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=0, help="loader processes of the streamed mode")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--table", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode:
        child(args)
        return 0
    if args.quick:
        args.cases, args.steps = 64, 1
    print(f"outcome trainer images in memory against streamed: {args.cases} cases of {args.size}x{args.size}, "
          f"batch {args.batch_size}, {args.steps} timed steps, streamed num_workers={args.num_workers}")
    results = {"cases": args.cases, "size": args.size, "batch_size": args.batch_size, "num_workers": args.num_workers, "modes": {}}
    with tempfile.TemporaryDirectory(prefix="medflare-bench-outcome-data-") as root:
        start = time.perf_counter()
        table = write_site(root, args.cases, args.size)
        results["generate_s"] = time.perf_counter() - start
        print(f"wrote {args.cases} PNGs and the table in {results['generate_s']:.1f} s")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        for mode in MODES:
            command = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--table", table, "--size", str(args.size),
                       "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers),
                       "--device", args.device]
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            results["modes"][mode] = json.loads(done.stdout.strip().splitlines()[-1])
    train_cases = results["modes"]["in memory"]["train_cases"] + results["modes"]["in memory"]["test_cases"]
    floor_mib = train_cases * args.size * args.size * 4 / 2**20
    results["floor_mib"] = floor_mib
    print(f"{'mode':<12} {'peak RSS increase MiB':>22} {'after build MiB':>16} {'build s':>8} {'step ms':>8} {'fetch ms':>9}  device")
    for mode, row in results["modes"].items():
        print(f"{mode:<12} {row['peak_increase_mib']:>22.1f} {row['peak_increase_after_build_mib']:>16.1f} {row['build_s']:>8.2f} "
              f"{1e3 * row['step_s']:>8.1f} {1e3 * row['fetch_s']:>9.1f}  {row['device']}")
    memory, streamed = results["modes"]["in memory"], results["modes"]["streamed"]
    results["peak_ratio"] = memory["peak_increase_mib"] / max(streamed["peak_increase_mib"], 1e-9)
    results["step_ratio"] = streamed["step_s"] / memory["step_s"]
    print(f"ratio in memory / streamed peak RSS increase: {results['peak_ratio']:.1f}x; "
          f"streamed step time / in-memory step time: {results['step_ratio']:.2f}x")
    held = memory["peak_increase_after_build_mib"] - streamed["peak_increase_after_build_mib"]
    results["images_held_mib"] = held
    print(f"physical floor of the in-memory images: {train_cases} x {args.size} x {args.size} x 4 bytes = {floor_mib:.1f} MiB; "
          f"held in memory beyond the streamed build: {held:.1f} MiB ({held / floor_mib:.2f}x the floor)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
