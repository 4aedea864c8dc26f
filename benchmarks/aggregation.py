"""Benchmark medflare's validating aggregator against NVFlare's stock aggregation, same run.

What is measured: one FedAvg round, that is every site's contribution handed to the aggregator
and then one aggregation, for model updates of about 5M and about 20M float32 parameters split
into tensors shaped like a MONAI SegResNet's ``state_dict`` (``DEFAULT_SEGRESNET`` with
``init_filters`` 16 and 32), from 3 and from 13 sites. Site ``i`` sends
``default_rng(1000 + i).standard_normal(shape, float32) * 0.01`` with weight
(``NUM_STEPS_CURRENT_ROUND``) ``10 * (i + 1)``, so the weights differ.

1. medflare: ``ValidatedAggregator(estimator="weighted_mean")``: ``accept(shareable, fl_ctx)``
   for each site, then ``aggregate(fl_ctx)``. Every contribution is checked whole first (keys,
   shapes, dtypes, finiteness, L2 norm) against the global model in the ``FLContext``.
2. NVFlare: ``InTimeAccumulateWeightedAggregator(expected_data_kind="WEIGHT_DIFF")``, started
   with a ``START_RUN`` event, with the same shareables and calls.
3. NVFlare: ``WeightedAggregationHelper`` on its own: ``add(data, weight, site, round)`` for
   each site, then ``get_result()``; no DXOs, no checks.

Each contribution is a ``DXO(WEIGHT_DIFF)`` shareable carrying the site's name
(``ReservedKey.IDENTITY_NAME``) and round (``AppConstants.CONTRIBUTION_ROUND``); the
``FLContext`` holds ``CURRENT_ROUND`` and ``GLOBAL_MODEL``. Building these is not timed. Each
aggregator lives for the whole run and sees a new round number every repetition, as in a job.

Times are medians of several rounds (``time.perf_counter``) after one warm-up round, the three
taking turns so that they see the same machine load. The warm-up round's results are compared:
medflare's (accumulated in float64) with NVFlare's (accumulated in float32) must agree to
``np.allclose(rtol=1e-5, atol=1e-7)``; these checks are printed as PASS or FAIL. There are no
speed targets. Peak extra memory of one round, as a multiple of one update's size, is measured
as in ``privacy_filters.py``: in a fresh spawned process that builds the inputs and the
shareables, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), runs the round and
reads ``VmHWM - VmRSS`` (Linux only; n/a elsewhere).

Log records up to ERROR are dropped: NVFlare warns about each contribution whose site has no
``aggregation_weights`` (its first 11 per site) and, with no engine in the ``FLContext`` to fire
the warning's event to, logs an error besides. The aggregators still format their messages; a
refused contribution stops the benchmark with an exception instead of a log line.

Usage::

    python benchmarks/aggregation.py [--quick] [--json PATH]

``--quick`` runs ~5M parameters from 3 sites only, with 2 repetitions (a smoke test).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np


def _sibling_module(name: str):
    """Import ``benchmarks/<name>.py`` by its path: ``benchmarks`` is no package here (and the
    venv holds an unrelated ``benchmarks`` package that ``python -m`` would find instead)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: its dataclasses look themselves up
        spec.loader.exec_module(module)
    return sys.modules[name]


_pf = _sibling_module("privacy_filters")
Shapes = _pf.Shapes
SIZES = _pf.SIZES  # size label -> SegResNet init_filters
segresnet_shapes = _pf.segresnet_shapes
num_parameters = _pf.num_parameters
update_bytes = _pf.update_bytes
memory_measurable = _pf.memory_measurable
base_environment = _pf.environment
_status_bytes = _pf._status_bytes
_reset_peak_rss = _pf._reset_peak_rss
_return_free_heap_to_os = _pf._return_free_heap_to_os

SITE_COUNTS = (3, 13)
CONFIGS = tuple((size, sites) for size in SIZES for sites in SITE_COUNTS)
QUICK_CONFIGS = (("5M", 3),)

REPEATS = 5
QUICK_REPEATS = 2

RTOL = 1e-5
ATOL = 1e-7  # the updates' entries are about 0.01; float32 rounding is about 1e-9 there

Site = tuple[str, dict, int]  # name, update, NUM_STEPS_CURRENT_ROUND


