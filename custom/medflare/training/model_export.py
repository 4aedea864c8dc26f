"""Export a trained network to TorchScript and ONNX, and check that the export computes what the
network computes before anyone may use it.

:func:`export_model` writes ``<stem>.torchscript.pt`` (TorchScript, ``torch.jit.trace``) and ``<stem>.onnx``
(ONNX, opset >= 17, the batch axis dynamic), reloads each file the way a deployment would
(``torch.jit.load``; an ``onnxruntime`` CPU session), runs it on the sample input and on a
second random input of another batch size, and compares it with the eager network. The result
is a JSON report, ``<stem>.export.json``. Pure PyTorch: no NVFlare here (the server's
:class:`~medflare.export.global_model_exporter.GlobalModelExporter` and ``medflare model
export`` call it).

Why these exporters:

* TorchScript by **tracing**, not scripting: ``torch.jit.script`` refuses most MONAI networks
  and :class:`~medflare.training.outcome_networks.OutcomeNet` (optional arguments, dicts of
  layers), while a trace records the operations actually run. What a trace gets wrong
  (Python control flow on shapes or values, frozen at the sample input) is what the second
  batch size of the agreement check is there to catch.
* ONNX by torch's TorchScript-based exporter (``dynamo=False``): it needs only ``onnx``, takes
  ~1 s for the BraTS SegResNet, and writes one self-contained file. The ``torch.export``
  exporter (torch's default since 2.9) also needs ``onnxscript``, took 8 s for the same network
  here and writes the weights to a second ``.onnx.data`` file. torch 2.13 warns that the
  TorchScript-based exporter is deprecated; when a torch release removes it, the export fails
  and the report says so (nothing is left as if valid).

Notes:
    Agreement rule (``numpy.allclose``'s, per element, ``e`` the eager output, ``x`` the
    export's): ``|x - e| <= atol + rtol * |e|``; any NaN or a shape difference fails. Reported:
    ``max_abs_error = max |x - e|``, and ``max_rel_error = max |x - e| / |e|`` over the elements
    where the relative term governs (``rtol |e| > atol``, i.e. ``|e| > atol / rtol``; over
    ``|e| > atol`` when ``rtol`` is 0), so that an element near zero does not read as a large
    relative error the rule allows.

    Defaults ``atol = 1e-4``, ``rtol = 1e-3`` for float32: float32's unit roundoff is
    ``u = 2^-24 ~ 6e-8``; a reordered sum of ``n`` products (another convolution algorithm in
    onnxruntime's MLAS than in torch's kernels) differs by about ``sqrt(n) u`` relative, and
    the error grows through the depth of the network and the normalisations. Measured here:
    1e-6 (SegResNet, 16^3 and 32^3) and 1e-7 (OutcomeNet), so the defaults leave two orders of
    magnitude of headroom, while an export that computes something else (a branch frozen by
    the trace, a batch size baked in, dropout left on) differs by the size of the outputs
    (1e-2 and up for logits).

    Fail closed: a file whose check failed is renamed ``<file>.failed``; an export that raised
    leaves no file; a stale ``<stem>.torchscript.pt``/``<stem>.onnx`` from an earlier export is removed
    before anything is written, so only a file that passed carries the plain name.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from medflare.optional_dependencies import EXPORT_EXTRA_HINT, require

__all__ = [
    "FORMATS",
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "DEFAULT_OPSET",
    "OPSET_RANGE",
    "FormatExport",
    "ExportReport",
    "check_export_arguments",
    "export_model",
    "random_inputs",
    "report_path",
]

#: the formats :func:`export_model` writes, and each file's suffix
FORMATS = {"torchscript": ".torchscript.pt", "onnx": ".onnx"}
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
DEFAULT_OPSET = 17
#: opsets torch's TorchScript-based ONNX exporter writes that have every operator medflare's
#: networks need (GroupNorm as InstanceNormalization, opset 17's LayerNormalization)
OPSET_RANGE = (17, 20)
_STEM = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_MAX_WARNINGS = 5

Inputs = Union[torch.Tensor, Sequence[torch.Tensor], Mapping[str, torch.Tensor]]


@dataclass
class FormatExport:
    """One format's file and its agreement with the eager network."""

    format: str
    file: Optional[str]  # the file left on disk: the plain name if passed, ``.failed`` if not, None if none
    passed: bool
    sha256: Optional[str] = None
    bytes: Optional[int] = None
    seconds: Optional[float] = None
    opset: Optional[int] = None
    max_abs_error: Optional[float] = None
    max_rel_error: Optional[float] = None
    #: per checked input: its batch size and the errors there
    checks: list = field(default_factory=list)
    #: what failed: the input and output that differed and by how much, or the exception
    error: Optional[str] = None
    tracer_warnings: list = field(default_factory=list)


