"""The wire contract: every key a site may put on a task result, what it may hold, what it reveals.

This module is medflare's ground floor for what travels from a site to the server. The
executors write results with these names, the site's privacy filters release a result only when
everything in it is declared here (:func:`check_result_shareable`), the server's aggregator and
metrics writer read these names, and ``docs/privacy.md`` lists what each key reveals. The server
imports no client module for a key name: both sides import this one.

A result is a NVFlare ``Shareable`` holding exactly

- the headers :data:`RESULT_HEADERS` (the return code, the content type, the round), and
- one DXO (``kind``, ``data``, ``meta``) whose meta keys are in :data:`RESULT_META`.

Each meta key is either **protocol** (written by medflare's filters, the same for every site
whatever its data: which filters ran, the privacy parameters) or **data-dependent** (a function
of the site's patients: its size, its loss, its scores, its timings). A site's privacy scope
decides, key by key, which data-dependent keys may leave (``release_meta`` on the site's filter):
under a differential-privacy scope none does unless the site admin names it, because none of
them is privatised by the mechanism (see ``docs/privacy.md``).

Values are checked as well as names: numbers are real Python numbers (a numpy array or a tensor
in the meta would be a second, unfiltered update), strings are short identifiers, lists and
mappings are bounded. A value that does not fit its declaration is refused, never coerced.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Callable, Mapping, NoReturn, Optional

from nvflare.apis.dxo import MetaKey
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import ReservedHeaderKey
from nvflare.app_common.app_constant import AppConstants

__all__ = [
    "WireContractError",
    "DeclaredKey",
    "NUM_STEPS",
    "NUM_TRAIN_CASES",
    "TRAIN_LOSS",
    "TRAIN_SECONDS",
    "VALIDATE_SECONDS",
    "INITIAL_METRICS",
    "FILTER_HISTORY",
    "FILTERS_APPLIED",
    "PERCENTILE_SHARING",
    "GAUSSIAN_DP",
    "DP_SGD",
    "DP_SGD_REQUIRED",
    "DP_SGD_RECORD",
    "AGGREGATION",
    "ENCRYPTION",
    "HE_PROCESSED_KEYS",
    "HE_ALGORITHM",
    "LOCAL_MODEL",
    "LOCAL_MODEL_KINDS",
    "CURRENT_ROUND",
    "WEIGHT_KEYS",
    "RESULT_META",
    "RESULT_HEADERS",
    "DATA_DEPENDENT_META",
    "PASSTHROUGH_KINDS",
    "MAX_METRICS",
    "check_release_meta",
    "check_result_meta",
    "released_meta",
    "check_result_headers",
    "check_scalar_mapping",
    "check_return_code",
]

# --- names ---------------------------------------------------------------------------------

#: local training steps of the round; the default aggregation weight
NUM_STEPS = MetaKey.NUM_STEPS_CURRENT_ROUND
#: number of training cases (patients) at the site; the FLamby/EXAM aggregation weight
NUM_TRAIN_CASES = "num_train_cases"
#: mean training loss of the round
TRAIN_LOSS = "train_loss"
#: seconds of local training, and of scoring the received global model
TRAIN_SECONDS = "train_seconds"
VALIDATE_SECONDS = "validate_seconds"
#: the received global model's metrics on the site's validation data (NVFlare's best-model selection)
INITIAL_METRICS = MetaKey.INITIAL_METRICS
#: NVFlare's list of the filters that processed the DXO
FILTER_HISTORY = MetaKey.FILTER_HISTORY
#: medflare's list of ``{"filter": class name, "source": "site" | "job" | "unknown"}``
FILTERS_APPLIED = "medflare_filters_applied"
#: the percentile-sharing filter's record of what it shared
PERCENTILE_SHARING = "medflare_percentile_sharing"
#: the Gaussian filter's record of the release (mechanism, noise, epsilon)
GAUSSIAN_DP = "medflare_gaussian_dp"
#: the record of patient-level DP-SGD: written by the executor (noise, clipping, sampling, steps),
#: checked, charged to the site's ledger and completed with epsilon by the site's result filter
DP_SGD = "medflare_dp_sgd"
#: task-data header a site's own task-data filter sets: the DP-SGD the site requires of the executor
DP_SGD_REQUIRED = "medflare_dp_sgd_required"
#: which model a ``submit_model`` result is: ``"site_only"`` (trained on the site's data alone from
#: the first global model, EXAM's single-site model) or ``"last_round"`` (the last round's locally
#: trained weights: with that round's global model, which the server has, it gives the round's
#: full update)
LOCAL_MODEL = "medflare_local_model"
LOCAL_MODEL_KINDS = ("site_only", "last_round")
#: the site's record of an encrypted result: scheme, what it weighted by and the weight, the norm
#: bound the site checked before encrypting (the server can check neither on ciphertexts)
ENCRYPTION = "medflare_encryption"
#: NVFlare's HE meta: ``{parameter name: True}`` for every encrypted entry, and the scheme name
HE_PROCESSED_KEYS = MetaKey.PROCESSED_KEYS
HE_ALGORITHM = MetaKey.PROCESSED_ALGORITHM
#: the server's record of a round's aggregation (server-side only: a site never sends it)
AGGREGATION = "medflare_aggregation"
#: the round the result belongs to, a header the executor sets for the filters and the ledger
CURRENT_ROUND = AppConstants.CURRENT_ROUND
#: the counts a site may send that the server may weight by
WEIGHT_KEYS = (NUM_STEPS, NUM_TRAIN_CASES)

#: data kinds without model parameters that a filter may let through after checking that their
#: data is a flat mapping of names to numbers (see :func:`check_scalar_mapping`)
PASSTHROUGH_KINDS = ("METRICS", "ANALYTIC", "STATISTICS")
#: most names in a metrics mapping; a longer "metrics" mapping would be an array in disguise
MAX_METRICS = 64
_MAX_LIST = 32
_MAX_NAME = 100
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:\-]*$")


class WireContractError(ValueError):
    """Something on a result that the contract does not declare, or a value that does not fit."""


def _fail(message: str) -> NoReturn:
    raise WireContractError(message)


# --- value checks: each takes (where, value) and returns the value as plain Python -----------


def _integer(low: int = 0) -> Callable:
    def check(where: str, value):
        if isinstance(value, bool) or not isinstance(value, Integral) or int(value) < low:
            _fail(f"{where} must be an int >= {low}, got {value!r} ({type(value).__name__})")
        return int(value)

    check.describe = f"int >= {low}"
    return check


def _real(low: Optional[float] = None, allow_nan: bool = False, allow_none: bool = False, above: bool = False) -> Callable:
    """A finite real number, at least ``low`` (greater than ``low`` with ``above``)."""
    bound = f" > {low}" if above else f" >= {low}"

    def check(where: str, value):
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, Real):
            _fail(f"{where} must be a real number, got {value!r} ({type(value).__name__})")
        value = float(value)
        if math.isnan(value):
            if allow_nan:
                return value
            _fail(f"{where} must not be NaN")
        if math.isinf(value) or (low is not None and (value <= low if above else value < low)):
            _fail(f"{where} must be a finite number{bound if low is not None else ''}, got {value!r}")
        return value

    check.describe = "real" + (bound if low is not None else "") + (" or null" if allow_none else "")
    return check


def _boolean(where: str, value):
    if not isinstance(value, bool):
        _fail(f"{where} must be true or false, got {value!r}")
    return value


_boolean.describe = "bool"


def _identifier(where: str, value):
    if not isinstance(value, str) or len(value) > _MAX_NAME or not _IDENTIFIER.match(value):
        _fail(f"{where} must be a name of at most {_MAX_NAME} letters, digits and _.:-, got {value!r:.120}")
    return str.__str__(value)  # a plain str: a subclass could carry more than its characters


_identifier.describe = "name"


def _one_of(*choices: str) -> Callable:
    def check(where: str, value):
        if not isinstance(value, str) or value not in choices:
            _fail(f"{where} must be one of {list(choices)}, got {value!r:.120}")
        return choices[choices.index(value)]  # the declared string itself, never the sender's object

    check.describe = f"one of {list(choices)}"
    return check


def _list_of(item: Callable) -> Callable:
    def check(where: str, value):
        if not isinstance(value, (list, tuple)) or len(value) > _MAX_LIST:
            _fail(f"{where} must be a list of at most {_MAX_LIST} entries, got {type(value).__name__}")
        return [item(f"{where}[{n}]", v) for n, v in enumerate(value)]

    check.describe = f"list of {item.describe}"
    return check


def _record(**fields: Callable) -> Callable:
    """A mapping with exactly the named fields (optional fields may be missing)."""

    def check(where: str, value):
        if not isinstance(value, Mapping):
            _fail(f"{where} must be a mapping with fields {sorted(fields)}, got {type(value).__name__}")
        extra = sorted(str(k) for k in value if k not in fields)
        if extra:
            _fail(f"{where} has undeclared fields {extra[:5]}; declared are {sorted(fields)}")
        out = {}
        for name, field_check in fields.items():
            if name in value:
                out[name] = field_check(f"{where}.{name}", value[name])
            elif not getattr(field_check, "optional", False):
                _fail(f"{where} lacks the field {name!r}")
        return out

    check.describe = "record {" + ", ".join(f"{k}: {v.describe}" for k, v in fields.items()) + "}"
    return check


def _optional(check: Callable) -> Callable:
    def optional_check(where: str, value):
        return check(where, value)

    optional_check.optional = True
    optional_check.describe = check.describe + " (optional)"
    return optional_check


def check_scalar_mapping(where: str, value, max_entries: int = MAX_METRICS) -> dict:
    """A flat mapping of names to real numbers (NaN allowed: an AUC of a one-class test set).

    This is all a metrics result may carry: no arrays, tensors, lists, strings or nesting.

    Raises:
        WireContractError: naming the offending entry.
    """
    if not isinstance(value, Mapping):
        _fail(f"{where} must be a mapping of names to numbers, got {type(value).__name__}")
    if len(value) > max_entries:
        _fail(f"{where} has {len(value)} entries, at most {max_entries} are allowed")
    number = _real(allow_nan=True)
    out = {}
    for key, v in value.items():
        name = _identifier(f"{where} key", key)
        if isinstance(v, bool) or not isinstance(v, Real):
            _fail(f"{where}[{name!r}] must be a number, got {type(v).__name__}")
        out[name] = int(v) if isinstance(v, Integral) else number(f"{where}[{name!r}]", v)
    return out


#: most parameters an encrypted result may name (a model's state dict)
MAX_PARAMETERS = 10_000


def _encrypted_names(where: str, value):
    """NVFlare's PROCESSED_KEYS as medflare sends it: every parameter name mapped to True."""
    if not isinstance(value, Mapping) or not value or len(value) > MAX_PARAMETERS:
        _fail(f"{where} must be a mapping of 1 to {MAX_PARAMETERS} parameter names to true, got {type(value).__name__}")
    out = {}
    for key, flag in value.items():
        name = _identifier(f"{where} key", key)
        if flag is not True:
            _fail(f"{where}[{name!r}] must be true (medflare encrypts every entry), got {flag!r:.40}")
        out[name] = True
    return out


