"""Wall time of one DP-SGD step against one non-private step, on this machine (`make bench-dpsgd`).

Three networks of medflare's jobs: (a) the BraTS DP SegResNet on 32^3 crops, 2 patients x 2
crops; (b) the CXR OutcomeNet (ResNet, GroupNorm) at 64x64, 8 patients; (c) the heart job's
logistic regression, 4 patients. For each: the non-private step (one batched forward+backward
and optimizer step), the DP-SGD step (per-sample gradients by torch.func, per-patient clipping,
noise, optimizer step; seeded noise and, for (c), secure noise), and the physical reference
of a per-sample loop (batch size 1 forward+backward, times the batch). ``--quick`` takes fewer
repeats (CI, well under a minute).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from medflare.privacy.dp_sgd import DPSGDSettings
from medflare.training.dp_sgd_step import DPSGDRandomness, DPSGDStep
from medflare.training.outcome_networks import OutcomeNet
from medflare.training.seeded_networks import SeededDPSegResNet


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _call(model, inputs):
    return model(inputs) if torch.is_tensor(inputs) else model(**inputs)


def _take(inputs, i):
    return inputs[i : i + 1] if torch.is_tensor(inputs) else {k: v[i : i + 1] for k, v in inputs.items()}


def case(name, model, inputs, targets, owner, loss_fn, repeats, secure=False):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = len(targets)
    patients = int(owner.max()) + 1

    def plain():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(_call(model, inputs), targets).backward()
        optimizer.step()

    def loop():
        optimizer.zero_grad(set_to_none=True)
        for i in range(batch):
            loss_fn(_call(model, _take(inputs, i)), targets[i : i + 1]).backward()

    settings = DPSGDSettings(1.0, 1.0, patients, secure_noise=secure)
    step = DPSGDStep(model, loss_fn, settings, max(patients, 1), DPSGDRandomness(0, torch.device("cpu")))

    def private():
        optimizer.zero_grad(set_to_none=True)
        step.apply(inputs, targets, owner, patients)
        optimizer.step()

    model.train()
    t_plain = _median_seconds(plain, repeats)
    t_loop = _median_seconds(loop, repeats)
    t_dp = _median_seconds(private, repeats)
    print(
        f"{name:<44} non-private {t_plain * 1e3:9.1f} ms   DP-SGD {t_dp * 1e3:9.1f} ms   "
        f"ratio {t_dp / t_plain:5.2f}x   per-sample loop {t_loop * 1e3:9.1f} ms ({t_loop / t_plain:5.2f}x)"
    )
    return t_plain, t_dp, t_loop


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (CI)")
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else 7
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; median of {repeats}")
    from monai.losses import DiceLoss

    torch.manual_seed(0)
    seg = SeededDPSegResNet(
        seed=0, spatial_dims=3, in_channels=4, out_channels=3, init_filters=8, blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], dropout_prob=0.0
    )
    dice = DiceLoss(smooth_nr=0.0, smooth_dr=1e-5, squared_pred=True, sigmoid=True, batch=True)
    x = torch.randn(4, 4, 32, 32, 32)
    y = (torch.rand(4, 3, 32, 32, 32) > 0.8).float()
    case("(a) BraTS DP SegResNet 32^3, 2 patients x 2 crops", seg, x, y, torch.tensor([0, 0, 1, 1]), dice, repeats)

    cxr = OutcomeNet(
        num_outputs=2,
        clinical_features=8,
        image_network={
            "path": "monai.networks.nets.ResNet",
            "args": {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [16, 32, 64, 128], "spatial_dims": 2,
                     "n_input_channels": 1, "num_classes": 32},
        },
        image_features=32,
        clinical_hidden=[16],
        seed=0,
        norm="group",
    )
    bce = torch.nn.BCEWithLogitsLoss()
    inputs = {"image": torch.randn(8, 1, 64, 64), "clinical": torch.randn(8, 8)}
    case("(b) CXR OutcomeNet ResNet-GN 64x64, 8 patients", cxr, inputs, (torch.rand(8, 2) > 0.5).float(), torch.arange(8), bce, repeats)

    heart = OutcomeNet(num_outputs=1, clinical_features=13, clinical_hidden=[], seed=0)
    table = {"clinical": torch.randn(4, 13)}
    labels = (torch.rand(4, 1) > 0.5).float()
    case("(c) heart logistic regression, 4 patients", heart, table, labels, torch.arange(4), bce, repeats * 20)
    case("(c) same, secure noise (os.urandom)", heart, table, labels, torch.arange(4), bce, repeats * 20, secure=True)


if __name__ == "__main__":
    main()