@dataclass
class ExportReport:
    """What :func:`export_model` wrote; ``passed`` only when every requested format passed."""

    stem: str
    out_dir: str
    model_class: str
    input_names: list
    input_shapes: list
    check_batch_sizes: list
    tolerance: dict
    versions: dict
    exports: list
    passed: bool
    report_file: str

    def to_dict(self) -> dict:
        return asdict(self)

    def export(self, fmt: str) -> Optional[FormatExport]:
        return next((e for e in self.exports if e.format == fmt), None)


def report_path(out_dir: str, stem: str) -> str:
    """Where :func:`export_model` writes the report of ``stem``."""
    return os.path.join(out_dir, f"{stem}.export.json")


def export_model(
    model: torch.nn.Module,
    sample_inputs: Inputs,
    out_dir: str,
    stem: str,
    formats: Sequence[str] = ("torchscript", "onnx"),
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
    input_names: Optional[Sequence[str]] = None,
) -> ExportReport:
    """Export ``model`` in ``formats`` under ``out_dir`` and check each file against the network.

    Args:
        model: the network; run in eval mode for the export (its mode is restored after).
        sample_inputs: one tensor (``forward(x)``), a sequence (``forward(*inputs)``) or a
            mapping of names to tensors (``forward(**inputs)``, e.g. OutcomeNet's ``image`` and
            ``clinical``). Floating point, finite, one batch size along dim 0 for all. The
            exports take the inputs positionally, in this order, named after the mapping's keys
            (``input_0``... otherwise).
        out_dir: folder of the files (created if missing).
        stem: file name without suffix: ``<stem>.torchscript.pt``, ``<stem>.onnx``,
            ``<stem>.export.json`` (the checkpoint ``<stem>.pt`` beside them is never touched).
        formats: a non-empty subset of :data:`FORMATS`.
        rtol, atol: agreement tolerances, each a real in [0, 1], not both 0 (see Notes above).
        opset: ONNX opset, an int in :data:`OPSET_RANGE`.
        seed: seed of the second, random check input.
        input_names: names of positional ``sample_inputs`` in the exports (ONNX's input names;
            ``input_0``... when not given); a mapping's keys name its inputs.

    Returns:
        The report, also written to ``<stem>.export.json``. A failed check or export is in the
        report (``passed`` false, ``error`` naming the output and the difference); it does not
        raise.

    Raises:
        ValueError: a bad argument, named with its value and what is allowed; nothing written.
        MissingDependency: ``"onnx"`` asked for without ``onnx``/``onnxruntime`` installed;
            nothing written.
    """
    formats = check_export_arguments(formats, rtol, atol, opset)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(stem, str) or not _STEM.match(stem) or ".." in stem:
        raise ValueError(f"stem must be a file name of letters, digits, '_', '.', '-' (no path), got {stem!r}")
    if not isinstance(out_dir, (str, os.PathLike)) or os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir must be a folder, got {out_dir!r}")
    names, inputs = _check_inputs(sample_inputs)
    if input_names is not None and not isinstance(sample_inputs, Mapping):
        if (
            isinstance(input_names, (str, bytes))
            or len(list(input_names)) != len(inputs)
            or not all(isinstance(n, str) and n.isidentifier() for n in input_names)
            or len(set(input_names)) != len(inputs)
        ):
            raise ValueError(f"input_names must be {len(inputs)} distinct identifiers, got {input_names!r}")
        names = list(input_names)
    if "onnx" in formats:
        for module in ("onnx", "onnxruntime"):
            require(module, "ONNX export", hint=EXPORT_EXTRA_HINT)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    for fmt in formats:  # fail closed: no stale file from an earlier export keeps a valid name
        _remove(os.path.join(out_dir, stem + FORMATS[fmt]))
        _remove(os.path.join(out_dir, stem + FORMATS[fmt] + ".failed"))
    batch = inputs[0].shape[0]
    second = random_inputs([tuple(t.shape) for t in inputs], batch + 1 if batch == 1 else batch - 1, inputs[0].dtype, seed)
    wrapped = _PositionalInputs(model, names if isinstance(sample_inputs, Mapping) else None)
    was_training = model.training
    wrapped.eval()  # the whole tree: the ONNX exporter restores the top module's mode to all of it
    try:
        with torch.no_grad():
            expected = [_outputs(wrapped(*inputs)), _outputs(wrapped(*second))]
        check_inputs = [inputs, second]
        exports = []
        for fmt in formats:
            path = os.path.join(out_dir, stem + FORMATS[fmt])
            writer = _export_torchscript if fmt == "torchscript" else _export_onnx
            exports.append(writer(wrapped, names, inputs, check_inputs, expected, path, rtol, atol, opset))
    finally:
        model.train(was_training)
    report = ExportReport(
        stem=stem,
        out_dir=os.path.abspath(out_dir),
        model_class=f"{type(model).__module__}.{type(model).__qualname__}",
        input_names=list(names),
        input_shapes=[list(t.shape) for t in inputs],
        check_batch_sizes=[int(batch), int(second[0].shape[0])],
        tolerance={"atol": atol, "rtol": rtol, "rule": "|export - eager| <= atol + rtol * |eager| per element"},
        versions=_versions(formats),
        exports=exports,
        passed=all(e.passed for e in exports),
        report_file=os.path.abspath(report_path(out_dir, stem)),
    )
    _write_json(report.report_file, report.to_dict())
    return report


