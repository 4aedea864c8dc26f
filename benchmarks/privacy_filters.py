"""Benchmark medflare's privacy mechanisms against baselines measured in the same run.

What is measured, for model updates of about 5M and about 20M float32 parameters split into
tensors shaped like a MONAI SegResNet's ``state_dict`` (``DEFAULT_SEGRESNET`` with
``init_filters`` 16 and 32), filled with ``default_rng(0).standard_normal(shape) * 0.01``:

1. Percentile sharing: ``share_largest_fraction(update, fraction_shared=0.1, gamma=0.05)``
   against NVFlare's ``PercentilePrivacy(percentile=90, gamma=0.05).process_dxo`` on a fresh
   ``DXO`` holding copies of the update (the copy is made outside the timed region), for numpy
   arrays and for torch tensors (``torch.from_numpy`` views).
2. Gaussian mechanism: ``gaussian_release(update, clipping_norm=1.0, noise_multiplier=1.0,
   noise=source)`` against drawing its noise alone, ``source.fill(np.empty(total, float32))``,
   for ``SeededGaussianNoise(0)`` and ``SecureGaussianNoise()``.
3. Peak extra memory of every operation above, as a multiple of the update's size in bytes:
   each operation runs once in a fresh (spawned) process that builds the update, resets the
   kernel's peak-RSS counter (``/proc/self/clear_refs``), runs the operation and reads
   ``VmHWM - VmRSS`` (Linux only; reported as n/a elsewhere).

Times are medians of several repetitions (``time.perf_counter``) after one warm-up, with each
operation and its baseline taking turns so that both see the same machine load.

Targets (each printed as PASS or FAIL):
    - percentile sharing, ~20M parameters, numpy input: at least 10x faster than NVFlare;
    - Gaussian release: at most 1.5x the time of drawing its noise, for either source;
    - every medflare operation: peak extra memory at most 2x the update.

Usage::

    python benchmarks/privacy_filters.py [--quick] [--json PATH]

``--quick`` runs the ~5M size only, with 2 repetitions (a smoke test); targets are then judged
on that size.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable, Optional

import numpy as np

#: size label -> SegResNet ``init_filters`` (parameter count grows about as its square)
SIZES = {"5M": 16, "20M": 32}
QUICK_SIZES = ("5M",)
TARGET_SIZE = "20M"  # the size the speed target is stated for

FRACTION_SHARED = 0.1
GAMMA = 0.05
PERCENTILE = 90  # NVFlare's equivalent of sharing the largest 10%
CLIPPING_NORM = 1.0
NOISE_MULTIPLIER = 1.0

REPEATS = 5
SLOW_REPEATS = 3
QUICK_REPEATS = 2

MIN_SHARING_SPEEDUP = 10.0
MAX_RELEASE_OVER_NOISE = 1.5
MAX_EXTRA_MEMORY = 2.0

Shapes = list[tuple[str, tuple[int, ...]]]


# --- the update -------------------------------------------------------------------------------


def segresnet_shapes(init_filters: int) -> Shapes:
    """Names and shapes of the default SegResNet's ``state_dict`` with ``init_filters`` changed."""
    from medflare.training.model_spec import DEFAULT_SEGRESNET, build_model

    spec = copy.deepcopy(DEFAULT_SEGRESNET)
    spec["args"]["init_filters"] = init_filters
    return [(name, tuple(t.shape)) for name, t in build_model(spec).state_dict().items()]


def make_update(shapes: Shapes) -> dict[str, np.ndarray]:
    """A deterministic float32 weight difference with the given tensor shapes."""
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(np.float32) * 0.01 for name, shape in shapes}


def torch_views(update: dict[str, np.ndarray]) -> dict:
    import torch

    return {name: torch.from_numpy(array) for name, array in update.items()}


def update_bytes(update: dict) -> int:
    return sum(a.nbytes for a in update.values())


def num_parameters(shapes: Shapes) -> int:
    return sum(int(np.prod(shape)) for _, shape in shapes)


# --- the operations ---------------------------------------------------------------------------
# Each ``prepare_*`` function does the untimed set-up for one repetition and returns the call
# to time. They are module-level so that a spawned child can look them up by case key.


def prepare_ours_sharing(update: dict) -> Callable[[], object]:
    from medflare.privacy.percentile_sharing import share_largest_fraction

    return lambda: share_largest_fraction(update, fraction_shared=FRACTION_SHARED, gamma=GAMMA)


