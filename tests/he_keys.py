"""CKKS keys for tests, made as NVFlare 2.9's provisioning makes them (``HEBuilder``'s defaults),
and installed in a participant's startup folder the way a provisioned kit holds them."""

from __future__ import annotations

import functools
import os

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext

from medflare.transport.he_context import use_startup_kit

CLIENT_CONTEXT = "client_context.tenseal"
SERVER_CONTEXT = "server_context.tenseal"


@functools.lru_cache(maxsize=None)
def serialized_contexts() -> tuple[bytes, bytes]:
    """``(client context with the secret key, server context without it)``, as ``HEBuilder`` writes them."""
    from nvflare.lighter.impl.he import HEBuilder

    builder = HEBuilder()
    builder.initialize(None, None)
    return builder.get_serialized_context(is_client=True), builder.get_serialized_context(is_client=False)


def contexts():
    """Fresh ``(client, server)`` TenSEAL contexts from :func:`serialized_contexts`."""
    import tenseal

    client, server = serialized_contexts()
    return tenseal.context_from(client), tenseal.context_from(server)


def install_contexts(startup_dir: str, fl_ctx: FLContext) -> None:
    """Write both contexts into ``startup_dir``, point NVFlare's ``SecurityContentService`` at it
    and mark ``fl_ctx`` not secure (a test kit is not signed by a provisioner)."""
    client, server = serialized_contexts()
    os.makedirs(startup_dir, exist_ok=True)
    for name, content in ((CLIENT_CONTEXT, client), (SERVER_CONTEXT, server)):
        with open(os.path.join(startup_dir, name), "wb") as f:
            f.write(content)
    use_startup_kit(startup_dir)
    fl_ctx.set_prop(FLContextKey.SECURE_MODE, False, private=True, sticky=True)