def random_inputs(shapes: Sequence[Sequence[int]], batch: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> list:
    """Standard normal tensors of ``shapes`` with the batch axis (dim 0) set to ``batch``, drawn
    from a generator seeded with ``seed`` (the global generator is left alone)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn((batch, *tuple(s)[1:]), generator=generator, dtype=dtype) for s in shapes]


# --- argument checks -------------------------------------------------------------------------


def check_export_arguments(formats, rtol, atol, opset: int = DEFAULT_OPSET) -> list:
    """Check the configuration of an export (as :func:`export_model` does); ``formats`` as a list.

    Raises:
        ValueError: naming the argument, its value and what is allowed.
    """
    formats = _check_formats(formats)
    _check_tolerance("rtol", rtol)
    _check_tolerance("atol", atol)
    if rtol == 0 and atol == 0:
        raise ValueError("rtol and atol are both 0: no float export agrees exactly; give atol > 0 or rtol > 0")
    if isinstance(opset, bool) or not isinstance(opset, int) or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise ValueError(f"opset must be an int in [{OPSET_RANGE[0]}, {OPSET_RANGE[1]}], got {opset!r}")
    return formats


def _check_formats(formats) -> list:
    if isinstance(formats, (str, bytes)) or not isinstance(formats, Sequence) or not formats:
        raise ValueError(f"formats must be a non-empty list of {list(FORMATS)}, got {formats!r}")
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"formats: {fmt!r} is not one of {list(FORMATS)}")
    if len(set(formats)) != len(formats):
        raise ValueError(f"formats names a format twice: {list(formats)!r}")
    return list(formats)


def _check_tolerance(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a real in [0, 1], got {value!r}")


def _check_inputs(sample_inputs) -> tuple[list, list]:
    if isinstance(sample_inputs, torch.Tensor):
        names, tensors = ["input_0"], [sample_inputs]
    elif isinstance(sample_inputs, Mapping):
        names, tensors = list(sample_inputs), list(sample_inputs.values())
        if not all(isinstance(n, str) and n.isidentifier() for n in names):
            raise ValueError(f"sample_inputs: input names must be identifiers, got {names!r}")
    elif isinstance(sample_inputs, Sequence) and not isinstance(sample_inputs, (str, bytes)):
        tensors = list(sample_inputs)
        names = [f"input_{i}" for i in range(len(tensors))]
    else:
        raise ValueError(f"sample_inputs must be a tensor, a list of tensors or a dict of them, got {type(sample_inputs).__name__}")
    if not tensors:
        raise ValueError("sample_inputs is empty: the network needs at least one input")
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 1 or t.shape[0] < 1:
            raise ValueError(f"sample_inputs[{name!r}] must be a floating-point tensor with a batch axis, got {t!r:.80}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"sample_inputs[{name!r}] holds NaN or infinite values")
    batches = {int(t.shape[0]) for t in tensors}
    if len(batches) != 1:
        raise ValueError(f"sample_inputs must share one batch size (dim 0), got {sorted(batches)}")
    if len({t.dtype for t in tensors}) != 1:
        raise ValueError(f"sample_inputs must share one dtype, got {[str(t.dtype) for t in tensors]}")
    return names, tensors


# --- the exports -------------------------------------------------------------------------------


class _PositionalInputs(torch.nn.Module):
    """The network called with positional inputs: ``forward(**dict(zip(names, inputs)))`` when
    the sample inputs were named, else ``forward(*inputs)``. Tracers and ONNX take positions."""

    def __init__(self, model: torch.nn.Module, names: Optional[Sequence[str]]):
        super().__init__()
        self.model = model
        self.names = None if names is None else list(names)

    def forward(self, *inputs):
        if self.names is None:
            return self.model(*inputs)
        return self.model(**dict(zip(self.names, inputs)))


def _outputs(result) -> list:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)) and result and all(isinstance(r, torch.Tensor) for r in result):
        return list(result)
    raise ValueError(f"the network must return a tensor or a tuple of tensors to be exported, got {type(result).__name__}")


def _export_torchscript(wrapped, names, inputs, check_inputs, expected, path, rtol, atol, opset) -> FormatExport:
    def write(tmp: str) -> list:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            traced = torch.jit.trace(wrapped, tuple(inputs), check_trace=False)
        torch.jit.save(traced, tmp)
        return [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, torch.jit.TracerWarning)]

    def run(tmp: str):
        loaded = torch.jit.load(tmp, map_location="cpu")
        loaded.eval()
        with torch.no_grad():
            return [[o.numpy() for o in _outputs(loaded(*x))] for x in check_inputs]

    return _export_and_check("torchscript", path, write, run, expected, rtol, atol, None)


def _export_onnx(wrapped, names, inputs, check_inputs, expected, path, rtol, atol, opset) -> FormatExport:
    output_names = [f"output_{i}" for i in range(len(expected[0]))]

    def write(tmp: str) -> list:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.onnx.export(
                wrapped,
                tuple(inputs),
                tmp,
                dynamo=False,
                opset_version=opset,
                input_names=list(names),
                output_names=output_names,
                dynamic_axes={n: {0: "batch"} for n in list(names) + output_names},
            )
        return [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, torch.jit.TracerWarning)]

    def run(tmp: str):
        import onnx
        import onnxruntime

        onnx.checker.check_model(tmp)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        session = onnxruntime.InferenceSession(tmp, options, providers=["CPUExecutionProvider"])
        return [session.run(output_names, {n: t.numpy() for n, t in zip(names, x)}) for x in check_inputs]

    return _export_and_check("onnx", path, write, run, expected, rtol, atol, opset)


def _export_and_check(fmt, path, write, run, expected, rtol, atol, opset) -> FormatExport:
    """Write to a temporary name, reload and compare; the file gets its plain name only if it passed."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")
    started = time.perf_counter()
    result = FormatExport(format=fmt, file=None, passed=False, opset=opset)
    try:
        result.tracer_warnings = write(tmp)[:_MAX_WARNINGS]
        result.seconds = round(time.perf_counter() - started, 3)
        got = run(tmp)
    except Exception as e:  # an exporter's or runtime's refusal is a failed export, reported
        _remove(tmp)
        result.seconds = round(time.perf_counter() - started, 3)
        result.error = f"{fmt} export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
        return result
    checks, failures = [], []
    for label, want, have in zip(("sample", "second"), expected, got):
        check = _compare(want, have, rtol, atol)
        check["input"] = label
        check["batch"] = int(want[0].shape[0])
        checks.append(check)
        if not check["passed"]:
            failures.append(f"{label} input (batch {check['batch']}): {check['detail']}")
    result.checks = checks
    finite = [c for c in checks if c["max_abs_error"] is not None]
    result.max_abs_error = max((c["max_abs_error"] for c in finite), default=None)
    result.max_rel_error = max((c["max_rel_error"] for c in finite), default=None)
    result.passed = not failures
    final = path if result.passed else path + ".failed"
    os.replace(tmp, final)
    result.file = os.path.abspath(final)
    result.sha256 = _sha256(final)
    result.bytes = os.path.getsize(final)
    if failures:
        result.error = f"{fmt} export disagrees with the network (atol {atol}, rtol {rtol}): " + "; ".join(failures)
    return result