_encrypted_names.describe = f"mapping of at most {MAX_PARAMETERS} parameter names to true"


def _metrics(where: str, value):
    return check_scalar_mapping(where, value)


_metrics.describe = f"mapping of at most {MAX_METRICS} names to numbers"


# --- declarations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DeclaredKey:
    """One key a site may send.

    Attributes:
        name: the key.
        check: ``check(where, value) -> value`` as plain Python, raising :class:`WireContractError`.
        data_dependent: True when the value is a function of the site's patients.
        written_by: ``"executor"``, ``"filter"`` or ``"nvflare"``.
        reveals: what the server learns from it (for the docs and ``medflare`` users).
    """

    name: str
    check: Callable
    data_dependent: bool
    written_by: str
    reveals: str


_GAUSSIAN_RECORD = _record(
    mechanism=_one_of("gaussian"),
    neighbouring_relation=_one_of("add/remove one site's whole dataset"),
    clipping_norm=_real(0.0),
    noise_multiplier=_real(0.0),
    delta=_real(0.0),
    accountant=_one_of("rdp", "prv"),
    epsilon_round=_real(0.0),
    epsilon_run=_real(0.0),
    epsilon_site=_real(0.0),
    max_epsilon=_real(0.0),
    secure_noise=_boolean,
    distributed_sites=_optional(_integer(2)),
    site_noise_multiplier=_optional(_real(0.0, above=True)),
)