# --- the inputs -------------------------------------------------------------------------------


def make_sites(shapes: Shapes, count: int) -> list[Site]:
    """``count`` sites, each with its own deterministic float32 update and weight."""
    sites = []
    for i in range(count):
        rng = np.random.default_rng(1000 + i)
        update = {}
        for name, shape in shapes:
            array = rng.standard_normal(shape, dtype=np.float32)
            array *= 0.01
            update[name] = array
        sites.append((f"site-{i + 1}", update, 10 * (i + 1)))
    return sites


def global_weights(shapes: Shapes) -> dict[str, np.ndarray]:
    return {name: np.zeros(shape, np.float32) for name, shape in shapes}


def contribution(site: str, update: dict, steps: int, round_number: int):
    """A site's reply as the server receives it, like the unit tests build it."""
    from nvflare.apis.dxo import DXO, DataKind, MetaKey
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.app_common.app_constant import AppConstants

    shareable = DXO(DataKind.WEIGHT_DIFF, data=update, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps}).to_shareable()
    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_number)
    return shareable


def round_context(round_number: int, global_model):
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.app_constant import AppConstants

    fl_ctx = FLContext()
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, round_number, private=True, sticky=True)
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, global_model, private=True, sticky=True)
    return fl_ctx


def quiet_logging() -> None:
    """Drop log records up to ERROR (see the module's notes)."""
    logging.disable(logging.ERROR)


# --- the contenders ---------------------------------------------------------------------------
# ``prepare`` does the untimed set-up of one round and returns the call to time, which returns
# the round's result. They are module-level so that a spawned child can look them up by key.


class _ShareableAggregator:
    """Runs an NVFlare ``Aggregator``: accept every site's shareable, then aggregate."""

    def __init__(self, global_model_weights: dict):
        from nvflare.app_common.abstract.model import make_model_learnable

        self.aggregator = self._make()
        self.global_model = make_model_learnable(global_model_weights, {})

    def _make(self):
        raise NotImplementedError

    def prepare(self, sites: list[Site], round_number: int) -> Callable[[], object]:
        fl_ctx = round_context(round_number, self.global_model)
        shareables = [contribution(name, update, steps, round_number) for name, update, steps in sites]
        aggregator = self.aggregator

        def one_round():
            for shareable in shareables:
                if not aggregator.accept(shareable, fl_ctx):
                    raise RuntimeError(f"{type(aggregator).__name__} refused a contribution")
            return aggregator.aggregate(fl_ctx)

        return one_round


class MedflareValidated(_ShareableAggregator):
    def _make(self):
        from medflare.aggregators.validated_aggregator import ValidatedAggregator

        return ValidatedAggregator(estimator="weighted_mean")


class NVFlareInTime(_ShareableAggregator):
    def _make(self):
        from nvflare.apis.event_type import EventType
        from nvflare.apis.fl_context import FLContext
        from nvflare.app_common.aggregators.intime_accumulate_model_aggregator import (
            InTimeAccumulateWeightedAggregator,
        )

        aggregator = InTimeAccumulateWeightedAggregator(expected_data_kind="WEIGHT_DIFF")
        aggregator.handle_event(EventType.START_RUN, FLContext())  # sets up its DXO aggregator
        return aggregator


class NVFlareHelper:
    """NVFlare's ``WeightedAggregationHelper`` on the sites' data, without shareables or checks."""

    def __init__(self, global_model_weights: dict):
        from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper

        self.helper = WeightedAggregationHelper()

    def prepare(self, sites: list[Site], round_number: int) -> Callable[[], object]:
        helper = self.helper

        def one_round():
            for name, update, steps in sites:
                helper.add(update, float(steps), name, round_number)
            return helper.get_result()

        return one_round


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    make: Callable[[dict], object]


HELPER = "nvflare-helper"
INTIME = "nvflare-intime"
MEDFLARE = "medflare"

#: every contender, baselines first
CONTENDERS: tuple[Contender, ...] = (
    Contender(HELPER, "NVFlare WeightedAggregationHelper (add + get_result)", NVFlareHelper),
    Contender(INTIME, "NVFlare InTimeAccumulateWeightedAggregator", NVFlareInTime),
    Contender(MEDFLARE, 'medflare ValidatedAggregator("weighted_mean")', MedflareValidated),
)
CONTENDERS_BY_KEY = {c.key: c for c in CONTENDERS}