def _compare(expected: list, got: list, rtol: float, atol: float) -> dict:
    """Elementwise agreement of each output; the worst output named when one differs."""
    import numpy as np

    if len(got) != len(expected):
        return {"passed": False, "max_abs_error": None, "max_rel_error": None,
                "detail": f"{len(got)} outputs, the network gives {len(expected)}"}
    max_abs, max_rel, detail = 0.0, 0.0, None
    for i, (e_tensor, x) in enumerate(zip(expected, got)):
        e = e_tensor.detach().numpy().astype(np.float64)
        x = np.asarray(x, dtype=np.float64)
        if x.shape != e.shape:
            detail = detail or f"output {i} has shape {list(x.shape)}, the network's {list(e.shape)}"
            return {"passed": False, "max_abs_error": None, "max_rel_error": None, "detail": detail}
        if not (np.isfinite(x).all() and np.isfinite(e).all()):
            return {"passed": False, "max_abs_error": None, "max_rel_error": None,
                    "detail": f"output {i} holds NaN or infinite values"}
        diff = np.abs(x - e)
        out_abs = float(diff.max()) if diff.size else 0.0
        big = np.abs(e) > (atol / rtol if rtol > 0 else atol)
        out_rel = float((diff[big] / np.abs(e[big])).max()) if big.any() else 0.0
        max_abs, max_rel = max(max_abs, out_abs), max(max_rel, out_rel)
        if detail is None and not bool((diff <= atol + rtol * np.abs(e)).all()):
            detail = f"output {i} differs by up to {out_abs:.3g} absolute, {out_rel:.3g} relative"
    return {"passed": detail is None, "max_abs_error": max_abs, "max_rel_error": max_rel, "detail": detail or "agrees"}


# --- files ---------------------------------------------------------------------------------------


def _versions(formats: Sequence[str]) -> dict:
    versions = {"torch": torch.__version__}
    if "onnx" in formats:
        import onnx
        import onnxruntime

        versions.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    return versions


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