#: the DP-SGD record: the executor writes the first seven fields, the site's filter the rest
DP_SGD_RECORD = _record(
    mechanism=_one_of("dp_sgd"),
    neighbouring_relation=_one_of("add/remove one patient"),
    noise_multiplier=_real(0.0, above=True),
    max_grad_norm=_real(0.0, above=True),  # C = 0 would make the noise z C zero: no record of DP-SGD
    sample_rate=_real(0.0, above=True),
    steps=_integer(1),
    secure_noise=_optional(_boolean),
    delta=_optional(_real(0.0)),
    accountant=_optional(_one_of("rdp", "prv")),
    epsilon_round=_optional(_real(0.0)),
    epsilon_run=_optional(_real(0.0)),
    epsilon_site=_optional(_real(0.0)),
    max_epsilon=_optional(_real(0.0)),
)

_SHARING_RECORD = _record(
    fraction_shared=_real(0.0),
    gamma=_real(0.0, allow_none=True),
    num_shared=_integer(0),
    num_total=_integer(0),
    sparse=_boolean,
)

_ENCRYPTION_RECORD = _record(
    scheme=_one_of("CKKS"),
    weighted_by=_one_of("equal", NUM_STEPS, NUM_TRAIN_CASES),
    weight=_real(0.0, above=True),
    max_update_norm=_real(0.0, allow_none=True, above=True),
    num_values=_integer(1),
    distributed_dp_sites=_optional(_integer(2)),
)

