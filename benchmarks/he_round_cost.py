"""What one federated round costs under CKKS homomorphic encryption, against the plain round, same run.

What is measured: one FedAvg round of ``K`` sites' weight differences, shaped like a MONAI
SegResNet's ``state_dict`` (``DEFAULT_SEGRESNET`` with ``init_filters`` 8, 16 and 32: about 1M,
5M and 20M float32 parameters in 83 tensors, from 3x3x3 conv kernels of up to 1.8M values down
to GroupNorm weights and biases of 8 to 32 values and a final bias of 3, so the per-tensor
ciphertext overhead shows: each tensor takes whole ciphertexts of 4,096 values). Site
``i`` sends ``default_rng(1000 + i).standard_normal(shape, float32) * 0.01`` with its case count
``CASE_COUNTS[i]`` as aggregation weight (``NUM_STEPS_CURRENT_ROUND``).

The CKKS context is the one ``nvflare provision`` writes with the ``HEBuilder``: NVFlare 2.9's
own ``HEBuilder().initialize`` (CKKS, poly_modulus_degree 8192, coeff_mod_bit_sizes
[60, 40, 40], scale 2**40, symmetric encryption, relinearization keys), the sites' context from
``get_serialized_context(is_client=True)``, the server's from ``is_client=False`` (no secret key),
both read back with ``medflare.transport.ckks_update.load_context``. TenSEAL runs with its
default thread count (the machine's hardware concurrency), as NVFlare's HE filters load it.

Phases of a round, each timed with ``time.perf_counter`` (wall seconds):

=================  =========================================  ===========================================
phase              plain round                                CKKS round
=================  =========================================  ===========================================
site, up           ``fobs.dumps`` of the ``DXO(WEIGHT_DIFF)``  ``encrypt_update(update, weight=cases)``,
                                                              then ``fobs.dumps`` of the DXO of bytes
server             ``fobs.loads`` of K shareables, weighted   ``fobs.loads`` of K, ``read_ciphertexts``
                   mean in float64 (cast to float32),         of K, ``encrypted_mean``, serialize the
                   ``fobs.dumps`` of the result               mean's vectors, ``fobs.dumps``
site, down         ``fobs.loads``                             ``fobs.loads``, ``decrypt_update``
=================  =========================================  ===========================================

The sites run in parallel, so a round is one site's up phases + the server's + one site's down
phases. Each phase's time is a median: a site's up phases over the K sites (each encrypts its
own update once), the server's and the down phases over several repetitions where they are cheap
(``HE_REPEATS``; 1 at 20M), the plain phases over ``PLAIN_REPEATS``. Generating the updates is
not timed. The sites are encrypted one at a time and each site's plaintext is freed before the
next is made, so a 20M round holds only the server's K ciphertext sets (~1.1 GB each serialized).

Floors, measured in the same run: the bytes a round moves (the upload once written by a site and
K times read by the server, the download once written and once read) at this machine's memory
bandwidth, which is the time of ``np.copyto`` of a buffer the size of one site's upload (at most
512 MiB). A 1 Gbit/s link's transfer time of the server's K uploads and K downloads is computed
from the bytes, not measured.

Precision: the decrypted mean against the float64 mean of the float32 updates (computed when the
updates are made): max absolute error, max error over the largest ``|mean|``, relative L2 error,
how much of it is one common factor (the least-squares ``s`` in ``decrypted ~ s * mean``) and
the largest error left beside it, and the plain round's float32 rounding error for comparison. The CKKS error must stay under
``AGREEMENT_ATOL`` (PASS/FAIL; the script exits with 1 on FAIL).

Goal (printed as MET or MISSED with the number): the CKKS round at most ``GOAL_RATIO`` times the
plain round at ``GOAL_SIZE``.

TenSEAL prints a warning to stdout for every vector longer than one ciphertext (4,096 values);
file descriptor 1 goes to /dev/null during the TenSEAL calls and is restored before printing.

Usage::

    python benchmarks/he_round_cost.py [--quick] [--json PATH]

``--quick`` runs ~1M parameters from 2 sites, one repetition (a smoke test); the goal is then
judged at 1M.
"""

from __future__ import annotations

import os

# numpy's BLAS and torch stay on one thread, as in the other benchmarks; set before they load
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import ctypes  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import numpy as np  # noqa: E402


