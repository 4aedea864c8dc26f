"""``medflare model decrypt``: a site turns an HE job's encrypted global model into a PyTorch checkpoint.

    medflare model decrypt MODEL_PT --key CLIENT_CONTEXT --job JOB_DIR [--out OUT_PT]

Under secure aggregation the server saves its global models (``FL_global_model.pt``,
``best_FL_global_model.pt`` in ``app_server``) as CKKS ciphertexts it cannot read. Only a site
holds the key (``startup/client_context.tenseal`` in its kit). This decrypts every parameter
with it and reshapes it to the job's network, built from the job's client configuration, and
writes ``{"model": state_dict}`` as NVFlare's ``PTFileModelPersistor`` does. Run it at a site:
the key must not leave the site's kit.
"""

from __future__ import annotations

import json
import os

__all__ = ["add_model_parser", "decrypt_model_file", "run_model_command"]


def add_model_parser(sub) -> None:
    model = sub.add_parser("model", help="a job's models: decrypt an HE job's encrypted global model at a site")
    model_sub = model.add_subparsers(dest="action", required=True)
    decrypt = model_sub.add_parser("decrypt", help="decrypt an encrypted global model with a site's CKKS key")
    decrypt.add_argument("model", help="the encrypted model file (e.g. .../workspace/app_server/FL_global_model.pt)")
    decrypt.add_argument("--key", required=True, help="the site's CKKS context with its secret key: <site kit>/startup/client_context.tenseal")
    decrypt.add_argument("--job", required=True, help="the job folder whose network the model is (e.g. jobs/heart_disease_he)")
    decrypt.add_argument("--out", default=None, help="where to write the checkpoint (default: MODEL with .decrypted.pt)")


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


def run_model_command(args) -> int:
    out = args.out or os.path.splitext(args.model)[0] + ".decrypted.pt"
    done = decrypt_model_file(args.model, args.key, args.job, out)
    print(f"decrypted {done['parameters']} parameters ({done['values']} values) to {done['out']}")
    return 0
