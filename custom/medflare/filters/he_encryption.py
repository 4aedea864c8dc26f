"""NVFlare filter that encrypts a site's result with CKKS for secure aggregation: the last of the site's chain.

The scheme, the layout (NVFlare's, so that NVFlare's HE shareable generator, serialize filter,
decryptor and cross-site evaluation work on it) and what the server can and cannot check are in
:mod:`medflare.transport.ckks_update`.

A site's own filters run first (partial sharing, Gaussian DP, DP-SGD record checks), then this
one; it must be last, since a filter after it sees only ciphertexts, and medflare's filters
refuse those. What the server can no longer check on ciphertexts this filter checks before it
encrypts, and refuses otherwise:

- every value finite (the fail-closed base class, then again on the dense vector);
- the update's L2 norm at most ``max_update_norm``, the bound the job's server-side checks
  would have applied (``ValidatedAggregator``'s ``max_update_norm``);
- the weight it multiplies by: the count named by ``weight_meta_key`` when the earlier filters
  released it, else 1 (an equal weight); both are recorded under
  :data:`medflare.wire_contract.ENCRYPTION` for the server's ``EncryptedSumAggregator``.

Partial sharing under HE: sparse entries from :class:`~medflare.filters.percentile_sharing.PercentileSharingFilter`
are restored to the dense vector with zeros where nothing was shared, and that vector is
encrypted whole. No mask travels: the server learns neither which entries a site kept nor how
many (a CKKS vector has the same size whatever it holds). The price is that ciphertexts are
dense: sparse transport saves nothing under HE. (Encrypting only the kept values, with their
mask in the clear, would reveal to the server where each site's largest updates are, and
could not be summed across sites without moving values between ciphertext slots.)

For ``WEIGHTS`` (the ``submit_model`` task of cross-site evaluation) only a model the executor
marks ``site_only`` is encrypted, unweighted; the last round's local weights are refused (with
the global model they give the round's update). Who can read an encrypted site-only model:
every site (they hold the key), not the server.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_opt.he.model_decryptor import HEModelDecryptor as NVFlareHEModelDecryptor

from medflare.filters.fail_closed_filter import FailClosedDXOFilter
from medflare.privacy.argument_checks import check_real
from medflare.privacy.update_checks import UnsafeUpdateError, check_update, l2_norm
from medflare.transport.ckks_update import CKKS, encrypt_update
from medflare.transport.he_context import HoldsParticipantContext, load_participant_context
from medflare.transport.sparse_update import SparseTensor, decode_sparse, register_sparse_decomposers
from medflare.wire_contract import (
    ENCRYPTION,
    HE_ALGORITHM,
    HE_PROCESSED_KEYS,
    LOCAL_MODEL,
    NUM_TRAIN_CASES,
    WEIGHT_KEYS,
)

__all__ = ["HEModelDecryptor", "HEUpdateEncryptor", "encrypted_result"]


def encrypted_result(
    update: dict,
    meta: dict,
    context,
    weighted_by: str,
    weight: float,
    norm_bound: Optional[float],
    distributed_dp_sites: Optional[int] = None,
) -> tuple[dict, dict]:
    """``(data, meta)`` of an encrypted result: every entry of ``update`` multiplied by
    ``weight`` and CKKS-encrypted, NVFlare's HE meta and medflare's encryption record added.

    Raises:
        UnsafeUpdateError: anything :func:`~medflare.transport.ckks_update.encrypt_update` refuses.
    """
    try:
        encrypted = encrypt_update(update, context, weight)
    except ValueError as e:
        raise UnsafeUpdateError(f"not encrypted: {e}") from None
    meta = dict(meta)
    meta[HE_PROCESSED_KEYS] = {name: True for name in encrypted}
    meta[HE_ALGORITHM] = CKKS
    record = {
        "scheme": CKKS,
        "weighted_by": weighted_by,
        "weight": float(weight),
        "max_update_norm": norm_bound,
        "num_values": int(sum(np.size(v) for v in update.values())),
    }
    if distributed_dp_sites is not None:
        record["distributed_dp_sites"] = int(distributed_dp_sites)
    meta[ENCRYPTION] = record
    return encrypted, meta  # the filter's base class checks the released meta against the contract


class HEUpdateEncryptor(HoldsParticipantContext, FailClosedDXOFilter):
    """Check, weight and CKKS-encrypt a site's ``WEIGHT_DIFF`` (or its site-only ``WEIGHTS``).

    Args:
        max_update_norm: L2 bound on the update the site sends, in (0, inf); the update is
            refused above it (the server cannot check norms on ciphertexts). Use the job's
            ``max_update_norm``.
        weight_meta_key: the count the site weights by, ``num_train_cases`` (default) or
            ``NUM_STEPS_CURRENT_ROUND``; when an earlier filter withheld it, the weight is 1.
            Must be the server aggregator's ``weight_meta_key``.
        tenseal_context_file: the context in the startup kit (``client_context.tenseal``,
            written by provisioning with NVFlare's ``HEBuilder``).
        passthrough_data_kinds, release_meta: as for every medflare filter; ``release_meta``
            null keeps what the earlier filters released.

    Raises:
        ValueError, TypeError: when the job is built, naming the argument.
    """

    accepts_sparse_entries = True
    releases_ciphertexts = True

    def __init__(
        self,
        max_update_norm: float,
        weight_meta_key: str = NUM_TRAIN_CASES,
        tenseal_context_file: str = "client_context.tenseal",
        passthrough_data_kinds: Optional[list] = None,
        release_meta: Optional[list] = None,
    ):
        from medflare.wire_contract import DATA_DEPENDENT_META

        super().__init__(
            [DataKind.WEIGHT_DIFF, DataKind.WEIGHTS],
            passthrough_data_kinds,
            release_meta,
            default_release_meta=DATA_DEPENDENT_META,  # what the earlier filters let through stays
        )
        check_real("max_update_norm", max_update_norm, 0.0, None, low_open=True)
        if weight_meta_key not in WEIGHT_KEYS:
            raise ValueError(f"weight_meta_key must be one of {list(WEIGHT_KEYS)}, got {weight_meta_key!r}")
        self.max_update_norm = float(max_update_norm)
        self.weight_meta_key = weight_meta_key
        self._set_context_file(tenseal_context_file)
        register_sparse_decomposers()

    def filter_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        context = self._ckks_context(fl_ctx)
        update = self._dense(dxo.data)
        meta = dict(dxo.meta)
        if dxo.data_kind == DataKind.WEIGHTS:
            if meta.get(LOCAL_MODEL) != "site_only":
                raise UnsafeUpdateError(
                    f"only a site-only model is encrypted as WEIGHTS (the executor marked this one "
                    f"{meta.get(LOCAL_MODEL)!r}); the last round's local weights give the round's update"
                )
            norm_bound, weighted_by, weight = None, "equal", 1.0
        else:
            norm = l2_norm(update)
            if not np.isfinite(norm) or norm > self.max_update_norm:
                # the norm is data-dependent: it is logged here, at the site, never sent
                raise UnsafeUpdateError(
                    f"the update's L2 norm {norm:.6g} exceeds max_update_norm {self.max_update_norm:g}; "
                    "the server cannot check it once encrypted, so it is not sent"
                )
            norm_bound = self.max_update_norm
            count = meta.get(self.weight_meta_key)
            weighted_by, weight = (self.weight_meta_key, float(count)) if count else ("equal", 1.0)
        data, meta = encrypted_result(update, meta, context, weighted_by, weight, norm_bound)
        self.log_info(
            fl_ctx,
            f"encrypted {len(data)} {dxo.data_kind} entries with CKKS (weight {weight:g}, {weighted_by}); "
            f"{sum(len(v) for v in data.values())} bytes",
        )
        return DXO(data_kind=dxo.data_kind, data=data, meta=meta)

    @staticmethod
    def _dense(data: dict) -> dict:
        """Sparse entries restored with zeros where nothing was shared; every entry finite (checked
        before the norm, so that a NaN is named as one)."""
        sparse = {k: v for k, v in data.items() if isinstance(v, SparseTensor)}
        dense = dict(data)
        if sparse:
            try:
                dense.update(decode_sparse(sparse))
            except ValueError as e:
                raise UnsafeUpdateError(f"malformed sparse entries: {e}") from None
        check_update(dense, require_float=False)
        return dense


class HEModelDecryptor(NVFlareHEModelDecryptor):
    """NVFlare's ``HEModelDecryptor`` for a site's task data, loading its key with a clear message.

    The global model a site receives in an HE job is encrypted from the second round on (the
    first is the persistor's plaintext initial model, passed through as NVFlare's filter does);
    this decrypts it with the site's key, each parameter flat (the executor reshapes a flat
    vector of the parameter's exact size). Without a CKKS context in the startup kit NVFlare's
    own filter fails with ``TypeError: deserialize(): incompatible function arguments``; this
    one names the file and says to provision with HE.

    Args:
        tenseal_context_file: the context in the startup kit (``client_context.tenseal``).
    """

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self.tenseal_context = load_participant_context(self.tenseal_context_file, fl_ctx)
        elif event_type == EventType.END_RUN:
            self.tenseal_context = None

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext):
        if self.tenseal_context is None:
            self.tenseal_context = load_participant_context(self.tenseal_context_file, fl_ctx)
        return super().process_dxo(dxo, shareable, fl_ctx)