def _sibling_module(name: str):
    """Import ``benchmarks/<name>.py`` by its path (``benchmarks`` is no package here)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_pf = _sibling_module("privacy_filters")
Shapes = _pf.Shapes
segresnet_shapes = _pf.segresnet_shapes
num_parameters = _pf.num_parameters

#: size label -> SegResNet ``init_filters``
SIZES = {"1M": 8, "5M": 16, "20M": 32}
QUICK_SIZES = ("1M",)
SITES = 3
QUICK_SITES = 2
CASE_COUNTS = (120, 45, 310)  # each site's aggregation weight

HE_REPEATS = {"1M": 3, "5M": 3, "20M": 1}  # server and down phases; a site's up phases: once per site
PLAIN_REPEATS = 5
QUICK_REPEATS = 1
QUICK_PLAIN_REPEATS = 3

GOAL_SIZE = "5M"
GOAL_RATIO = 3.0
AGREEMENT_ATOL = 1e-6  # the updates' entries are about 0.01; CKKS at scale 2**40 errs by about 1e-9
LINK_BITS_PER_S = 1e9
BANDWIDTH_BUFFER_CAP = 512 * 2**20


# --- the inputs -------------------------------------------------------------------------------


def make_site(shapes: Shapes, index: int) -> dict[str, np.ndarray]:
    """Site ``index``'s deterministic float32 weight difference."""
    rng = np.random.default_rng(1000 + index)
    update = {}
    for name, shape in shapes:
        array = rng.standard_normal(shape, dtype=np.float32)
        array *= 0.01
        update[name] = array
    return update


def nvflare_contexts():
    """The sites' and the server's CKKS contexts, as ``nvflare provision``'s HEBuilder writes them."""
    from nvflare.lighter.impl.he import HEBuilder

    from medflare.transport.ckks_update import load_context

    builder = HEBuilder()  # NVFlare's defaults: CKKS, 8192, [60, 40, 40], 2**40
    builder.initialize(None, None)  # builds the context; project and provisioning context are unused
    client = load_context(builder.get_serialized_context(is_client=True))
    server = load_context(builder.get_serialized_context(is_client=False))
    if server.is_private() or not client.is_private():
        raise RuntimeError("the server's context holds the secret key, or a site's lacks it")
    params = {"scheme": "CKKS", "poly_modulus_degree": builder.poly_modulus_degree,
              "coeff_mod_bit_sizes": list(builder.coeff_mod_bit_sizes), "scale_bits": builder.scale_bits,
              "encryption_type": "SYMMETRIC", "relin_keys": True}
    return client, server, params


@contextlib.contextmanager
def tenseal_stdout_silenced():
    """File descriptor 1 to /dev/null: TenSEAL's C++ warns on stdout for every multi-ciphertext vector."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        try:
            ctypes.CDLL(None).fflush(None)  # C stdio's buffer, where std::cout's warnings wait
        except (OSError, AttributeError):
            pass
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


# --- shareables on the wire -------------------------------------------------------------------


def _fobs():
    from nvflare.app_common.decomposers import common_decomposers
    from nvflare.fuel.utils import fobs

    common_decomposers.register()
    return fobs


def dumps_dxo(data: dict, meta: dict) -> bytes:
    from nvflare.apis.dxo import DXO, DataKind

    return _fobs().dumps(DXO(DataKind.WEIGHT_DIFF, data=data, meta=meta).to_shareable())


def loads_dxo(blob: bytes):
    from nvflare.apis.dxo import from_shareable

    return from_shareable(_fobs().loads(blob))


def _steps_key() -> str:
    from nvflare.apis.dxo import MetaKey

    return MetaKey.NUM_STEPS_CURRENT_ROUND


def he_meta(names, weight: Optional[float]) -> dict:
    """NVFlare's HE meta (``HEModelShareableGenerator`` reads it), plus the weight in plaintext."""
    from nvflare.apis.dxo import MetaKey

    from medflare.transport.ckks_update import CKKS

    meta = {MetaKey.PROCESSED_KEYS: {name: True for name in names}, MetaKey.PROCESSED_ALGORITHM: CKKS}
    if weight is not None:
        meta[MetaKey.NUM_STEPS_CURRENT_ROUND] = weight
    return meta