_APPLIED_RECORD = _record(filter=_identifier, source=_one_of("site", "job", "unknown"))


def _declare(*keys: DeclaredKey) -> dict[str, DeclaredKey]:
    return {k.name: k for k in keys}


#: every DXO meta key a site may send with a result
RESULT_META: dict[str, DeclaredKey] = _declare(
    DeclaredKey(NUM_STEPS, _integer(0), True, "executor",
                "local steps this round: epochs x ceil(training cases / batch size), so the site's size"),
    DeclaredKey(NUM_TRAIN_CASES, _integer(0), True, "executor", "the exact number of the site's training cases"),
    DeclaredKey(TRAIN_LOSS, _real(allow_nan=True), True, "executor",
                "the mean training loss on the site's patients this round (membership and fit)"),
    DeclaredKey(TRAIN_SECONDS, _real(0.0), True, "executor", "training time: the site's size and hardware"),
    DeclaredKey(VALIDATE_SECONDS, _real(0.0), True, "executor", "validation time: the site's validation-set size"),
    DeclaredKey(INITIAL_METRICS, _metrics, True, "executor",
                "the received global model's scores on the site's validation patients, and their number (num_cases)"),
    DeclaredKey(FILTER_HISTORY, _list_of(_identifier), False, "nvflare", "names of the filters applied"),
    DeclaredKey(FILTERS_APPLIED, _list_of(_APPLIED_RECORD), False, "filter",
                "which medflare filters ran and whether the site or the job configured each"),
    DeclaredKey(PERCENTILE_SHARING, _SHARING_RECORD, False, "filter",
                "the sharing parameters and how many entries were shared (fixed by the model's size)"),
    DeclaredKey(GAUSSIAN_DP, _GAUSSIAN_RECORD, False, "filter",
                "the noise parameters and the epsilon spent (the count of the site's releases)"),
    DeclaredKey(ENCRYPTION, _ENCRYPTION_RECORD, False, "filter",
                "that the result is CKKS-encrypted, the weight the site multiplied by before encrypting (1, or "
                "the released count it names), the norm bound it checked, and the model's size"),
    DeclaredKey(HE_PROCESSED_KEYS, _encrypted_names, False, "filter", "the encrypted parameters' names (the model's)"),
    DeclaredKey(HE_ALGORITHM, _one_of("CKKS"), False, "filter", "the encryption scheme"),
    DeclaredKey(LOCAL_MODEL, _one_of(*LOCAL_MODEL_KINDS), False, "executor",
                "which model a submit_model result is (the job's local_model setting)"),
    DeclaredKey(DP_SGD, DP_SGD_RECORD, False, "executor",
                "the per-patient noise, clipping, sampling rate and steps, and the per-patient epsilon spent; "
                "the sampling rate is patients per step over the site's patients, so it gives the site's size "
                "to the precision the site chooses"),
)

