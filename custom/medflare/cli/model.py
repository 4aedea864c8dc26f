"""``medflare model``: a job's global models after the run.

    medflare model decrypt MODEL_PT --key CLIENT_CONTEXT --job JOB_DIR [--out OUT_PT]
    medflare model export MODEL_PT --job JOB_DIR [--out DIR] [--formats torchscript,onnx]
                          [--atol 1e-4] [--rtol 1e-3]

``decrypt``: a site turns an HE job's encrypted global model into a PyTorch checkpoint.

Under secure aggregation the server saves its global models (``FL_global_model.pt``,
``best_FL_global_model.pt`` in ``app_server``) as CKKS ciphertexts it cannot read. Only a site
holds the key (``startup/client_context.tenseal`` in its kit). This decrypts every parameter
with it and reshapes it to the job's network, built from the job's client configuration, and
writes ``{"model": state_dict}`` as NVFlare's ``PTFileModelPersistor`` does. Run it at a site:
the key must not leave the site's kit.

``export``: a plain (or decrypted) global model to TorchScript and ONNX, each checked against
the network on a sample input (:mod:`medflare.training.model_export`); the network is the
server persistor's of ``JOB_DIR`` and the sample input's shape comes from its site executor
(:mod:`medflare.export.job_model`). Writes ``<stem>.torchscript.pt``, ``<stem>.onnx`` and
``<stem>.export.json`` into ``--out`` (default: the model's folder); exits 1 when an export
failed its check (the file is left as ``.failed``), 2 when nothing could be exported.
"""

from __future__ import annotations

import json
import os

__all__ = ["add_model_parser", "decrypt_model_file", "export_model_file", "run_model_command"]


def add_model_parser(sub) -> None:
    model = sub.add_parser(
        "model", help="a job's models: decrypt an HE job's encrypted global model at a site, export one to TorchScript/ONNX"
    )
    model_sub = model.add_subparsers(dest="action", required=True)
    decrypt = model_sub.add_parser("decrypt", help="decrypt an encrypted global model with a site's CKKS key")
    decrypt.add_argument("model", help="the encrypted model file (e.g. .../workspace/app_server/FL_global_model.pt)")
    decrypt.add_argument("--key", required=True, help="the site's CKKS context with its secret key: <site kit>/startup/client_context.tenseal")
    decrypt.add_argument("--job", required=True, help="the job folder whose network the model is (e.g. jobs/heart_disease_he)")
    decrypt.add_argument("--out", default=None, help="where to write the checkpoint (default: MODEL with .decrypted.pt)")
    export = model_sub.add_parser("export", help="export a global model to TorchScript and ONNX, checked against the network")
    export.add_argument("model", help="the global model checkpoint (e.g. .../app_server/best_FL_global_model.pt)")
    export.add_argument("--job", required=True, help="the job folder whose network the model is (e.g. jobs/brats_fedavg)")
    export.add_argument("--out", default=None, help="folder of the exports (default: the model's folder)")
    export.add_argument("--formats", default="torchscript,onnx", help="comma-separated: torchscript, onnx (default both)")
    export.add_argument("--atol", type=float, default=None, help="absolute tolerance of the agreement check (default 1e-4)")
    export.add_argument("--rtol", type=float, default=None, help="relative tolerance of the agreement check (default 1e-3)")


def _job_network(job_dir: str):
    from medflare.training.model_spec import build_model

    path = os.path.join(job_dir, "app", "config", "config_fed_client.json")
    try:
        with open(path) as f:
            spec = json.load(f)["executors"][0]["executor"]["args"]["model"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"--job {job_dir}: cannot read the network from {path} ({type(e).__name__}: {e})") from None
    return build_model(spec)