# --- timing helpers ---------------------------------------------------------------------------


class Clock:
    """Samples of named phases: ``with clock("phase"): ...`` adds one, ``clock.add`` another."""

    def __init__(self):
        self.samples: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.add(phase, time.perf_counter() - start)

    def add(self, phase: str, seconds: float) -> None:
        self.samples.setdefault(phase, []).append(seconds)

    def medians(self) -> dict[str, float]:
        return {phase: statistics.median(times) for phase, times in self.samples.items()}


def _elapsed(start: float) -> float:
    return time.perf_counter() - start


def copy_seconds(nbytes: int, repeats: int = 5) -> float:
    """Median seconds of ``np.copyto`` between two buffers of ``nbytes`` (after a warm-up copy)."""
    src = np.ones(max(1, nbytes), np.uint8)
    dst = np.empty_like(src)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        np.copyto(dst, src)
        if i:
            times.append(_elapsed(start))
    return statistics.median(times)


# --- the plain round --------------------------------------------------------------------------


def plain_round(shapes: Shapes, weights: list[float], repeats: int):
    """The plain round's phase times, its bytes, its result and the float64 reference mean."""
    clock = Clock()
    reference = {name: np.zeros(shape, np.float64) for name, shape in shapes}
    blobs = []
    for k, weight in enumerate(weights):
        update = make_site(shapes, k)
        for name, array in update.items():
            reference[name] += np.float64(weight) * array
        for _ in range(repeats):
            with clock("site_dumps"):
                blob = dumps_dxo(update, {_steps_key(): weight})
        blobs.append(blob)
        del update
    total = float(sum(weights))
    for name in reference:
        reference[name] /= total
    for _ in range(repeats):
        down = plain_server(blobs, clock)
    for _ in range(repeats):
        with clock("site_loads"):
            result = loads_dxo(down).data
    wire = {"up_fobs": len(blobs[0]), "down_fobs": len(down)}
    return clock, wire, result, reference


def plain_server(blobs: list[bytes], clock: Clock) -> bytes:
    """Load K shareables, weighted mean in float64 (the model is float32 again), dump the result."""
    start = time.perf_counter()
    contributions = [loads_dxo(blob) for blob in blobs]
    clock.add("server_loads", _elapsed(start))
    start = time.perf_counter()
    weights = [float(dxo.get_meta_prop(_steps_key())) for dxo in contributions]
    total = sum(weights)
    mean = {}
    for name in contributions[0].data:
        acc = np.zeros(contributions[0].data[name].shape, np.float64)
        for dxo, weight in zip(contributions, weights):
            acc += np.float64(weight) * dxo.data[name]
        acc /= total
        mean[name] = acc.astype(np.float32)
    clock.add("server_mean", _elapsed(start))
    del contributions
    with clock("server_dumps"):
        down = dumps_dxo(mean, {})
    return down


# --- the CKKS round ---------------------------------------------------------------------------


def he_sites_up(shapes: Shapes, weights: list[float], client, clock: Clock):
    """Each site in turn: make its update, encrypt it (timed), dump its shareable (timed), free it."""
    from medflare.transport.ckks_update import ciphertext_bytes, encrypt_update

    blobs, ciphertext_up = [], 0
    for k, weight in enumerate(weights):
        update = make_site(shapes, k)
        with clock("encrypt"):
            payload = encrypt_update(update, client, weight=weight)
        del update
        ciphertext_up = ciphertext_bytes(payload)
        with clock("site_dumps"):
            blobs.append(dumps_dxo(payload, he_meta(payload, weight)))
        del payload
    return blobs, ciphertext_up


def he_server(blobs: list, server, sizes: dict[str, int], clock: Clock, free: bool):
    """Load and check K contributions, average them under encryption, serialize and dump the mean.
    With ``free``, each site's bytes are dropped once read (the last repetition)."""
    from medflare.transport.ckks_update import ciphertext_bytes, encrypted_mean, read_ciphertexts

    contributions, weights, loads_s, read_s = [], [], 0.0, 0.0
    for k in range(len(blobs)):
        blob = blobs[k]
        if free:
            blobs[k] = None
        start = time.perf_counter()
        dxo = loads_dxo(blob)
        loads_s += _elapsed(start)
        del blob
        start = time.perf_counter()
        contributions.append(read_ciphertexts(dxo.data, server, sizes))
        read_s += _elapsed(start)
        weights.append(float(dxo.get_meta_prop(_steps_key())))
        del dxo
    clock.add("server_loads", loads_s)
    clock.add("server_read", read_s)
    with clock("server_mean"):
        mean = encrypted_mean(contributions, weights)
    del contributions
    with clock("server_serialize"):
        serialized = {name: vector.serialize() for name, vector in mean.items()}
    del mean
    with clock("server_dumps"):
        down = dumps_dxo(serialized, he_meta(serialized, None))
    return down, ciphertext_bytes(serialized)