def prepare_nvflare_percentile(update: dict) -> Callable[[], object]:
    """A fresh DXO of copies each time, in case the filter changes its input."""
    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy

    privacy_filter = PercentilePrivacy(percentile=PERCENTILE, gamma=GAMMA)
    data = {name: (v.copy() if isinstance(v, np.ndarray) else v.clone()) for name, v in update.items()}
    dxo = DXO(DataKind.WEIGHT_DIFF, data=data, meta={"NUM_STEPS_CURRENT_ROUND": 1})
    shareable, fl_ctx = dxo.to_shareable(), FLContext()
    return lambda: privacy_filter.process_dxo(dxo, shareable, fl_ctx)


def make_noise_source(kind: str):
    from medflare.privacy.noise_sources import SecureGaussianNoise, SeededGaussianNoise

    return SeededGaussianNoise(0) if kind == "seeded" else SecureGaussianNoise()


def prepare_ours_gaussian(update: dict, source_kind: str) -> Callable[[], object]:
    from medflare.privacy.gaussian_mechanism import gaussian_release

    source = make_noise_source(source_kind)
    return lambda: gaussian_release(
        update, clipping_norm=CLIPPING_NORM, noise_multiplier=NOISE_MULTIPLIER, noise=source
    )


def prepare_noise_only(update: dict, source_kind: str) -> Callable[[], object]:
    source = make_noise_source(source_kind)
    total = sum(a.size for a in update.values())
    return lambda: source.fill(np.empty(total, np.float32))


@dataclass(frozen=True)
class Case:
    """One measured operation; ``baseline`` names the case it is compared with (None: it is one)."""

    key: str
    comparison: str
    label: str
    input_kind: str  # "numpy" or "torch"
    prepare: Callable[[dict], Callable[[], object]]
    baseline: Optional[str] = None
    slow: bool = False
    needs_nvflare_torch: bool = False


SHARING = "percentile sharing"
SEEDED = "Gaussian, seeded noise"
SECURE = "Gaussian, secure noise"
SHARING_LABEL = f"medflare share_largest_fraction({FRACTION_SHARED}, gamma={GAMMA})"
PERCENTILE_LABEL = f"NVFlare PercentilePrivacy({PERCENTILE}, gamma={GAMMA})"
RELEASE_LABEL = f"medflare gaussian_release(C={CLIPPING_NORM}, z={NOISE_MULTIPLIER})"
NOISE_LABEL = "noise alone: source.fill(np.empty(total))"

#: every measured operation; a baseline comes before the cases compared with it
CASES: tuple[Case, ...] = (
    Case("nvflare-numpy", SHARING, PERCENTILE_LABEL, "numpy", prepare_nvflare_percentile),
    Case("ours-numpy", SHARING, SHARING_LABEL, "numpy", prepare_ours_sharing, baseline="nvflare-numpy"),
    Case("nvflare-torch", SHARING, PERCENTILE_LABEL, "torch", prepare_nvflare_percentile,
         slow=True, needs_nvflare_torch=True),
    Case("ours-torch", SHARING, SHARING_LABEL, "torch", prepare_ours_sharing, baseline="nvflare-torch"),
    Case("noise-seeded", SEEDED, NOISE_LABEL, "numpy", partial(prepare_noise_only, source_kind="seeded")),
    Case("release-seeded", SEEDED, RELEASE_LABEL, "numpy", partial(prepare_ours_gaussian, source_kind="seeded"),
         baseline="noise-seeded"),
    Case("noise-secure", SECURE, NOISE_LABEL, "numpy", partial(prepare_noise_only, source_kind="secure"),
         slow=True),
    Case("release-secure", SECURE, RELEASE_LABEL, "numpy", partial(prepare_ours_gaussian, source_kind="secure"),
         baseline="noise-secure", slow=True),
)
CASES_BY_KEY = {case.key: case for case in CASES}


def input_for(case: Case, update: dict[str, np.ndarray]) -> dict:
    return update if case.input_kind == "numpy" else torch_views(update)


def nvflare_accepts_torch() -> tuple[bool, str]:
    """Whether PercentilePrivacy filters a small update of torch tensors without error."""
    import torch

    small = {"a": torch.linspace(-1.0, 1.0, 100).reshape(10, 10), "b": torch.ones(3)}
    try:
        prepare_nvflare_percentile(small)()
    except Exception as e:  # noqa: BLE001 - any failure means "not supported"
        return False, f"{type(e).__name__}: {e}"
    return True, ""


# --- timing -----------------------------------------------------------------------------------


def comparison_groups(cases: list[Case]) -> list[list[Case]]:
    """Cases that are compared with each other (same comparison and input), in order."""
    groups: dict[tuple[str, str], list[Case]] = {}
    for case in cases:
        groups.setdefault((case.comparison, case.input_kind), []).append(case)
    return list(groups.values())