def decrypt_model_file(model_path: str, key_path: str, job_dir: str, out_path: str) -> dict:
    """Decrypt ``model_path`` with the context in ``key_path`` to ``job_dir``'s network; write ``out_path``.

    Returns:
        ``{"parameters": n, "values": total values, "out": out_path}``.

    Raises:
        ValueError: naming the file or argument at fault; nothing is written.
    """
    import numpy as np
    import tenseal
    import torch

    from medflare.transport.ckks_update import decrypt_update

    try:
        with open(key_path, "rb") as f:
            context = tenseal.context_from(f.read())
    except OSError as e:
        raise ValueError(f"--key {key_path}: {e.strerror or e}") from None
    except Exception as e:
        raise ValueError(f"--key {key_path}: not a TenSEAL context ({type(e).__name__}: {e})") from None
    if not context.is_private():
        raise ValueError(
            f"--key {key_path}: this context holds no secret key (the server's server_context.tenseal?); "
            "use a site's startup/client_context.tenseal"
        )
    try:
        saved = torch.load(model_path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise ValueError(f"{model_path}: no such file") from None
    except Exception as e:
        raise ValueError(f"{model_path}: not a PyTorch checkpoint ({type(e).__name__}: {e})") from None
    weights = saved.get("model", saved) if isinstance(saved, dict) else None
    if not isinstance(weights, dict) or not weights or not all(isinstance(v, (bytes, bytearray)) for v in weights.values()):
        raise ValueError(f"{model_path}: not an encrypted model (its parameters are not all CKKS ciphertexts)")
    state = _job_network(job_dir).state_dict()
    missing, unexpected = sorted(set(state) - set(weights)), sorted(set(weights) - set(state))
    if missing or unexpected:
        raise ValueError(f"{model_path} does not fit the network of {job_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        flat = decrypt_update(weights, context)
    except Exception as e:
        raise ValueError(f"{model_path}: cannot be decrypted with {key_path} ({type(e).__name__}: {e})") from None
    out = {}
    for name, ref in state.items():
        values = flat[name]
        if values.size != ref.numel():
            raise ValueError(f"{model_path}: {name!r} holds {values.size} values, the network's has {ref.numel()}")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{model_path}: {name!r} decrypts to non-finite values (another federation's key?)")
        tensor = torch.from_numpy(values.reshape(tuple(ref.shape)))
        out[name] = (torch.round(tensor) if not ref.is_floating_point() else tensor).to(ref.dtype)
    torch.save({"model": out}, out_path)
    return {"parameters": len(out), "values": int(sum(v.numel() for v in out.values())), "out": out_path}


def export_model_file(model_path: str, job_dir: str, out_dir=None, formats=("torchscript", "onnx"), rtol=None, atol=None):
    """Export ``model_path``, a checkpoint of ``job_dir``'s server network; the
    :class:`~medflare.training.model_export.ExportReport`.

    Raises:
        ValueError: naming the file or argument at fault (an encrypted model: decrypt it first);
            nothing written.
        MissingDependency: ONNX asked for without onnx/onnxruntime.
    """
    from medflare.export.global_checkpoint import export_checkpoint
    from medflare.export.job_model import job_export_inputs
    from medflare.recipes.job_definition import JobDefinition
    from medflare.training.model_export import DEFAULT_ATOL, DEFAULT_RTOL, check_export_arguments
    from medflare.training.model_spec import build_model

    rtol = DEFAULT_RTOL if rtol is None else rtol
    atol = DEFAULT_ATOL if atol is None else atol
    check_export_arguments(formats, rtol, atol)
    definition = JobDefinition.from_folder(job_dir)
    try:
        spec, shapes = job_export_inputs(definition.server, definition.client)
    except ValueError as e:
        raise ValueError(f"--job {job_dir}: {e}") from None
    return export_checkpoint(model_path, build_model(spec), shapes, out_dir, formats, rtol=rtol, atol=atol)


def _print_export(report) -> None:
    shapes = ", ".join(f"{n} {s}" for n, s in zip(report.input_names, report.input_shapes))
    print(f"sample input: {shapes}; checked at batch sizes {report.check_batch_sizes}")
    for e in report.exports:
        if e.passed:
            print(f"{e.format}: {e.file} ({e.bytes} bytes, {e.seconds:.1f} s): agrees, max abs error {e.max_abs_error:.3g}, "
                  f"max rel error {e.max_rel_error:.3g}")
        else:
            print(f"{e.format}: FAILED: {e.error}" + (f" (left as {e.file})" if e.file else ""))
    print(f"report: {report.report_file}")


def run_model_command(args) -> int:
    if args.action == "export":
        formats = [f.strip() for f in args.formats.split(",") if f.strip()]
        report = export_model_file(args.model, args.job, args.out, formats, rtol=args.rtol, atol=args.atol)
        _print_export(report)
        return 0 if report.passed else 1
    out = args.out or os.path.splitext(args.model)[0] + ".decrypted.pt"
    done = decrypt_model_file(args.model, args.key, args.job, out)
    print(f"decrypted {done['parameters']} parameters ({done['values']} values) to {done['out']}")
    return 0