#: data-dependent meta keys: what ``release_meta`` may name
DATA_DEPENDENT_META = tuple(k for k, d in RESULT_META.items() if d.data_dependent)

#: every header a site's filter lets a result carry (NVFlare adds routing headers after the filters)
RESULT_HEADERS: dict[str, DeclaredKey] = _declare(
    DeclaredKey(ReservedHeaderKey.RC, lambda where, v: check_return_code(v), False, "nvflare", "the return code"),
    DeclaredKey(ReservedHeaderKey.CONTENT_TYPE, _one_of("DXO"), False, "nvflare", "that the payload is a DXO"),
    DeclaredKey(CURRENT_ROUND, lambda where, v: None if v is None else _integer(0)(where, v), False, "executor",
                "the round number the site answers (the server sent it)"),
)

_RETURN_CODES = frozenset(v for k, v in vars(ReturnCode).items() if k.isupper() and isinstance(v, str))


def check_return_code(value) -> str:
    """One of NVFlare's return codes (anything else could carry data in a header)."""
    if not isinstance(value, str) or value not in _RETURN_CODES:
        _fail(f"return code must be one of NVFlare's ReturnCode values, got {value!r:.120}")
    return value


# --- checks used by the filters, the aggregator and the metrics writer ----------------------


def _did_you_mean(name: str, known) -> str:
    import difflib

    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_release_meta(release_meta, argument: str = "release_meta") -> tuple[str, ...]:
    """Validate a filter's list of data-dependent meta keys a site lets leave.

    Raises:
        TypeError: not a list of strings.
        ValueError: a name that is not a data-dependent key of the contract.
    """
    if not isinstance(release_meta, (list, tuple)) or not all(isinstance(k, str) for k in release_meta):
        raise TypeError(f"{argument} must be a list of meta key names, got {release_meta!r}")
    for name in release_meta:
        if name not in DATA_DEPENDENT_META:
            raise ValueError(
                f"{argument} may only name data-dependent keys of the wire contract {list(DATA_DEPENDENT_META)}, "
                f"got {name!r}{_did_you_mean(name, DATA_DEPENDENT_META)}"
            )
    return tuple(release_meta)


def check_result_meta(meta, where: str = "DXO meta") -> dict:
    """Every key declared and every value fitting its declaration; returns plain-Python values.

    Raises:
        WireContractError: naming the first undeclared key or unfit value.
    """
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        _fail(f"{where} must be a mapping, got {type(meta).__name__}")
    out = {}
    for key, value in meta.items():
        declared = RESULT_META.get(key) if isinstance(key, str) else None
        if declared is None:
            _fail(
                f"{where} holds the undeclared key {key!r:.120}{_did_you_mean(key, RESULT_META)}; "
                f"a result may carry only {sorted(RESULT_META)}"
            )
        out[key] = declared.check(f"{where}[{key!r}]", value)
    return out


def released_meta(meta: Mapping, release: tuple) -> tuple[dict, list[str]]:
    """The checked meta without the data-dependent keys the site does not release.

    Args:
        meta: the result's meta (checked here).
        release: data-dependent keys the site lets leave.

    Returns:
        ``(meta to send, names withheld)``.
    """
    checked = check_result_meta(meta)
    kept, withheld = {}, []
    for key, value in checked.items():
        if RESULT_META[key].data_dependent and key not in release:
            withheld.append(key)
        else:
            kept[key] = value
    return kept, withheld


def check_result_headers(headers, where: str = "result headers") -> dict:
    """Every header declared and fitting; returns the checked headers.

    Raises:
        WireContractError: naming the first undeclared header or unfit value.
    """
    if not isinstance(headers, Mapping):
        _fail(f"{where} must be a mapping, got {type(headers).__name__}")
    out = {}
    for key, value in headers.items():
        declared = RESULT_HEADERS.get(key) if isinstance(key, str) else None
        if declared is None:
            _fail(f"{where} hold the undeclared header {key!r:.120}; a result may carry only {sorted(RESULT_HEADERS)}")
        out[key] = declared.check(f"{where}[{key!r}]", value)
    return out
