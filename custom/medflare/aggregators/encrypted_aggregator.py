"""NVFlare aggregator for CKKS-encrypted contributions: the server adds ciphertexts it cannot read.

It takes the place of :class:`~medflare.aggregators.validated_aggregator.ValidatedAggregator`
in a job whose sites encrypt with medflare's ``HEUpdateEncryptor`` (the last filter of their scope),
beside NVFlare's ``HEModelShareableGenerator`` (which adds the encrypted mean to the global
model, so that the server's global model is encrypted from the first round on) and
``HEModelSerializeFilter`` on the persistor. The server's context has no secret key.

What it still checks, on every contribution, before any of it is used (the scheme's limits are
in :mod:`medflare.transport.ckks_update`):

- the peer, the return code, the round, the same site twice, the data kind (as ``ValidatedAggregator``);
- that it is encrypted: NVFlare's ``PROCESSED_ALGORITHM`` is ``CKKS``, every name is in
  ``PROCESSED_KEYS`` and medflare's encryption record (:data:`medflare.wire_contract.ENCRYPTION`)
  is there; a plaintext contribution is refused, so a site whose scope does not encrypt cannot
  leave its update readable in the sum;
- the names (exactly the global model's), each ciphertext's byte size, that it deserializes
  under the federation's CKKS parameters, and its number of values;
- the weight: what the site multiplied by is the job's count (``weight_meta_key``), equal to the
  count it released and at most ``max_weight``, or 1 (``equal``).

What it cannot check: any value, so neither NaN nor the norm; the site's encryptor checked both
and recorded the norm bound it applied, which must not exceed this aggregator's
``max_update_norm``. Robust estimators (median, trimmed mean) need the values: under HE the
only estimator is the weighted mean.

A round aggregates only when every accepted site weighted the same way (a mean of updates
weighted by case counts and updates weighted 1 would not be the mean of either) and at least
``min_contributions`` were accepted (what distributed DP needs); otherwise the global model is
unchanged (returned as ``WEIGHTS``) and the round is recorded as empty. A contribution made
under distributed DP (:mod:`medflare.privacy.distributed_dp`) states the number of noise shares
its guarantee counts on (``distributed_dp_sites``); a round with fewer accepted contributions
than the largest such number is not aggregated either, whatever ``min_contributions`` says.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

from medflare.aggregators.contribution_checks import ContributionRejected, check_weight
from medflare.aggregators.contribution_intake import ContributionIntake
from medflare.privacy.argument_checks import check_int, check_real
from medflare.transport.ckks_update import CKKS, CiphertextRejected, encrypted_mean, read_ciphertexts
from medflare.transport.he_context import HoldsParticipantContext
from medflare.wire_contract import (
    AGGREGATION,
    ENCRYPTION,
    HE_ALGORITHM,
    HE_PROCESSED_KEYS,
    NUM_STEPS,
    NUM_TRAIN_CASES,
    WEIGHT_KEYS,
)

__all__ = ["EncryptedSumAggregator"]


class EncryptedSumAggregator(HoldsParticipantContext, ContributionIntake):
    """The weighted mean of CKKS-encrypted ``WEIGHT_DIFF`` contributions, each checked as far as ciphertexts allow.

    Args:
        max_update_norm: the largest norm bound a site's encryptor may have applied, in (0, inf):
            a contribution whose record states a larger bound (or none) is refused.
        weight_meta_key: the count sites weight by, ``num_train_cases`` (default) or
            ``NUM_STEPS_CURRENT_ROUND``: the encryptors' ``weight_meta_key``.
        max_weight: refuse a weight above this; null for no cap.
        min_contributions: aggregate a round only with at least this many accepted sites (an
            int >= 1, default 1); distributed DP needs the number of sites its noise assumes.
        fail_after_empty_rounds: stop the job after this many consecutive empty rounds; null
            (default) never stops it.
        tenseal_context_file: the server's context in its startup kit (no secret key).

    Raises:
        ValueError, TypeError: when the job is built, naming the argument.
    """

    def __init__(
        self,
        max_update_norm: float,
        weight_meta_key: str = NUM_TRAIN_CASES,
        max_weight: Optional[float] = None,
        min_contributions: int = 1,
        fail_after_empty_rounds: Optional[int] = None,
        tenseal_context_file: str = "server_context.tenseal",
    ):
        super().__init__()
        check_real("max_update_norm", max_update_norm, 0.0, None, low_open=True)
        if weight_meta_key not in WEIGHT_KEYS:
            raise ValueError(f"weight_meta_key must be one of {list(WEIGHT_KEYS)}, got {weight_meta_key!r}")
        if max_weight is not None:
            check_real("max_weight", max_weight, 0.0, None, low_open=True)
        check_int("min_contributions", min_contributions, 1, None)
        if fail_after_empty_rounds is not None:
            check_int("fail_after_empty_rounds", fail_after_empty_rounds, 1, None)
        self.max_update_norm = float(max_update_norm)
        self.weight_meta_key = weight_meta_key
        self.max_weight = max_weight
        self.min_contributions = min_contributions
        self.fail_after_empty_rounds = fail_after_empty_rounds
        self._set_context_file(tenseal_context_file)
        self._sizes: Optional[dict[str, int]] = None
        self._empty_rounds = 0
        self.reset(None)

    def reset(self, fl_ctx: Optional[FLContext]):
        super().reset(fl_ctx)
        #: self._accepted: (site, {name: CKKSVector}, weight, weighted_by, the sites its distributed DP needs or 1)
        #: site -> bytes of the ciphertexts it sent (what the server held of it)
        self._ciphertext_bytes: dict[str, int] = {}

    # accepting (the peer, return code, round, duplicate and kind checks: ContributionIntake) -----

    def _accepted_detail(self, contribution: tuple) -> str:
        return f"encrypted, weight {contribution[2]:g}, {contribution[3]}"

    def _checked(self, dxo: DXO, shareable: Shareable, site: str, fl_ctx: FLContext):
        record = dxo.get_meta_prop(ENCRYPTION)
        if dxo.get_meta_prop(HE_ALGORITHM) != CKKS or not isinstance(record, dict):
            raise ContributionRejected(
                "not encrypted (no CKKS record): this job aggregates only ciphertexts; the site's "
                "privacy scope must end with HEUpdateEncryptor"
            )
        sizes = self._model_sizes(fl_ctx)
        processed = dxo.get_meta_prop(HE_PROCESSED_KEYS)
        if not isinstance(processed, dict) or set(processed) != set(sizes) or not all(v is True for v in processed.values()):
            raise ContributionRejected("PROCESSED_KEYS does not mark every parameter of the model encrypted")
        bound = record.get("max_update_norm")
        if not isinstance(bound, (int, float)) or isinstance(bound, bool) or not 0 < bound <= self.max_update_norm:
            raise ContributionRejected(
                f"the site's encryptor checked a norm bound of {bound!r}; this job requires one in (0, {self.max_update_norm:g}]"
            )
        weight, weighted_by = self._weight(dxo, record)
        needs = record.get("distributed_dp_sites")
        if needs is None:
            needs = 1
        elif isinstance(needs, bool) or not isinstance(needs, int) or needs < 2:
            raise ContributionRejected(f"distributed_dp_sites must be an int >= 2, got {needs!r}")
        if needs > 1 and weighted_by != "equal":
            raise ContributionRejected("distributed DP needs equal weights; the site weighted by a count")
        try:
            ciphertexts = read_ciphertexts(dxo.data, self._ckks_context(fl_ctx), sizes)
        except CiphertextRejected as e:
            raise ContributionRejected(str(e)) from None
        self._ciphertext_bytes[site] = sum(len(v) for v in dxo.data.values())
        return site, ciphertexts, weight, weighted_by, needs

    def _weight(self, dxo: DXO, record: dict) -> tuple[float, str]:
        weighted_by = record.get("weighted_by")
        weight = record.get("weight")
        if weighted_by == "equal":
            if weight != 1.0:
                raise ContributionRejected(f"weighted equally but multiplied by {weight!r}, not 1")
            return 1.0, weighted_by
        if weighted_by != self.weight_meta_key:
            raise ContributionRejected(f"weighted by {weighted_by!r}; this job weights by {self.weight_meta_key!r} or equally")
        released = dxo.get_meta_prop(self.weight_meta_key)
        checked = check_weight(released, self.weight_meta_key, self.max_weight)
        if weight != checked:
            raise ContributionRejected(f"multiplied by {weight!r} but released {self.weight_meta_key} = {released!r}")
        return checked, weighted_by

    def _model_sizes(self, fl_ctx: FLContext) -> dict[str, int]:
        """Values per parameter, from the first global model seen (plaintext at round 0; later
        rounds hold ciphertexts, whose sizes the server reads without decrypting)."""
        if self._sizes is None:
            global_model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            weights = global_model.get(ModelLearnableKey.WEIGHTS) if isinstance(global_model, dict) else None
            if not isinstance(weights, dict) or not weights:
                raise ContributionRejected("the server has no global model to check the contribution against")
            context = self._ckks_context(fl_ctx)
            self._sizes = {name: _size(value, context) for name, value in weights.items()}
        return self._sizes

    # aggregating ---------------------------------------------------------------------------

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        accepted = sorted(self._accepted, key=lambda c: c[0])
        record = {
            "estimator": "weighted_mean",
            "accepted": [c[0] for c in accepted],
            "rejected": dict(self._rejected),
            "update_norms": {},  # not visible: the sites checked theirs before encrypting
            # every accepted contribution was ciphertexts only (read_ciphertexts refuses anything else)
            "ciphertext_bytes": {c[0]: self._ciphertext_bytes.get(c[0], 0) for c in accepted},
        }
        self._mark_aggregated(current_round)
        self.reset(fl_ctx)
        weightings = sorted({c[3] for c in accepted})
        if len(weightings) > 1:
            reason = f"the sites weighted differently ({', '.join(f'{c[0]}: {c[3]}' for c in accepted)})"
            return self._empty(current_round, record, reason, fl_ctx)
        # distributed DP: a sum of fewer noise shares than a site counted on would expose it
        required = max([self.min_contributions] + [c[4] for c in accepted])
        if len(accepted) < required:
            reason = (
                f"{len(accepted)} contributions accepted; at least {required} are required "
                f"(min_contributions {self.min_contributions}, distributed DP noise shares "
                f"{max([c[4] for c in accepted], default=1)})"
            )
            return self._empty(current_round, record, reason, fl_ctx)
        self._empty_rounds = 0
        sites, ciphertexts, weights, _, _ = zip(*accepted)
        mean = encrypted_mean(list(ciphertexts), list(weights))
        record["weighting"] = "equal" if weightings == ["equal"] else f"by {self.weight_meta_key}"
        meta = {
            AGGREGATION: record,
            NUM_STEPS: float(sum(weights)),
            HE_PROCESSED_KEYS: {name: True for name in mean},
            HE_ALGORITHM: CKKS,
        }
        self.log_info(fl_ctx, f"round {current_round}: encrypted weighted mean of {len(sites)} contributions ({', '.join(sites)}); rejected: {record['rejected'] or 'none'}")
        return DXO(data_kind=DataKind.WEIGHT_DIFF, data=mean, meta=meta).to_shareable()

    def _empty(self, current_round, record: dict, reason: str, fl_ctx: FLContext) -> Shareable:
        """The global model as it is, as ``WEIGHTS`` (NVFlare's HE shareable generator flattens a
        plaintext model when it adds a difference, even a zero one, and the persistor then
        refuses the shapes; ``WEIGHTS`` replaces the model by itself)."""
        record["empty_because"] = reason
        self._empty_rounds += 1
        self.log_error(fl_ctx, f"round {current_round}: not aggregated ({reason}); the global model is unchanged")
        if self.fail_after_empty_rounds is not None and self._empty_rounds >= self.fail_after_empty_rounds:
            self.system_panic(f"{self._empty_rounds} consecutive empty rounds; stopping the job", fl_ctx)
        global_model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        weights = global_model.get(ModelLearnableKey.WEIGHTS, {}) if isinstance(global_model, dict) else {}
        data = {name: np.array(v, copy=True) if isinstance(v, np.ndarray) else v for name, v in weights.items()}
        # PROCESSED_KEYS says which entries of the model this leaves are encrypted
        encrypted = {name: not isinstance(v, np.ndarray) for name, v in data.items()}
        meta = {AGGREGATION: record, HE_PROCESSED_KEYS: encrypted, HE_ALGORITHM: CKKS}
        return DXO(data_kind=DataKind.WEIGHTS, data=data, meta=meta).to_shareable()


def _size(value, context) -> int:
    """Values in a global-model entry: an array, a CKKSVector, or one serialized."""
    if isinstance(value, np.ndarray):
        return int(value.size)
    if isinstance(value, (bytes, bytearray)):
        import tenseal

        return int(tenseal.ckks_vector_from(context, bytes(value)).size())
    if hasattr(value, "decrypt"):  # a CKKSVector
        return int(value.size())
    return int(np.size(np.asarray(value)))