def he_round(shapes: Shapes, weights: list[float], client, server, repeats: int):
    """The CKKS round's phase times, its bytes and a site's decrypted mean."""
    from medflare.transport.ckks_update import decrypt_update

    clock = Clock()
    sizes = {name: int(np.prod(shape)) for name, shape in shapes}
    with tenseal_stdout_silenced():
        blobs, ciphertext_up = he_sites_up(shapes, weights, client, clock)
        up_fobs = len(blobs[0])
        for rep in range(repeats):
            down, ciphertext_down = he_server(blobs, server, sizes, clock, free=rep == repeats - 1)
        del blobs
        for _ in range(repeats):
            with clock("site_loads"):
                data = loads_dxo(down).data
            with clock("decrypt"):
                decrypted = decrypt_update(data, client, dict(shapes))
            del data
    wire = {"up_fobs": up_fobs, "down_fobs": len(down), "up_ciphertext": ciphertext_up,
            "down_ciphertext": ciphertext_down}
    return clock, wire, decrypted


# --- one size ---------------------------------------------------------------------------------

#: (key, side, label, in the plain round, in the CKKS round), in a round's order
PHASES = (
    ("encrypt", "site", "encrypt_update (x weight, encrypt, serialize)", False, True),
    ("site_dumps", "site", "fobs.dumps of the DXO", True, True),
    ("server_loads", "server", "fobs.loads, K sites", True, True),
    ("server_read", "server", "read_ciphertexts, K sites", False, True),
    ("server_mean", "server", "weighted mean (float64 numpy | encrypted_mean)", True, True),
    ("server_serialize", "server", "serialize the mean's CKKS vectors", False, True),
    ("server_dumps", "server", "fobs.dumps of the mean's DXO", True, True),
    ("site_loads", "site", "fobs.loads of the mean", True, True),
    ("decrypt", "site", "decrypt_update", False, True),
)


@dataclass
class SizeResult:
    size: str
    init_filters: int
    parameters: int
    tensors: int
    ciphertexts: int
    sites: int
    weights: list[float]
    dense_bytes: int
    plain_samples_s: dict[str, list[float]]
    he_samples_s: dict[str, list[float]]
    plain_s: dict[str, float]
    he_s: dict[str, float]
    plain_round_s: float
    he_round_s: float
    ratio: float
    wire: dict[str, int]
    floors_s: dict[str, float]
    link_s: dict[str, float]
    precision: dict[str, float]
    agreement_passed: bool
    peak_rss_growth_bytes: Optional[int] = None


def precision(decrypted: dict, reference: dict, plain: dict) -> dict[str, float]:
    """The CKKS mean's error against the float64 mean, and the plain (float32) result's."""
    err_max = plain_max = ref_max = 0.0
    err_sq = ref_sq = cross = 0.0
    for name, ref in reference.items():
        err = decrypted[name] - ref
        err_max = max(err_max, float(np.max(np.abs(err))))
        plain_max = max(plain_max, float(np.max(np.abs(plain[name].astype(np.float64) - ref))))
        ref_max = max(ref_max, float(np.max(np.abs(ref))))
        err_sq += float(np.dot(err.ravel(), err.ravel()))
        ref_sq += float(np.dot(ref.ravel(), ref.ravel()))
        cross += float(np.dot(decrypted[name].ravel(), ref.ravel()))
    scale = cross / ref_sq  # the least-squares common factor: decrypted ~ scale * reference
    residual_max = max(float(np.max(np.abs(decrypted[name] - scale * ref))) for name, ref in reference.items())
    return {"he_max_abs_error": err_max, "he_max_error_over_max_mean": err_max / ref_max,
            "he_relative_l2_error": (err_sq / ref_sq) ** 0.5, "he_common_scale_minus_1": scale - 1.0,
            "he_max_abs_error_after_scale": residual_max, "plain_float32_max_abs_error": plain_max,
            "max_abs_mean": ref_max, "float32_spacing_at_max_mean": float(np.spacing(np.float32(ref_max)))}