def time_interleaved(cases: list[Case], update: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each case: one warm-up each, then ``repeats`` rounds taking the cases
    in turn, so that a baseline and its rival see the same machine load. Set-up is not timed."""
    samples: dict[str, list[float]] = {case.key: [] for case in cases}
    inputs = {case.key: input_for(case, update) for case in cases}
    for round_ in range(repeats + 1):
        for case in cases:
            call = case.prepare(inputs[case.key])
            start = time.perf_counter()
            result = call()
            elapsed = time.perf_counter() - start
            del result, call
            if round_ > 0:
                samples[case.key].append(elapsed)
    return samples


# --- peak memory (Linux) ----------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    """A ``VmXxx`` field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _return_free_heap_to_os() -> None:
    """Let glibc give freed heap pages back, so reusing them during the operation counts as growth."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _child_peak_extra_bytes(shapes: Shapes, key: str) -> int:
    """In a fresh process: peak RSS growth while running case ``key`` once on a fresh update."""
    case = CASES_BY_KEY[key]
    small = make_update([("w", (64, 16)), ("b", (16,))])
    case.prepare(input_for(case, small))()  # loads whatever the operation imports lazily
    update = input_for(case, make_update(shapes))
    call = case.prepare(update)
    _return_free_heap_to_os()
    _reset_peak_rss()
    before = _status_bytes("VmRSS")
    result = call()
    peak = _status_bytes("VmHWM")
    del result
    return peak - before


def memory_measurable() -> bool:
    try:
        _reset_peak_rss()
        _status_bytes("VmHWM")
    except (OSError, RuntimeError):
        return False
    return True


def peak_extra_bytes(shapes: Shapes, key: str) -> int:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_child_peak_extra_bytes, (shapes, key))


# --- one size ---------------------------------------------------------------------------------


@dataclass
class Row:
    size: str
    key: str
    comparison: str
    label: str
    input_kind: str
    baseline: Optional[str]
    samples_s: list[float]
    median_s: float
    ratio_to_baseline: Optional[float] = None
    peak_extra_bytes: Optional[int] = None
    peak_extra_ratio: Optional[float] = None


@dataclass
class SizeInfo:
    label: str
    init_filters: int
    parameters: int
    tensors: int
    update_bytes: int


def run_size(label: str, cases: list[Case], repeats: int, slow_repeats: int, measure_memory: bool):
    """Time (and optionally measure the memory of) every case on the update of size ``label``."""
    shapes = segresnet_shapes(SIZES[label])
    update = make_update(shapes)
    info = SizeInfo(label, SIZES[label], num_parameters(shapes), len(shapes), update_bytes(update))
    rows: dict[str, Row] = {}
    for group in comparison_groups(cases):
        slow = any(case.slow for case in group)
        samples = time_interleaved(group, update, slow_repeats if slow else repeats)
        for case in group:
            times = samples[case.key]
            row = Row(label, case.key, case.comparison, case.label, case.input_kind, case.baseline,
                      times, statistics.median(times))
            if case.baseline in rows:
                row.ratio_to_baseline = row.median_s / rows[case.baseline].median_s
            if measure_memory:
                row.peak_extra_bytes = peak_extra_bytes(shapes, case.key)
                row.peak_extra_ratio = row.peak_extra_bytes / info.update_bytes
            rows[case.key] = row
    return info, list(rows.values())


# --- targets ----------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    value: Optional[float]
    limit: str
    passed: Optional[bool]  # None: not measured


def evaluate_targets(rows: list[Row], target_size: str) -> list[Target]:
    by_key = {(r.size, r.key): r for r in rows}
    targets = []
    sharing = by_key.get((target_size, "ours-numpy"))
    speedup = 1.0 / sharing.ratio_to_baseline if sharing and sharing.ratio_to_baseline else None
    targets.append(Target(f"percentile sharing speed-up over NVFlare, {target_size}, numpy",
                          speedup, f">= {MIN_SHARING_SPEEDUP:g}x",
                          None if speedup is None else speedup >= MIN_SHARING_SPEEDUP))
    for key, source in (("release-seeded", "seeded"), ("release-secure", "secure")):
        release = by_key.get((target_size, key))
        ratio = release.ratio_to_baseline if release else None
        targets.append(Target(f"gaussian_release / its noise, {target_size}, {source}", ratio,
                              f"<= {MAX_RELEASE_OVER_NOISE:g}x",
                              None if ratio is None else ratio <= MAX_RELEASE_OVER_NOISE))
    for r in rows:
        if r.label in (SHARING_LABEL, RELEASE_LABEL):
            name = f"peak extra memory / update, medflare {r.comparison} ({r.input_kind}), {r.size}"
            ratio = r.peak_extra_ratio
            targets.append(Target(name, ratio, f"<= {MAX_EXTRA_MEMORY:g}x",
                                  None if ratio is None else ratio <= MAX_EXTRA_MEMORY))
    return targets


# --- output -----------------------------------------------------------------------------------


def environment() -> dict:
    import nvflare
    import torch

    import medflare

    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "nvflare": nvflare.__version__,
        "medflare": medflare.__version__,
    }


def print_environment(env: dict) -> None:
    print("Privacy filter benchmark (medflare vs baselines, same run)")
    print(f"machine: {env['machine']}, {env['system']}, cpu_count={env['cpu_count']} "
          f"(usable {env['usable_cpus']}), torch threads={env['torch_threads']}")
    print(f"versions: python {env['python']}, numpy {env['numpy']}, torch {env['torch']}, "
          f"nvflare {env['nvflare']}, medflare {env['medflare']}")


def _format_ratio(row: Row) -> str:
    if row.baseline is None:
        return "baseline"
    if row.ratio_to_baseline is None:
        return "n/a"
    text = f"{row.ratio_to_baseline:.2f}x"
    if 1.0 / row.ratio_to_baseline >= 1.1:
        text += f" ({1.0 / row.ratio_to_baseline:.1f}x faster)"
    return text


def _format_memory(row: Row) -> str:
    if row.peak_extra_bytes is None:
        return "n/a"
    return f"{row.peak_extra_bytes / 2**20:7.1f} MiB = {row.peak_extra_ratio:.2f}x"


def print_size_table(info: SizeInfo, rows: list[Row]) -> None:
    print()
    print(f"== {info.label}: SegResNet init_filters={info.init_filters}: {info.parameters:,} float32 "
          f"parameters in {info.tensors} tensors ({info.update_bytes / 2**20:.1f} MiB) ==")
    header = (f"{'comparison':<24} {'input':<6} {'operation':<52} {'median':>10} {'n':>2}  "
              f"{'time vs baseline':<22} peak extra memory (x update)")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row.comparison:<24} {row.input_kind:<6} {row.label:<52} {row.median_s * 1e3:7.1f} ms "
              f"{len(row.samples_s):>2}  {_format_ratio(row):<22} {_format_memory(row)}")


def print_targets(targets: list[Target]) -> None:
    print()
    print("Targets")
    for t in targets:
        verdict = "n/a " if t.passed is None else ("PASS" if t.passed else "FAIL")
        value = "not measured" if t.value is None else f"{t.value:.2f}x"
        print(f"  [{verdict}] {t.name}: {value} (target {t.limit})")
    measured = [t for t in targets if t.passed is not None]
    print(f"  {sum(t.passed for t in measured)} of {len(measured)} measured targets met")


# --- main -------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"only the ~5M size, {QUICK_REPEATS} repetitions (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = QUICK_SIZES if args.quick else tuple(SIZES)
    repeats, slow_repeats = (QUICK_REPEATS, QUICK_REPEATS) if args.quick else (REPEATS, SLOW_REPEATS)
    started = time.perf_counter()

    env = environment()
    print_environment(env)
    torch_ok, torch_reason = nvflare_accepts_torch()
    if not torch_ok:
        print(f"note: NVFlare PercentilePrivacy refuses torch tensors ({torch_reason}); "
              "its torch row is skipped and medflare's torch row has no baseline")
    cases = [c for c in CASES if torch_ok or not c.needs_nvflare_torch]
    measure_memory = memory_measurable()
    if not measure_memory:
        print("note: peak memory needs Linux's /proc/self/clear_refs; not measured here")
    print("times: median of n runs after 1 warm-up; memory: one run in a fresh process, "
          "VmHWM - VmRSS before the call")

    infos, rows = [], []
    for label in sizes:
        info, size_rows = run_size(label, cases, repeats, slow_repeats, measure_memory)
        print_size_table(info, size_rows)
        infos.append(info)
        rows.extend(size_rows)

    target_size = TARGET_SIZE if TARGET_SIZE in sizes else sizes[-1]
    if target_size != TARGET_SIZE:
        print(f"\nnote: --quick: speed targets judged at {target_size}, not {TARGET_SIZE}")
    targets = evaluate_targets(rows, target_size)
    print_targets(targets)
    elapsed = time.perf_counter() - started
    print(f"\ntotal benchmark time: {elapsed:.0f} s")

    if args.json:
        report = {
            "environment": env,
            "quick": args.quick,
            "nvflare_accepts_torch": torch_ok,
            "sizes": [asdict(i) for i in infos],
            "rows": [asdict(r) for r in rows],
            "targets": [asdict(t) for t in targets],
            "total_seconds": elapsed,
        }
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