def result_data(result) -> dict:
    """The aggregated ``{name: array}`` of a round's result (a shareable or a plain dict)."""
    from nvflare.apis.dxo import from_shareable
    from nvflare.apis.shareable import Shareable

    return from_shareable(result).data if isinstance(result, Shareable) else result


# --- timing -----------------------------------------------------------------------------------


def time_interleaved(sites: list[Site], weights: dict, repeats: int):
    """Seconds per round of each contender: one warm-up round each, then ``repeats`` rounds
    taking the contenders in turn. Returns the samples and the warm-up round's results."""
    instances = {c.key: c.make(weights) for c in CONTENDERS}
    samples: dict[str, list[float]] = {c.key: [] for c in CONTENDERS}
    first_results: dict[str, dict] = {}
    for round_number in range(repeats + 1):
        for c in CONTENDERS:
            call = instances[c.key].prepare(sites, round_number)
            start = time.perf_counter()
            result = call()
            elapsed = time.perf_counter() - start
            if round_number == 0:
                first_results[c.key] = result_data(result)
            else:
                samples[c.key].append(elapsed)
            del result, call
    return samples, first_results


# --- correctness ------------------------------------------------------------------------------


@dataclass
class Check:
    config: str
    name: str
    max_abs_diff: float
    max_abs_value: float
    passed: bool


