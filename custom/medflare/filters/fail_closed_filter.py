"""Base class of medflare's privacy filters: a result leaves only when everything in it is accounted for.

NVFlare's ``DXOFilter`` looks at one thing, the DXO's data, and passes a result through unchanged
when its return code is not OK, when it holds no DXO, or when the data kind is not one the filter
handles; the DXO's meta, the headers and any other key of the shareable always travel as the
executor wrote them. For a privacy filter each of those is a route out of the site.
:class:`FailClosedDXOFilter` instead builds the result it releases from nothing, out of parts it
has checked against the wire contract (:mod:`medflare.wire_contract`):

- **the shareable**: only its headers and one DXO; any other key is refused, naming it;
- **the headers**: only the declared ones (return code, content type, round), values checked;
- **an error reply**: stripped to its return code, whatever else it carried (logged);
- **the DXO**: ``kind``, ``data`` and ``meta`` only;
- **the meta**: every key declared and its value of the declared kind (no arrays, no long
  strings); data-dependent keys leave only when the site's filter names them in
  ``release_meta`` (each subclass has a default, strict under differential privacy);
- **passthrough kinds** (``METRICS`` by default, for validation results): their data must be a
  flat mapping of names to numbers, so no array can travel as "metrics";
- **model kinds** the filter handles: the data is filtered by the subclass; numpy arrays and
  torch tensors of float16, bfloat16, float32 and float64 are all accepted (bfloat16, which
  numpy lacks, is widened to float32 exactly) and the released data is numpy, checked finite.

Anything else raises :class:`UnsafeUpdateError`; NVFlare then replies ``TASK_RESULT_FILTER_ERROR``
and sends nothing. An error inside the filter is refused the same way.

Every filter that releases a model result appends ``{"filter": class name, "source": "site" |
"job"}`` to the meta under :data:`medflare.wire_contract.FILTERS_APPLIED` (NVFlare tags each
filter with where it was configured), so the server, and the run's metrics, show which filters
a site's policy added.

A subclass implements :meth:`filter_dxo` and returns a new DXO; it never returns its input.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.filter import Filter, FilterContextKey
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_reply

from medflare.privacy.update_checks import UnsafeUpdateError, all_finite, as_numpy, as_numpy_update
from medflare.transport.sparse_update import SparseTensor
from medflare.wire_contract import (
    CURRENT_ROUND,
    FILTERS_APPLIED,
    PASSTHROUGH_KINDS,
    WireContractError,
    check_release_meta,
    check_result_headers,
    check_result_meta,
    check_return_code,
    check_scalar_mapping,
    released_meta,
)

__all__ = ["APPLIED_META_KEY", "FailClosedDXOFilter", "check_passthrough_kinds"]

#: kept for compatibility: the contract's :data:`medflare.wire_contract.FILTERS_APPLIED`
APPLIED_META_KEY = FILTERS_APPLIED

_DXO_KEY = "DXO"
_DXO_FIELDS = frozenset({"kind", "data", "meta"})


def _released_arrays(data, ciphertexts: bool = False) -> dict:
    """The filtered data as it goes on the wire: numpy arrays (a tensor left on an accelerator
    by a torch path is copied back) or sparse tensors, every floating value finite; or, from a
    filter that encrypts, serialized ciphertexts and nothing else."""
    if not isinstance(data, dict) or not data:
        raise UnsafeUpdateError(f"the filter released {type(data).__name__}, not a non-empty mapping; nothing released")
    if ciphertexts:
        plain = sorted(str(k) for k, v in data.items() if not isinstance(v, bytes))
        if plain:
            raise UnsafeUpdateError(f"the encrypting filter left {plain[:5]} unencrypted; nothing released")
        return dict(data)
    out = {}
    for key, value in data.items():
        if isinstance(value, SparseTensor):
            values = value.values
        else:
            value = as_numpy(value) if hasattr(value, "detach") else value
            if not isinstance(value, np.ndarray):
                raise UnsafeUpdateError(f"the filter released {key!r} as {type(value).__name__}; nothing released")
            values = value
        if values.dtype.kind == "f" and not all_finite(values):
            raise UnsafeUpdateError(f"the released {key!r} holds NaN or infinite values; nothing released")
        out[key] = value
    return out


def _kind_name(kind) -> str:
    return getattr(kind, "value", kind)


def check_passthrough_kinds(passthrough_data_kinds) -> list[str]:
    """Validate ``passthrough_data_kinds``: a list of DataKind names that carry no model parameters."""
    if not isinstance(passthrough_data_kinds, (list, tuple)):
        raise TypeError(f"passthrough_data_kinds must be a list of data kind names, got {passthrough_data_kinds!r}")
    for kind in passthrough_data_kinds:
        if kind not in PASSTHROUGH_KINDS:
            raise ValueError(
                f"passthrough_data_kinds may only name kinds without model parameters {list(PASSTHROUGH_KINDS)}, "
                f"got {kind!r}"
            )
    return list(passthrough_data_kinds)


class FailClosedDXOFilter(Filter):
    """A filter that releases only what it has checked, and raises rather than let anything else through.

    Args:
        supported_data_kinds: the DXO data kinds the filter transforms.
        passthrough_data_kinds: kinds without model parameters let through after checking that
            they carry only named numbers (default ``["METRICS"]``); every other kind is refused.
        release_meta: data-dependent meta keys of the wire contract this site lets leave with a
            result (see :data:`medflare.wire_contract.DATA_DEPENDENT_META`); null takes
            ``default_release_meta``. Keys not named are withheld (dropped, and logged by name).
        default_release_meta: what a null ``release_meta`` means for this filter.
    """

    #: whether :meth:`filter_dxo` takes sparse entries encoded by an earlier filter of the chain
    #: (a filter that checks and charges, and changes no value, can; one that computes on
    #: the values cannot, and refuses them)
    accepts_sparse_entries = False
    #: whether :meth:`filter_dxo` releases serialized ciphertexts (every entry ``bytes``) rather
    #: than arrays; only an encrypting filter, which must be the last of the site's chain, does
    releases_ciphertexts = False

    def __init__(
        self,
        supported_data_kinds: Sequence[str],
        passthrough_data_kinds: Optional[Sequence[str]] = None,
        release_meta: Optional[Sequence[str]] = None,
        default_release_meta: Sequence[str] = (),
    ):
        super().__init__()
        self.supported_data_kinds = list(supported_data_kinds)
        self.passthrough_data_kinds = passthrough_data_kinds
        self.release_meta = release_meta
        self._passthrough = check_passthrough_kinds(["METRICS"] if passthrough_data_kinds is None else passthrough_data_kinds)
        self._release_meta = check_release_meta(default_release_meta if release_meta is None else release_meta)

    def filter_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:  # pragma: no cover - interface
        raise NotImplementedError

    # the one entry point NVFlare calls ----------------------------------------------------------

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        name = type(self).__name__
        try:
            return self._release(shareable, fl_ctx)
        except (UnsafeUpdateError, WireContractError) as e:
            self._refuse(fl_ctx, f"{name}: {e}")
        except Exception as e:
            self.log_exception(fl_ctx, f"{name}: internal error, nothing released: {e}")
            raise UnsafeUpdateError(f"{name}: internal error, nothing released: {e}") from e

    def _refuse(self, fl_ctx: FLContext, message: str):
        self.log_error(fl_ctx, message)
        raise UnsafeUpdateError(message)

    # building the released result ---------------------------------------------------------------

    def _release(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if not isinstance(shareable, Shareable):
            raise UnsafeUpdateError(f"the result is a {type(shareable).__name__}, not a Shareable; it is not released")
        headers = shareable.get(ReservedHeaderKey.HEADERS)
        if headers is None:
            headers = {}
        if not isinstance(headers, dict):
            raise UnsafeUpdateError(f"the result's headers are a {type(headers).__name__}, not a mapping; it is not released")
        rc = check_return_code(headers.get(ReservedHeaderKey.RC, ReturnCode.OK))
        if rc != ReturnCode.OK:
            return self._stripped_error_reply(rc, shareable, headers, fl_ctx)

        extra = sorted(str(k) for k in shareable if k not in (ReservedHeaderKey.HEADERS, _DXO_KEY))
        if extra:
            raise UnsafeUpdateError(f"the result carries the keys {extra[:5]} beside its DXO; it is not released")
        checked_headers = check_result_headers(headers)
        dxo = self._read_dxo(shareable)
        meta, withheld = released_meta(dxo.meta, self._release_meta)
        if withheld:
            self.log_info(fl_ctx, f"{type(self).__name__}: withheld data-dependent meta {withheld} (not in release_meta)")

        kind = _kind_name(dxo.data_kind)
        if kind in self._passthrough:
            data = check_scalar_mapping(f"the {kind} data", dxo.data)
            released = DXO(data_kind=dxo.data_kind, data=data, meta=meta)
            self.log_debug(fl_ctx, f"{type(self).__name__}: {kind} carries only named numbers; released")
        elif dxo.data_kind in self.supported_data_kinds:
            released = self._filtered(DXO(data_kind=dxo.data_kind, data=self._input_update(dxo.data), meta=meta), shareable, fl_ctx)
        else:
            raise UnsafeUpdateError(
                f"data kind {kind} is not released; this filter handles "
                f"{[_kind_name(k) for k in self.supported_data_kinds]} and passes {self._passthrough}"
            )
        out = Shareable()
        if checked_headers.get(CURRENT_ROUND) is not None:
            out.set_header(CURRENT_ROUND, checked_headers[CURRENT_ROUND])
        return released.update_shareable(out)

    def _input_update(self, data) -> dict:
        """The model data as :meth:`filter_dxo` receives it: numpy arrays (or accelerator tensors);
        with :attr:`accepts_sparse_entries`, the :class:`~medflare.transport.sparse_update.SparseTensor`
        entries an earlier filter of the chain encoded are kept as they are, their values checked."""
        if not self.accepts_sparse_entries or not isinstance(data, dict) or not data:
            return as_numpy_update(data)
        plain = {k: v for k, v in data.items() if not isinstance(v, SparseTensor)}
        dense = as_numpy_update(plain) if plain else {}
        out = {}
        for key, value in data.items():
            if isinstance(value, SparseTensor):
                as_numpy_update({key: value.values})  # a parameter name, and numbers only
                out[key] = value
            else:
                out[key] = dense[key]
        return out

    def _stripped_error_reply(self, rc: str, shareable: Shareable, headers: dict, fl_ctx: FLContext) -> Shareable:
        """An error reply reveals nothing but its return code; everything else it held is dropped."""
        dropped = sorted(str(k) for k in shareable if k != ReservedHeaderKey.HEADERS)
        dropped += sorted(f"header {k}" for k in headers if k != ReservedHeaderKey.RC)
        if dropped:
            self.log_warning(fl_ctx, f"{type(self).__name__}: error reply {rc}: dropped {dropped[:8]} before sending")
        return make_reply(rc)

    @staticmethod
    def _read_dxo(shareable: Shareable) -> DXO:
        encoded = shareable.get(_DXO_KEY)
        if not isinstance(encoded, dict):
            raise UnsafeUpdateError(f"the result holds no DXO (got {type(encoded).__name__}); it is not released")
        extra = sorted(str(k) for k in encoded if k not in _DXO_FIELDS)
        if extra:
            raise UnsafeUpdateError(f"the DXO carries the fields {extra[:5]} beside kind, data and meta; it is not released")
        try:
            return from_shareable(shareable)
        except Exception as e:
            raise UnsafeUpdateError(f"the result is not a DXO ({e}); it is not released") from None

    def _filtered(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        name = type(self).__name__
        filtered = self.filter_dxo(dxo, shareable, fl_ctx)
        if not isinstance(filtered, DXO) or filtered is dxo or filtered.data is dxo.data:
            raise UnsafeUpdateError("the filter produced no new DXO; nothing released")
        filtered = DXO(
            data_kind=filtered.data_kind,
            data=_released_arrays(filtered.data, self.releases_ciphertexts),
            meta=dict(filtered.meta or {}),
        )
        filtered.add_filter_history(name)
        applied = list(filtered.get_meta_prop(FILTERS_APPLIED) or [])
        applied.append({"filter": name, "source": self.get_prop(FilterContextKey.SOURCE, "unknown")})
        filtered.set_meta_prop(FILTERS_APPLIED, applied)
        # what a subclass added must be declared too
        return DXO(data_kind=filtered.data_kind, data=filtered.data, meta=check_result_meta(filtered.meta, "released meta"))
