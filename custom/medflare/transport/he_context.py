"""The CKKS context of a FLARE participant, read from its startup kit (a thin NVFlare adapter).

Provisioning with NVFlare's ``HEBuilder`` (``nvflare poc prepare -he``, or ``HEBuilder`` in a
project's ``project.yml``) writes ``client_context.tenseal`` (with the secret key) into every
client's startup kit and ``server_context.tenseal`` (without it) into the server's. NVFlare's
``SecurityContentService`` reads them, checking the provisioner's signature in secure mode.
"""

from __future__ import annotations

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext

__all__ = ["load_participant_context", "use_startup_kit"]


def load_participant_context(tenseal_context_file: str, fl_ctx: FLContext):
    """The TenSEAL context named ``tenseal_context_file`` in this participant's startup kit.

    Accepts what NVFlare's ``load_tenseal_context_from_workspace`` accepts (in secure mode a
    file the provisioner signed, or one its signature list does not manage), and says what is
    wrong when there is none (NVFlare's own loader then fails on ``None`` with a TypeError).

    Raises:
        ValueError: naming the file and the reason; the federation was not provisioned with HE.
    """
    import tenseal
    from nvflare.fuel.sec.security_content_service import LoadResult, SecurityContentService

    data, rc = SecurityContentService.load_content(tenseal_context_file)
    bad = {LoadResult.INVALID_CONTENT, LoadResult.NO_SUCH_CONTENT}
    if fl_ctx.get_prop(FLContextKey.SECURE_MODE, True):
        bad |= {LoadResult.INVALID_SIGNATURE, LoadResult.NOT_SIGNED}
    if data is None or rc in bad:
        raise ValueError(
            f"no usable CKKS context {tenseal_context_file!r} in this participant's startup kit ({rc}): provision "
            "the federation with NVFlare's HEBuilder (nvflare poc prepare -he, or HEBuilder in project.yml)"
        )
    try:
        return tenseal.context_from(data)
    except Exception as e:
        raise ValueError(f"{tenseal_context_file!r} is not a TenSEAL context ({type(e).__name__}: {e})") from None


def use_startup_kit(startup_dir: str) -> None:
    """Point NVFlare's ``SecurityContentService`` at ``startup_dir`` (its signature list and root
    certificate, when present), replacing the folder it was given before.

    The FLARE client does this once, for its own kit; ``SecurityContentService.initialize``
    keeps the first folder it was given for the life of the process, so a process that reads
    several kits in turn (``medflare audit``'s scratch copies, tests) must set it each time.
    """
    from nvflare.fuel.sec.security_content_service import SecurityContentManager, SecurityContentService

    SecurityContentService.content_folder = startup_dir
    SecurityContentService.security_content_manager = SecurityContentManager(startup_dir)


class HoldsParticipantContext:
    """The CKKS context of a component that encrypts, decrypts or adds ciphertexts: loaded from
    the participant's kit when the run starts (or at first use), dropped when it ends.

    Mix in before the NVFlare base class; call :meth:`_set_context_file` in ``__init__``.
    """

    tenseal_context_file: str
    _context = None

    def _set_context_file(self, tenseal_context_file) -> None:
        if not isinstance(tenseal_context_file, str) or not tenseal_context_file:
            raise TypeError(f"tenseal_context_file must be a file name in the startup kit, got {tenseal_context_file!r}")
        self.tenseal_context_file = tenseal_context_file
        self._context = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        from nvflare.apis.event_type import EventType

        if event_type == EventType.START_RUN:
            self._context = load_participant_context(self.tenseal_context_file, fl_ctx)
        elif event_type == EventType.END_RUN:
            self._context = None

    def _ckks_context(self, fl_ctx: FLContext):
        """The context, loaded now if the run's start did not (raises ValueError without one)."""
        if self._context is None:
            self._context = load_participant_context(self.tenseal_context_file, fl_ctx)
        return self._context