def compare(config: str, name: str, ours: dict, theirs: dict) -> Check:
    if list(ours) != list(theirs):
        return Check(config, name, float("inf"), float("nan"), False)
    diff = value = 0.0
    close = True
    for key, a in ours.items():
        b = theirs[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            return Check(config, name, float("inf"), float("nan"), False)
        diff = max(diff, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
        value = max(value, float(np.max(np.abs(b))))
        close = close and bool(np.allclose(a, b, rtol=RTOL, atol=ATOL))
    return Check(config, name, diff, value, close)


# --- peak memory (Linux) ----------------------------------------------------------------------


def _child_peak_extra_bytes(shapes: Shapes, site_count: int, key: str) -> int:
    """In a fresh process: peak RSS growth during one round of ``key`` on fresh inputs."""
    quiet_logging()
    make = CONTENDERS_BY_KEY[key].make
    small_shapes = [("w", (64, 16)), ("b", (16,))]
    small_sites = make_sites(small_shapes, site_count)
    make(global_weights(small_shapes)).prepare(small_sites, 0)()  # lazy imports, first-call costs
    del small_sites
    sites = make_sites(shapes, site_count)
    call = make(global_weights(shapes)).prepare(sites, 0)
    _return_free_heap_to_os()
    _reset_peak_rss()
    before = _status_bytes("VmRSS")
    result = call()
    peak = _status_bytes("VmHWM")
    del result
    return peak - before


def peak_extra_bytes(shapes: Shapes, site_count: int, key: str) -> int:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_child_peak_extra_bytes, (shapes, site_count, key))


# --- one configuration ------------------------------------------------------------------------


@dataclass
class Row:
    config: str
    size: str
    sites: int
    key: str
    label: str
    samples_s: list[float]
    median_s: float
    mparam_sites_per_s: float
    ratio_to_intime: Optional[float] = None
    ratio_to_helper: Optional[float] = None
    peak_extra_bytes: Optional[int] = None
    peak_extra_ratio: Optional[float] = None


@dataclass
class ConfigInfo:
    label: str
    size: str
    init_filters: int
    parameters: int
    tensors: int
    sites: int
    update_bytes: int


def config_label(size: str, site_count: int) -> str:
    return f"{size} x {site_count}"


def run_config(size: str, shapes: Shapes, all_sites: list[Site], site_count: int, repeats: int,
               measure_memory: bool):
    sites = all_sites[:site_count]
    label = config_label(size, site_count)
    params = num_parameters(shapes)
    info = ConfigInfo(label, size, SIZES[size], params, len(shapes), site_count, update_bytes(sites[0][1]))
    samples, results = time_interleaved(sites, global_weights(shapes), repeats)
    checks = [
        compare(label, "medflare vs NVFlare InTimeAccumulateWeightedAggregator", results[MEDFLARE], results[INTIME]),
        compare(label, "medflare vs NVFlare WeightedAggregationHelper", results[MEDFLARE], results[HELPER]),
        compare(label, "NVFlare InTimeAccumulate vs WeightedAggregationHelper", results[INTIME], results[HELPER]),
    ]
    del results
    medians = {key: statistics.median(times) for key, times in samples.items()}
    rows = []
    for c in CONTENDERS:
        median = medians[c.key]
        row = Row(label, size, site_count, c.key, c.label, samples[c.key], median,
                  params * site_count / 1e6 / median)
        if c.key != HELPER:
            row.ratio_to_helper = median / medians[HELPER]
        if c.key == MEDFLARE:
            row.ratio_to_intime = median / medians[INTIME]
        if measure_memory:
            row.peak_extra_bytes = peak_extra_bytes(shapes, site_count, c.key)
            row.peak_extra_ratio = row.peak_extra_bytes / info.update_bytes
        rows.append(row)
    return info, rows, checks


# --- output -----------------------------------------------------------------------------------


def blas_threads() -> Optional[str]:
    """The BLAS libraries numpy and torch loaded and their thread counts (needs threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    return ", ".join(f"{p.get('internal_api')} {p.get('num_threads')}" for p in pools) or None


def environment() -> dict:
    env = base_environment()
    env["blas_threads"] = blas_threads()
    env["load_average_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return env


def _load(load) -> str:
    return "n/a" if load is None else ", ".join(f"{x:.2f}" for x in load)


def print_environment(env: dict) -> None:
    print("Aggregation benchmark (medflare vs NVFlare, same run)")
    print(f"machine: {env['machine']}, {env['system']}, cpu_count={env['cpu_count']} "
          f"(usable {env['usable_cpus']}), load average at start (1, 5, 15 min): "
          f"{_load(env['load_average_start'])}")
    print(f"versions: python {env['python']}, numpy {env['numpy']}, torch {env['torch']}, "
          f"nvflare {env['nvflare']}, medflare {env['medflare']}; BLAS threads: "
          f"{env['blas_threads'] or 'unknown'}")


def _format_ratio(ratio: Optional[float]) -> str:
    if ratio is None:
        return "-"
    text = f"{ratio:.2f}x"
    if 1.0 / ratio >= 1.1:
        text += f" ({1.0 / ratio:.1f}x faster)"
    return text


def _format_memory(row: Row) -> str:
    if row.peak_extra_bytes is None:
        return "n/a"
    return f"{row.peak_extra_bytes / 2**20:7.1f} MiB = {row.peak_extra_ratio:.2f}x"


def print_config_table(info: ConfigInfo, rows: list[Row], checks: list[Check]) -> None:
    print()
    print(f"== {info.label} sites: SegResNet init_filters={info.init_filters}: {info.parameters:,} float32 "
          f"parameters in {info.tensors} tensors ({info.update_bytes / 2**20:.1f} MiB per site) ==")
    header = (f"{'aggregation (one round: all accepts + aggregate)':<53} {'median':>10} {'n':>2} "
              f"{'Mparam*sites/s':>14}  {'vs InTimeAccumulate':<20} {'vs Helper':<20} "
              f"peak extra memory (x update)")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row.label:<53} {row.median_s * 1e3:7.1f} ms {len(row.samples_s):>2} "
              f"{row.mparam_sites_per_s:>14.1f}  {_format_ratio(row.ratio_to_intime):<20} "
              f"{_format_ratio(row.ratio_to_helper):<20} {_format_memory(row)}")
    for check in checks:
        verdict = "PASS" if check.passed else "FAIL"
        print(f"  [{verdict}] {check.name}: max |difference| {check.max_abs_diff:.3g} "
              f"(max |value| {check.max_abs_value:.3g}; rtol={RTOL:g}, atol={ATOL:g})")


def print_summary(checks: list[Check]) -> None:
    print()
    passed = sum(c.passed for c in checks)
    print(f"Agreement checks: {passed} of {len(checks)} passed")


# --- main -------------------------------------------------------------------------------------


# --- bytes on the wire -------------------------------------------------------------------------

SHARED_FRACTIONS = (0.1, 0.4)
BYTE_TARGETS = {0.1: 0.15, 0.4: 0.50}  # sparse bytes at most this share of the dense bytes


def wire_bytes(shapes: Shapes) -> list[dict]:
    """Serialized size of one site's partially shared update per round, dense against sparse,
    measured on what NVFlare sends: ``fobs.dumps`` of the filtered result."""
    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.decomposers import common_decomposers

    from medflare.filters.percentile_sharing import PercentileSharingFilter
    from medflare.transport.sparse_update import serialized_size

    common_decomposers.register()
    _, update, steps = make_sites(shapes, 1)[0]
    rows = []
    for fraction in SHARED_FRACTIONS:
        sizes = {}
        for sparse in (False, True):
            sent = PercentileSharingFilter(fraction, None, sparse_transport=sparse).process(
                DXO(DataKind.WEIGHT_DIFF, data=update, meta={"NUM_STEPS_CURRENT_ROUND": steps}).to_shareable(), FLContext()
            )
            sizes[sparse] = serialized_size(sent)
        ratio = sizes[True] / sizes[False]
        rows.append({"fraction_shared": fraction, "dense_bytes": sizes[False], "sparse_bytes": sizes[True],
                     "ratio": ratio, "target": BYTE_TARGETS[fraction], "passed": ratio <= BYTE_TARGETS[fraction]})
    return rows


def print_wire_bytes(size: str, rows: list[dict]) -> None:
    print(f"\n== bytes per site per round on the wire, {size} (fobs.dumps of the filtered result) ==")
    print(f"{'shared':>7} {'dense bytes':>14} {'sparse bytes':>14} {'sparse/dense':>13}  target")
    for r in rows:
        mark = "PASS" if r["passed"] else "FAIL"
        print(f"{r['fraction_shared']:>7.0%} {r['dense_bytes']:>14,} {r['sparse_bytes']:>14,} {r['ratio']:>13.3f}  "
              f"[{mark}] <= {r['target']:.2f}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"only ~5M parameters from 3 sites, {QUICK_REPEATS} repetitions (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    repeats = QUICK_REPEATS if args.quick else REPEATS
    started = time.perf_counter()
    quiet_logging()

    env = environment()
    print_environment(env)
    measure_memory = memory_measurable()
    if not measure_memory:
        print("note: peak memory needs Linux's /proc/self/clear_refs; not measured here")
    print("times: median of n rounds after 1 warm-up round; memory: one round in a fresh process, "
          "VmHWM - VmRSS before the round, as a multiple of one site's update")

    infos, rows, checks = [], [], []
    for size in dict.fromkeys(size for size, _ in configs):
        counts = [count for s, count in configs if s == size]
        shapes = segresnet_shapes(SIZES[size])
        all_sites = make_sites(shapes, max(counts))
        for count in counts:
            info, config_rows, config_checks = run_config(size, shapes, all_sites, count, repeats, measure_memory)
            print_config_table(info, config_rows, config_checks)
            infos.append(info)
            rows.extend(config_rows)
            checks.extend(config_checks)
        del all_sites

    print_summary(checks)
    wire = {}
    for size in dict.fromkeys(size for size, _ in configs):
        wire[size] = wire_bytes(segresnet_shapes(SIZES[size]))
        print_wire_bytes(size, wire[size])
    elapsed = time.perf_counter() - started
    env["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"load average at end (1, 5, 15 min): {_load(env['load_average_end'])}")
    print(f"\ntotal benchmark time: {elapsed:.0f} s")

    if args.json:
        report = {
            "environment": env,
            "quick": args.quick,
            "repeats": repeats,
            "tolerance": {"rtol": RTOL, "atol": ATOL},
            "configs": [asdict(i) for i in infos],
            "rows": [asdict(r) for r in rows],
            "checks": [asdict(c) for c in checks],
            "wire_bytes": wire,
            "total_seconds": elapsed,
        }
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
        print(f"results written to {args.json}")
    wire_ok = all(r["passed"] for rows in wire.values() for r in rows)
    return 0 if all(c.passed for c in checks) and wire_ok else 1


if __name__ == "__main__":
    sys.exit(main())
