"""What ``medflare audit`` costs a site: seconds per attacked case, and where they go.

    python benchmarks/audit_cost.py [--quick] [--cases N] [--iterations I] [--json PATH]

On generated ``medflare data cxr`` sites (64x64 radiographs) with the research profile installed,
for the shipped ``cxr_emr_fedavg`` network (a MONAI ResNet with BatchNorm, 312k parameters) and
for the LeNet-size ``SmallConvNet`` the attack is known to beat:

* **audit seconds per case and scope** (worst case: one step on one patient, through the scope's
  filters, then the inversion), from the audit's own timings;
* **inversion seconds per iteration**, against two baselines measured in the same run: the
  site's own training step on one case (forward + backward: what the site pays to make the
  update), and the floor of one inversion iteration, the bare autograd work it cannot avoid
  (forward, the parameter gradient with its graph, the image gradient through it). The ratio to
  the floor is the attack code's overhead; the ratio to a training step says how much dearer an
  attack is than the training it audits.

Runs on the site's GPU when there is one (``--device``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "custom"))


def _small_cnn_job(root: str) -> str:
    import shutil

    folder = os.path.join(root, "cxr_small_cnn")
    shutil.copytree(os.path.join(REPO, "jobs", "cxr_emr_fedavg"), folder)
    small = {"image_network": {"path": "medflare.training.small_networks.SmallConvNet", "args": {"image_size": [64, 64]}, "config_type": "dict"}, "image_features": 16, "dropout": 0.0}
    for name in ("config_fed_client.json", "config_fed_server.json"):
        path = os.path.join(folder, "app", "config", name)
        with open(path) as f:
            config = json.load(f)
        if "executors" in config:
            args = config["executors"][0]["executor"]["args"]
            args["model"]["args"].update(small)
            args.update(optimizer="sgd", learning_rate=0.1, local_model="last_round", local_epochs=1)
        else:
            config["model_args"].update(small)
        with open(path, "w") as f:
            json.dump(config, f, indent=1)
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    meta["name"] = "cxr_small_cnn"
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)
    return folder


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _iteration_costs(job_dir: str, iterations: int, repeats: int, device: str) -> dict:
    """Per-iteration inversion time and its two baselines, on one 64x64 case."""
    from medflare.attacks.inverting_gradients import InversionSettings, invert_gradients
    from medflare.audit.job_under_audit import load_job
    from medflare.training.device import select_device

    job = load_job(job_dir)
    target = select_device(device)
    model = job.network(job.global_weights()).to(target)
    model.train()
    image = torch.rand(1, 1, 64, 64, device=target)
    clinical = torch.rand(1, 8, device=target)
    labels = torch.tensor([[1.0, 0.0]], device=target)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    params = [p for p in model.parameters()]
    optimizer = torch.optim.SGD(params, lr=1e-3)

    def training_step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(image=image, clinical=clinical), labels).backward()
        optimizer.step()

    def floor():
        x = image.clone().requires_grad_(True)
        grads = torch.autograd.grad(loss_fn(model(x, clinical=clinical), labels), params, create_graph=True)
        torch.autograd.grad(sum((g * g).sum() for g in grads), x)

    update = {n: torch.randn_like(p) * 1e-3 for n, p in model.named_parameters()}
    settings = InversionSettings(iterations=iterations, seed=0)

    def inversion():
        invert_gradients(model, update, labels.cpu(), (1, 1, 64, 64), update_kind="weight_difference", learning_rate=0.1,
                         extra_inputs={"clinical": clinical.cpu()}, settings=settings, device=str(target))

    step, bare = _timed(training_step, repeats), _timed(floor, repeats)
    per_iteration = _timed(inversion, max(1, repeats // 5)) / iterations
    return {
        "parameters": sum(p.numel() for p in params),
        "training_step_s": step,
        "floor_s": bare,
        "inversion_iteration_s": per_iteration,
        "overhead_vs_floor": per_iteration / bare,
        "vs_training_step": per_iteration / step,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a CI-sized pass: 1 case, 5 iterations, small sites")
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    cases, iterations = (1, 5) if args.quick else (args.cases, args.iterations)
    from medflare.audit.site_audit import AuditOptions, run_audit
    from medflare.data.cxr_synthetic import generate_cxr_sites
    from medflare.sites.site_install import install_site

    print("medflare audit cost (worst case: one step on one patient, inverting gradients; research profile)")
    print(f"device: {'cuda' if torch.cuda.is_available() and args.device != 'cpu' else 'cpu'}, torch threads {torch.get_num_threads()}, "
          f"{cases} case(s), {iterations} iterations")
    results = {"cases": cases, "iterations": iterations, "jobs": {}}
    with tempfile.TemporaryDirectory(prefix="medflare-bench-audit-") as root:
        data = generate_cxr_sites(os.path.join(root, "data"), sites=2, cases=12 if args.quick else 40, size=64, seed=0)
        workspace = os.path.join(root, "site-1")
        os.makedirs(os.path.join(workspace, "startup"))
        with open(os.path.join(workspace, "startup", "fed_client.json"), "w") as f:
            f.write("{}")
        install_site(workspace, profile="research", data=data["site-1"])
        jobs = {"cxr_emr_fedavg (ResNet, BatchNorm)": os.path.join(REPO, "jobs", "cxr_emr_fedavg"), "SmallConvNet": _small_cnn_job(root)}
        print(f"{'network':<36} {'params':>8} {'step ms':>8} {'floor ms':>9} {'iter ms':>8} {'iter/floor':>10} {'iter/step':>9} {'audit s/case/scope':>19}")
        for label, job in jobs.items():
            costs = _iteration_costs(job, max(iterations, 5), 5 if args.quick else 20, args.device)
            report = run_audit(
                workspace, job, os.path.join(root, "reports", os.path.basename(job)),
                AuditOptions(scopes=["partial_sharing"], cases=cases, settings=("worst_case",), iterations=iterations, utility_rounds=0, device=args.device),
                log=lambda _: None,
            )
            per_case = [t["seconds"] for t in report["timings"]]
            costs["audit_seconds_per_case_and_scope"] = statistics.median(per_case)
            costs["audit_seconds"] = report["seconds"]
            results["jobs"][label] = costs
            print(f"{label:<36} {costs['parameters']:>8} {1e3 * costs['training_step_s']:>8.2f} {1e3 * costs['floor_s']:>9.2f} "
                  f"{1e3 * costs['inversion_iteration_s']:>8.2f} {costs['overhead_vs_floor']:>10.2f} {costs['vs_training_step']:>9.2f} "
                  f"{costs['audit_seconds_per_case_and_scope']:>19.2f}")
    print("iter/floor: the attack's overhead over the autograd work an iteration cannot avoid; "
          "audit s/case/scope = training the update + its filters + the inversion")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
