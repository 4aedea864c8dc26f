"""``medflare model decrypt``: an HE job's encrypted global model back to a checkpoint, with a site's key only."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from medflare.cli.main import main
from medflare.cli.model import decrypt_model_file
from medflare.transport.ckks_update import encrypt_update
from tests.he_keys import contexts, serialized_contexts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
JOB = os.path.join(REPO, "jobs", "heart_disease_he")
STATE = {"head.weight": np.linspace(-1, 1, 13, dtype=np.float32).reshape(1, 13), "head.bias": np.array([0.25], np.float32)}


@pytest.fixture()
def files(tmp_path):
    client, server = serialized_contexts()
    (tmp_path / "client_context.tenseal").write_bytes(client)
    (tmp_path / "server_context.tenseal").write_bytes(server)
    torch.save({"model": encrypt_update(STATE, contexts()[0])}, tmp_path / "FL_global_model.pt")
    return tmp_path


def test_a_site_key_decrypts_the_model_to_the_jobs_network(files, capsys):
    out = files / "plain.pt"
    assert main(["model", "decrypt", str(files / "FL_global_model.pt"), "--key", str(files / "client_context.tenseal"),
                 "--job", JOB, "--out", str(out)]) == 0
    assert "decrypted 2 parameters (14 values)" in capsys.readouterr().out
    model = torch.load(out)["model"]
    assert model["head.weight"].shape == (1, 13) and model["head.weight"].dtype == torch.float32
    for name, value in STATE.items():
        np.testing.assert_allclose(model[name].numpy(), value, atol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: {"key": f / "server_context.tenseal"}, "holds no secret key"),
        (lambda f: {"key": f / "nothing.tenseal"}, "No such file"),
        (lambda f: (f / "junk").write_bytes(b"not a context") and {"key": f / "junk"}, "not a TenSEAL context"),
        (lambda f: {"model": f / "missing.pt"}, "no such file"),
        (lambda f: torch.save({"model": STATE}, f / "plain.pt") or {"model": f / "plain.pt"}, "not an encrypted model"),
        (lambda f: (f / "text.pt").write_text("hello") and {"model": f / "text.pt"}, "not a PyTorch checkpoint"),
        (lambda f: {"job": os.path.join(REPO, "jobs", "brats_he")}, "does not fit the network"),
        (lambda f: {"job": str(f)}, "cannot read the network"),
        (lambda f: torch.save({"model": {"head.weight": b"xx", "head.bias": b"yy"}}, f / "bad.pt") or {"model": f / "bad.pt"},
         "holds 0 values|cannot be decrypted"),
    ],
    ids=["server-key", "no-key-file", "junk-key", "no-model", "plaintext-model", "not-a-checkpoint", "other-network",
         "no-job", "garbage-ciphertexts"],
)
def test_a_wrong_file_or_key_is_named_and_nothing_is_written(files, change, message):
    args = {"model": files / "FL_global_model.pt", "key": files / "client_context.tenseal", "job": JOB}
    args.update(change(files))
    out = files / "out.pt"
    with pytest.raises(ValueError, match=message):
        decrypt_model_file(str(args["model"]), str(args["key"]), str(args["job"]), str(out))
    assert not out.exists()