def floors(wire_plain: dict, wire_he: dict, sites: int, dense_bytes: int) -> tuple[dict, dict]:
    """The bytes each round moves at this machine's memory bandwidth (measured), and over a link
    (computed)."""
    def moved(wire):  # the upload written once and read by the server K times; the download written and read
        return wire["up_fobs"] * (1 + sites) + wire["down_fobs"] * 2

    plain_bw = min(wire_plain["up_fobs"], BANDWIDTH_BUFFER_CAP)
    he_bw = min(wire_he["up_fobs"], BANDWIDTH_BUFFER_CAP)
    plain_copy, he_copy = copy_seconds(plain_bw), copy_seconds(he_bw)
    floor = {"plain_s": moved(wire_plain) * plain_copy / plain_bw, "he_s": moved(wire_he) * he_copy / he_bw,
             "bandwidth_plain_bytes_per_s": plain_bw / plain_copy, "bandwidth_he_bytes_per_s": he_bw / he_copy,
             "dense_copy_s": copy_seconds(dense_bytes)}
    link = {kind: sites * (wire["up_fobs"] + wire["down_fobs"]) * 8 / LINK_BITS_PER_S
            for kind, wire in (("plain_s", wire_plain), ("he_s", wire_he))}
    return floor, link


def run_size(label: str, site_count: int, client, server, he_repeats: int, plain_repeats: int) -> SizeResult:
    from medflare.transport.ckks_update import context_slots

    shapes = segresnet_shapes(SIZES[label])
    weights = [float(c) for c in CASE_COUNTS[:site_count]]
    params = num_parameters(shapes)
    slots = context_slots(client)
    ciphertexts = sum(max(1, -(-int(np.prod(shape)) // slots)) for _, shape in shapes)
    measure = _pf.memory_measurable()
    if measure:
        _pf._return_free_heap_to_os()
        _pf._reset_peak_rss()
        rss_before = _pf._status_bytes("VmRSS")
    plain_clock, wire_plain, plain_result, reference = plain_round(shapes, weights, plain_repeats)
    he_clock, wire_he, decrypted = he_round(shapes, weights, client, server, he_repeats)
    peak = _pf._status_bytes("VmHWM") - rss_before if measure else None
    prec = precision(decrypted, reference, plain_result)
    del decrypted, reference, plain_result
    dense = params * 4
    floor, link = floors(wire_plain, wire_he, site_count, dense)
    plain_s, he_s = plain_clock.medians(), he_clock.medians()
    plain_total, he_total = sum(plain_s.values()), sum(he_s.values())
    return SizeResult(
        label, SIZES[label], params, len(shapes), ciphertexts, site_count, weights, dense,
        plain_clock.samples, he_clock.samples, plain_s, he_s, plain_total, he_total, he_total / plain_total,
        {**{f"plain_{k}": v for k, v in wire_plain.items()}, **{f"he_{k}": v for k, v in wire_he.items()}},
        floor, link, prec, prec["he_max_abs_error"] <= AGREEMENT_ATOL, peak,
    )


# --- output -----------------------------------------------------------------------------------


def environment(context_params: dict) -> dict:
    import nvflare
    import tenseal

    import medflare

    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tenseal": tenseal.__version__,
        "nvflare": nvflare.__version__,
        "medflare": medflare.__version__,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "ckks": context_params,
    }


def print_environment(env: dict) -> None:
    ckks = env["ckks"]
    print("CKKS round cost (TenSEAL, NVFlare HEBuilder defaults) vs the plain round, same run")
    print(f"machine: {env['machine']}, {env['system']}, cpu_count={env['cpu_count']} (usable {env['usable_cpus']}); "
          f"OMP_NUM_THREADS={env['omp_num_threads']}; TenSEAL threads: its default (hardware concurrency)")
    print(f"versions: python {env['python']}, numpy {env['numpy']}, tenseal {env['tenseal']}, "
          f"nvflare {env['nvflare']}, medflare {env['medflare']}")
    print(f"CKKS context: nvflare.lighter.impl.he.HEBuilder(): poly_modulus_degree {ckks['poly_modulus_degree']}, "
          f"coeff_mod_bit_sizes {ckks['coeff_mod_bit_sizes']}, scale 2**{ckks['scale_bits']}, "
          f"{ckks['encryption_type']}, relin keys; server context without the secret key")


def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:8.1f} ms" if seconds < 1 else f"{seconds:8.2f} s "


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def print_size_table(r: SizeResult) -> None:
    print()
    print(f"== {r.size}: SegResNet init_filters={r.init_filters}: {r.parameters:,} float32 parameters in "
          f"{r.tensors} tensors ({_mib(r.dense_bytes)}, {r.ciphertexts:,} ciphertexts), K={r.sites} sites, "
          f"weights {', '.join(f'{w:g}' for w in r.weights)} ==")
    header = f"{'side':<7}{'phase':<50} {'plain':>12} {'CKKS':>12}  {'n':>5}"
    print(header)
    print("-" * len(header))
    for key, side, label, in_plain, in_he in PHASES:
        n = "/".join(str(len(s.get(key, []))) for s in (r.plain_samples_s, r.he_samples_s) if key in s)
        print(f"{side:<7}{label:<50} {_ms(r.plain_s.get(key)):>12} {_ms(r.he_s.get(key)):>12}  {n:>5}")
    print("-" * len(header))
    print(f"{'round':<7}{'total (one site up + server + one site down)':<50} {_ms(r.plain_round_s):>12} "
          f"{_ms(r.he_round_s):>12}  CKKS/plain {r.ratio:,.1f}x")
    f = r.floors_s
    print(f"{'floor':<7}{'bytes the round moves, at memory bandwidth':<50} {_ms(f['plain_s']):>12} {_ms(f['he_s']):>12}  "
          f"round/floor: plain {r.plain_round_s / f['plain_s']:,.1f}x, CKKS {r.he_round_s / f['he_s']:,.1f}x")
    print(f"{'':<7}(memory bandwidth measured: {f['bandwidth_he_bytes_per_s'] / 1e9:.1f} GB/s, "
          f"np.copyto of one CKKS upload's size; a copy of the dense update: {_ms(f['dense_copy_s']).strip()})")
    w = r.wire
    print(f"bytes per site: up {_mib(w['plain_up_fobs'])} plain, {_mib(w['he_up_fobs'])} CKKS "
          f"(ciphertexts {w['he_up_ciphertext'] / r.dense_bytes:.2f}x the dense float32 bytes, "
          f"fobs {w['he_up_fobs'] / w['plain_up_fobs']:.2f}x plain's); down {_mib(w['plain_down_fobs'])} plain, "
          f"{_mib(w['he_down_fobs'])} CKKS (ciphertexts {w['he_down_ciphertext'] / r.dense_bytes:.2f}x dense, "
          f"fobs {w['he_down_fobs'] / w['plain_down_fobs']:.2f}x plain's)")
    print(f"with a {LINK_BITS_PER_S / 1e9:g} Gbit/s server link (computed, not measured: K uploads + K downloads): "
          f"plain {r.plain_round_s + r.link_s['plain_s']:.2f} s, CKKS {r.he_round_s + r.link_s['he_s']:.2f} s, "
          f"CKKS/plain {(r.he_round_s + r.link_s['he_s']) / (r.plain_round_s + r.link_s['plain_s']):.1f}x")
    p = r.precision
    verdict = "PASS" if r.agreement_passed else "FAIL"
    print(f"precision: CKKS max |error| {p['he_max_abs_error']:.3g} (max |mean| {p['max_abs_mean']:.3g}: "
          f"{p['he_max_error_over_max_mean']:.3g} of it; relative L2 error {p['he_relative_l2_error']:.3g}; "
          f"as a common factor 1 {p['he_common_scale_minus_1']:+.3g} and the rest at most "
          f"{p['he_max_abs_error_after_scale']:.3g}); "
          f"plain float32 rounding max |error| {p['plain_float32_max_abs_error']:.3g} "
          f"(float32 spacing at max |mean| {p['float32_spacing_at_max_mean']:.3g})")
    print(f"  [{verdict}] CKKS mean within {AGREEMENT_ATOL:g} of the float64 mean")
    if r.peak_rss_growth_bytes is not None:
        print(f"peak RSS growth over both rounds: {_mib(r.peak_rss_growth_bytes)} "
              f"({r.peak_rss_growth_bytes / r.dense_bytes:.0f}x one dense update)")


def print_summary(results: list[SizeResult]) -> None:
    print()
    print("Summary (wall seconds of one round; floor: its bytes at memory bandwidth)")
    header = (f"{'size':>5} {'parameters':>12} {'plain':>10} {'CKKS':>10} {'CKKS/plain':>11} {'plain floor':>12} "
              f"{'CKKS floor':>11} {'up x dense':>11} {'down x dense':>13} {'max|err|':>9} {'err/max|mean|':>14}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.size:>5} {r.parameters:>12,} {r.plain_round_s:>9.3f}s {r.he_round_s:>9.2f}s {r.ratio:>10.1f}x "
              f"{r.floors_s['plain_s']:>11.4f}s {r.floors_s['he_s']:>10.3f}s "
              f"{r.wire['he_up_ciphertext'] / r.dense_bytes:>10.2f}x {r.wire['he_down_ciphertext'] / r.dense_bytes:>12.2f}x "
              f"{r.precision['he_max_abs_error']:>9.2g} {r.precision['he_max_error_over_max_mean']:>14.2g}")


def goal(results: list[SizeResult]) -> dict:
    by_size = {r.size: r for r in results}
    size = GOAL_SIZE if GOAL_SIZE in by_size else results[-1].size
    ratio = by_size[size].ratio
    return {"size": size, "stated_size": GOAL_SIZE, "limit": GOAL_RATIO, "ratio": ratio, "met": ratio <= GOAL_RATIO}


def print_goal(g: dict) -> None:
    print()
    if g["size"] != g["stated_size"]:
        print(f"note: --quick: the goal is judged at {g['size']}, not {g['stated_size']}")
    verdict = "MET" if g["met"] else "MISSED"
    print(f"goal: HE round <= {g['limit']:g}x the plain round at {g['stated_size']} parameters: {verdict} "
          f"(CKKS/plain = {g['ratio']:,.1f}x at {g['size']})")


# --- main -------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"only ~1M parameters from {QUICK_SITES} sites, {QUICK_REPEATS} repetition (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return parser.parse_args(argv)


def warm_up(client, server) -> None:
    """First calls' costs (imports, fobs registration) outside the timed rounds."""
    shapes = [("w", (64, 16)), ("b", (16,))]
    plain_round(shapes, [1.0, 2.0], 1)
    he_round(shapes, [1.0, 2.0], client, server, 1)


def main(argv=None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("tenseal") is None:
        print("he_round_cost.py needs TenSEAL, as NVFlare's HE does: pip install tenseal", file=sys.stderr)
        return 2
    sizes = QUICK_SIZES if args.quick else tuple(SIZES)
    site_count = QUICK_SITES if args.quick else SITES
    started = time.perf_counter()
    with tenseal_stdout_silenced():
        client, server, context_params = nvflare_contexts()
    env = environment(context_params)
    print_environment(env)
    print("times: median of n (plain/CKKS) samples: a site's up phases over the K sites, the rest over "
          "repetitions; K-site server phases are sums over the sites")
    warm_up(client, server)
    results = []
    for label in sizes:
        he_repeats = QUICK_REPEATS if args.quick else HE_REPEATS[label]
        plain_repeats = QUICK_PLAIN_REPEATS if args.quick else PLAIN_REPEATS
        result = run_size(label, site_count, client, server, he_repeats, plain_repeats)
        print_size_table(result)
        results.append(result)
    print_summary(results)
    g = goal(results)
    print_goal(g)
    elapsed = time.perf_counter() - started
    print(f"\ntotal benchmark time: {elapsed:.0f} s")
    if args.json:
        report = {"environment": env, "quick": args.quick, "sites": site_count,
                  "sizes": [asdict(r) for r in results], "goal": g, "agreement_atol": AGREEMENT_ATOL,
                  "total_seconds": elapsed}
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
        print(f"results written to {args.json}")
    return 0 if all(r.agreement_passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
