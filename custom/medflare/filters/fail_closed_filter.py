"""Base class of medflare's privacy filters: whatever goes wrong, nothing unfiltered leaves.

NVFlare's ``DXOFilter`` passes a result through unchanged when its return code is not OK, when
it holds no DXO, or when the data kind is not one the filter handles. For a privacy filter each
of those is a way for an unfiltered update to leave the site. :class:`FailClosedDXOFilter`
raises instead; NVFlare then replies ``TASK_RESULT_FILTER_ERROR`` and sends nothing. An error
reply is passed through only when it carries nothing but headers.

A site's ``privacy.json`` filters see every task's result, validation metrics included. Data
kinds that carry no model parameters can be let through by name (``passthrough_data_kinds``,
``["METRICS"]`` by default); model kinds (``WEIGHTS``, ``WEIGHT_DIFF``, ``COLLECTION``) never can.

Every filter that releases a result appends ``{"filter": class name, "source": "site" | "job"}``
to the DXO meta under ``medflare_filters_applied`` (NVFlare tags each filter with where it was
configured), so the server, and the run's metrics, show which filters a site's policy added.

A subclass implements :meth:`filter_dxo` and returns a new DXO; it never returns its input.
"""

from __future__ import annotations

from typing import Optional, Sequence

from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.filter import Filter, FilterContextKey
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable

from medflare.privacy.update_checks import UnsafeUpdateError

__all__ = ["APPLIED_META_KEY", "FailClosedDXOFilter"]

#: DXO meta key listing, in order, every medflare filter applied to a result and whether it came
#: from the site's privacy policy (``"site"``) or from the job (``"job"``); it travels to the server.
APPLIED_META_KEY = "medflare_filters_applied"

#: Data kinds that carry no model parameters; only these may be passed through.
_NON_MODEL_KINDS = ("METRICS", "ANALYTIC", "STATISTICS")


def _kind_name(kind) -> str:
    return getattr(kind, "value", kind)


def check_passthrough_kinds(passthrough_data_kinds) -> list[str]:
    """Validate ``passthrough_data_kinds``: a list of DataKind names that carry no model parameters."""
    if not isinstance(passthrough_data_kinds, (list, tuple)):
        raise TypeError(f"passthrough_data_kinds must be a list of data kind names, got {passthrough_data_kinds!r}")
    for kind in passthrough_data_kinds:
        if kind not in _NON_MODEL_KINDS:
            raise ValueError(
                f"passthrough_data_kinds may only name kinds without model parameters {list(_NON_MODEL_KINDS)}, "
                f"got {kind!r}"
            )
    return list(passthrough_data_kinds)


class FailClosedDXOFilter(Filter):
    """A filter that raises rather than let anything it cannot filter through.

    Args:
        supported_data_kinds: the DXO data kinds the filter transforms.
        passthrough_data_kinds: kinds without model parameters let through unchanged (default
            ``["METRICS"]``); every other kind is refused.
    """

    def __init__(self, supported_data_kinds: Sequence[str], passthrough_data_kinds: Optional[Sequence[str]] = None):
        super().__init__()
        self.supported_data_kinds = list(supported_data_kinds)
        self.passthrough_data_kinds = passthrough_data_kinds
        self._passthrough = check_passthrough_kinds(["METRICS"] if passthrough_data_kinds is None else passthrough_data_kinds)

    def filter_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:  # pragma: no cover - interface
        raise NotImplementedError

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        name = type(self).__name__
        rc = shareable.get_return_code(ReturnCode.OK)
        if rc != ReturnCode.OK:
            if any(key != ReservedHeaderKey.HEADERS for key in shareable):
                self._refuse(fl_ctx, f"{name}: a reply with return code {rc} still carries data; it is not released")
            return shareable  # an error reply with headers only reveals nothing
        try:
            dxo = from_shareable(shareable)
        except Exception as e:
            self._refuse(fl_ctx, f"{name}: the result is not a DXO ({e}); it is not released")
        if _kind_name(dxo.data_kind) in self._passthrough:
            self.log_debug(fl_ctx, f"{name}: {_kind_name(dxo.data_kind)} carries no model parameters; passed through")
            return shareable
        if dxo.data_kind not in self.supported_data_kinds:
            self._refuse(
                fl_ctx,
                f"{name}: data kind {_kind_name(dxo.data_kind)} is not released; this filter handles "
                f"{[_kind_name(k) for k in self.supported_data_kinds]}",
            )
        try:
            filtered = self.filter_dxo(dxo, shareable, fl_ctx)
        except UnsafeUpdateError as e:
            self._refuse(fl_ctx, f"{name}: {e}")
        except Exception as e:
            self.log_exception(fl_ctx, f"{name}: internal error, nothing released: {e}")
            raise UnsafeUpdateError(f"{name}: internal error, nothing released: {e}") from e
        if not isinstance(filtered, DXO) or filtered is dxo or filtered.data is dxo.data:
            self._refuse(fl_ctx, f"{name}: filter produced no new DXO; nothing released")
        filtered.add_filter_history(name)
        applied = list(filtered.get_meta_prop(APPLIED_META_KEY) or [])
        applied.append({"filter": name, "source": self.get_prop(FilterContextKey.SOURCE, "unknown")})
        filtered.set_meta_prop(APPLIED_META_KEY, applied)
        return filtered.update_shareable(shareable)

    def _refuse(self, fl_ctx: FLContext, message: str):
        self.log_error(fl_ctx, message)
        raise UnsafeUpdateError(message)
