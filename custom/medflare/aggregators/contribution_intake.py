"""What every medflare aggregator does with a site's result before it looks at the data.

A contribution is checked whole before any of it is used, and a refused one is logged with the
site and the reason and leaves nothing behind. The checks every aggregator shares are here: the
peer's identity, the return code, the round (the server's ``CURRENT_ROUND`` and the result's
``CONTRIBUTION_ROUND`` cookie), a round already aggregated, the same site twice, that the
payload is a DXO of the expected kind. What the data itself must satisfy is the subclass's:
plaintext arrays (:class:`~medflare.aggregators.validated_aggregator.ValidatedAggregator`) or
ciphertexts (:class:`~medflare.aggregators.encrypted_aggregator.EncryptedSumAggregator`).
"""

from __future__ import annotations

from typing import Optional

from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.app_constant import AppConstants

from medflare.aggregators.contribution_checks import ContributionRejected, check_round

__all__ = ["ContributionIntake"]


class ContributionIntake(Aggregator):
    """``accept()`` for aggregators that check each contribution whole before keeping it.

    A subclass sets ``expected_data_kind``, keeps the round's state in :meth:`reset` (calling
    this one's), and implements :meth:`_checked` (what the data must satisfy; returns the
    contribution as a tuple whose first element is the site) and :meth:`_accepted_detail`.
    """

    expected_data_kind: str = "WEIGHT_DIFF"

    def __init__(self):
        # explicitly, not super(): a subclass that is also a ModelAggregator would otherwise run
        # ModelAggregator.__init__, which does not call FLComponent's (no logger, no name)
        Aggregator.__init__(self)
        self.fl_ctx: Optional[FLContext] = None
        self._aggregated_round: Optional[int] = None

    def reset(self, fl_ctx: Optional[FLContext]):
        self._accepted: list[tuple] = []
        self._rejected: dict[str, str] = {}
        self._round = None

    def _checked(self, dxo: DXO, shareable: Shareable, site: str, fl_ctx: FLContext) -> tuple:  # pragma: no cover
        raise NotImplementedError

    def _accepted_detail(self, contribution: tuple) -> str:  # pragma: no cover
        raise NotImplementedError

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        site = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default=None)
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if current_round != self._round:  # a workflow that never called reset(): start the round afresh
            self.reset(fl_ctx)
            self._round = current_round
        try:
            if not isinstance(site, str) or not site:
                raise ContributionRejected(f"the peer has no identity name (got {site!r:.60})")
            contribution = self._checked(self._read(shareable, site, current_round), shareable, site, fl_ctx)
        except ContributionRejected as e:
            return self._reject(site, current_round, str(e), fl_ctx)
        except Exception as e:  # fail closed: what cannot be checked is not aggregated
            return self._reject(site, current_round, f"could not be checked ({type(e).__name__}: {e})", fl_ctx)
        self._accepted.append(contribution)
        self.log_info(fl_ctx, f"accepted the contribution of {site} in round {current_round} ({self._accepted_detail(contribution)})")
        return True

    def _reject(self, site, current_round, reason: str, fl_ctx: FLContext) -> bool:
        name = site if isinstance(site, str) and site else "?"
        while name in self._rejected:  # a second refusal of the same name keeps the first reason
            name += "'"
        self._rejected[name] = reason
        self.log_error(fl_ctx, f"rejected the contribution of {name} in round {current_round}: {reason}")
        return False

    def _read(self, shareable: Shareable, site: str, current_round) -> DXO:
        """The contribution's DXO, after the checks every aggregator makes."""
        rc = shareable.get_return_code(ReturnCode.OK)
        if rc != ReturnCode.OK:
            raise ContributionRejected(f"return code {rc}")
        round_number = check_round(shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND), current_round)
        if round_number == self._aggregated_round:
            raise ContributionRejected(f"round {round_number} was already aggregated")
        if any(c[0] == site for c in self._accepted):
            raise ContributionRejected("the same site already contributed this round")
        try:
            dxo = from_shareable(shareable)
        except Exception as e:
            raise ContributionRejected(f"not a DXO ({e})") from None
        kind = getattr(dxo.data_kind, "value", dxo.data_kind)
        if kind != self.expected_data_kind:
            raise ContributionRejected(f"data kind {kind}, expected {self.expected_data_kind}")
        return dxo

    def _mark_aggregated(self, current_round) -> None:
        if isinstance(current_round, int) and not isinstance(current_round, bool):
            self._aggregated_round = current_round
