"""Usage events: validation, normalization, payload hashing and per-event outcomes.

Pure: no I/O. The service feeds it the raw JSON (parsed with `parse_float=Decimal`, so a number
never passes through a float), what the projections know, and what the dedup table answered.

Decisions worth knowing:

- Unknown *customers* are accepted. Usage for a customer that does not exist yet (or whose
  `customer.created` has not reached this service) is kept with `customer_id = None` and the
  reference as sent; metering attributes it when the customer appears, matching either its
  `cus_` id or its `external_id`. Losing usage is worse than holding it.
- Unknown *meters* are rejected (`unknown_meter`): there is nothing to aggregate it into.
- The payload hash covers customer, meter, normalized quantity, the timestamp *as sent* (not
  the defaulted one, so a retry of an event without a timestamp is still a duplicate) and the
  properties as canonical JSON. Same key + same hash = duplicate; same key + another hash =
  `idempotency_key_conflict`. Within one request the first valid occurrence of a key wins.
- Quantities are finite, non-negative decimals (a usage event records consumption; corrections
  are not usage), at most 30 integer and 20 fraction digits; they travel as normalized decimal
  strings ("1500", "3.5").
- Non-integer JSON numbers inside `properties` are kept exactly as normalized decimal strings
  (the event log's JSON has no exact decimal number type); integers stay integers (those outside
  the 64-bit range become strings too).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from operator import attrgetter
from typing import Any, Literal

import msgspec
import orjson

from billstream_runtime.money import format_decimal

MAX_KEY_LENGTH = 255
MAX_REF_LENGTH = 255
MAX_INTEGER_DIGITS = 30
MAX_FRACTION_DIGITS = 20
EVENT_FIELDS = frozenset(
    {"idempotency_key", "customer", "meter", "quantity", "timestamp", "properties"}
)

_DECIMAL_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\Z", re.ASCII)
_RFC3339_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})\Z", re.ASCII
)
#: Properties nest at most this deep (JSON objects and arrays).
MAX_PROPERTIES_DEPTH = 32
_INT64 = (-(2**63), 2**63 - 1)

Status = Literal["accepted", "duplicate", "rejected"]


class BodyError(ValueError):
    """The request body as a whole is unusable (not one event per outcome)."""

    def __init__(self, code: str, message: str, param: str | None = None,
                 status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.status = status


class EventError(ValueError):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs a setattr per field
class UsageEvent:
    """A syntactically valid usage event, normalized."""

    index: int
    idempotency_key: str
    customer: str
    meter: str
    quantity_text: str  # normalized decimal string ("1500", "3.5"): what is hashed and sent
    timestamp: datetime | None  # None: not sent; defaults to "now" when accepted
    properties: dict[str, Any]  # JSON-safe (no Decimal, no float)
    payload_hash: str

    @property
    def quantity(self) -> Decimal:
        return Decimal(self.quantity_text)


@dataclass(slots=True)
class Outcome:
    index: int
    idempotency_key: str | None
    status: Status
    usage_id: str | None = None
    code: str | None = None
    message: str | None = None
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "idempotency_key": self.idempotency_key,
                               "status": self.status}
        if self.usage_id is not None:
            out["usage_id"] = self.usage_id
        if self.code is not None:
            out["code"] = self.code
            out["message"] = self.message
            if self.param is not None:
                out["param"] = self.param
        return out


def rejected(index: int, key: Any, code: str, message: str,
             param: str | None = None) -> Outcome:
    return Outcome(index, key if isinstance(key, str) else None, "rejected", code=code,
                   message=message, param=param)


# ---------------------------------------------------------------- the body


def loads(raw: bytes | str) -> Any:
    """JSON with every non-integer number as an exact Decimal (never through a float).
    Raises ValueError (UnicodeDecodeError included) or RecursionError.

    msgspec parses first: in one pass, several times faster than the json module, handing
    each non-integer number's text to Decimal (`float_hook`) and integers of any size to int.
    A document it refuses (NaN/Infinity, lone surrogates, other encodings, deep nesting, bad
    JSON) is parsed again by `exact_loads`, so the result and the errors are always
    exact_loads's (tests/unit/ingestion/test_event_properties.py checks both agree). One band
    differs: both parsers stop at Python's recursion limit, and msgspec runs a few frames
    shallower, so a document nested within about four levels of that limit (some 990 deep)
    may parse here where exact_loads would refuse it; its events are then refused by the
    event checks (a body is an object or an array of objects; properties nest 32 deep)."""
    try:
        return _DECODER.decode(raw)
    except (ValueError, ArithmeticError):  # msgspec.DecodeError is a ValueError, as is a str
        return exact_loads(raw)  # that is not UTF-8; Decimal refuses an exponent like 1e99…9


_DECODER = msgspec.json.Decoder(float_hook=Decimal)
#: `loads` without the fallback: what it returns when it returns, else ValueError,
#: ArithmeticError or RecursionError (the caller then asks `loads`, which says why or parses
#: it exactly).
fast_loads = _DECODER.decode


def exact_loads(raw: bytes | str) -> Any:
    """The exact parser. A number beyond Decimal's range (an exponent of twenty digits) is
    bad JSON like any other: a ValueError, not decimal's ArithmeticError, which no caller
    expects (a Kafka record would be retried forever, a request answered 500)."""
    try:
        return json.loads(raw, parse_float=Decimal, parse_constant=Decimal)
    except ArithmeticError as exc:
        raise ValueError("a number is beyond the range of decimals (its exponent has more "
                         "than 18 digits)") from exc


def split_body(body: Any, max_events: int) -> list[Any]:
    """The raw events of a request body: one native event object, or `{"events": [...]}`."""
    if not isinstance(body, dict):
        raise BodyError("parameter_invalid",
                        "The body must be a usage event object or {\"events\": [...]}")
    if "events" not in body:
        return [body]
    extra = sorted(set(body) - {"events"})
    if extra:
        raise BodyError("parameter_unknown",
                        f"A batch body has only 'events'; unknown: {', '.join(extra)}",
                        param=extra[0])
    events = body["events"]
    if not isinstance(events, list):
        raise BodyError("parameter_invalid", "events must be an array of usage events",
                        param="events")
    if not events:
        raise BodyError("parameter_invalid", "events must hold at least one usage event",
                        param="events")
    if len(events) > max_events:
        raise BodyError("batch_too_large",
                        f"A batch holds at most {max_events} events; got {len(events)}",
                        param="events", status=413)
    return events


# ---------------------------------------------------------------- one event


def parse_event(index: int, raw: Any, *, max_properties_bytes: int) -> UsageEvent | Outcome:
    """Validate and normalize one raw event; a rejected Outcome when it is unusable."""
    if type(raw) is not dict:
        return rejected(index, None, "invalid_event", "Each usage event must be a JSON object")
    key = raw.get("idempotency_key")
    try:
        if not EVENT_FIELDS.issuperset(raw):
            unknown = sorted(set(raw) - EVENT_FIELDS)
            raise EventError("invalid_event", f"Unknown field '{unknown[0]}'", unknown[0])
        customer = raw.get("customer")
        meter = raw.get("meter")
        # the common case (three short ASCII strings) in one test; _text explains the others
        if not (type(key) is str and type(customer) is str and type(meter) is str
                and 0 < len(key) <= MAX_KEY_LENGTH and 0 < len(customer) <= MAX_REF_LENGTH
                and 0 < len(meter) <= MAX_REF_LENGTH
                and key.isascii() and customer.isascii() and meter.isascii()
                and "\x00" not in key and "\x00" not in customer and "\x00" not in meter):
            key = _text(raw, "idempotency_key", MAX_KEY_LENGTH)
            customer = _text(raw, "customer", MAX_REF_LENGTH)
            meter = _text(raw, "meter", MAX_REF_LENGTH)
        raw_quantity = raw.get("quantity")
        quantity_text = normalize_quantity(1 if raw_quantity is None else raw_quantity)
        raw_timestamp = raw.get("timestamp")
        timestamp = None if raw_timestamp is None else parse_timestamp(raw_timestamp,
                                                                       "timestamp")
        props_raw = raw.get("properties")
        if not props_raw:
            if props_raw is not None and type(props_raw) is not dict:
                raise EventError("invalid_event", "properties must be a JSON object",
                                 "properties")
            properties: dict[str, Any] = {}
            hashed: Any = properties
            if max_properties_bytes < 2:  # "{}"
                raise EventError("properties_too_large", "properties serialize to 2 bytes; "
                                 f"at most {max_properties_bytes} are allowed", "properties")
        else:
            if type(props_raw) is not dict:
                raise EventError("invalid_event", "properties must be a JSON object",
                                 "properties")
            properties = json_safe(props_raw, "properties")
            canonical = canonical_json(properties)
            if len(canonical) > max_properties_bytes:
                raise EventError("properties_too_large",
                                 f"properties serialize to {len(canonical)} bytes; at most "
                                 f"{max_properties_bytes} are allowed", "properties")
            # the hash takes the same bytes (canonical_json sorts nested keys the same way)
            hashed = orjson.Fragment(canonical)
    except EventError as err:
        return rejected(index, key, err.code, err.message, err.param)
    return UsageEvent(
        index, key, customer, meter, quantity_text, timestamp, properties,
        payload_hash(customer, meter, quantity_text, timestamp, hashed),
    )


def _text(raw: Mapping[str, Any], name: str, max_length: int) -> str:
    value = raw.get(name)
    if value is None:
        raise EventError("invalid_event", f"{name} is required", name)
    if not isinstance(value, str):
        raise EventError("invalid_event", f"{name} must be a string", name)
    if not value or len(value) > max_length:
        raise EventError("invalid_event", f"{name} must be 1 to {max_length} characters", name)
    if not value.isascii() and not _is_unicode_text(value):
        raise EventError("invalid_event", f"{name} holds an unpaired surrogate (\\ud800-"
                         "\\udfff escape), which is not text", name)
    if "\x00" in value:
        raise EventError("invalid_event", _NUL_MESSAGE.format(name), name)
    return value


#: PostgreSQL stores no NUL in text or jsonb: an event holding one would fail its whole
#: write (its batch over HTTP, its poll on the Kafka input, again and again) or, accepted,
#: fail where metering keeps its properties as jsonb. It is refused like any bad value.
_NUL_MESSAGE = "{} holds a NUL character (\\u0000), which is not allowed"


def storable_text(value: str) -> bool:
    """Text PostgreSQL can store: no unpaired surrogate, no NUL."""
    return (value.isascii() or _is_unicode_text(value)) and "\x00" not in value


def _is_unicode_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: Quantities already written the normalized way ("1", "1500", "3.5"): taken as they are.
_CANONICAL_QUANTITY = re.compile(r"^(0|[1-9][0-9]{0,29})(\.[0-9]{0,19}[1-9])?\Z")


def normalize_quantity(value: Any) -> str:
    """The normalized decimal string of a quantity (see parse_quantity). The common shapes (a
    small JSON integer, an already normalized string) skip the Decimal round trip."""
    if type(value) is int and 0 <= value < 10**MAX_INTEGER_DIGITS:
        return str(value)
    if type(value) is str and _CANONICAL_QUANTITY.match(value):
        return value
    return format_decimal(parse_quantity(value))


def parse_quantity(value: Any) -> Decimal:
    """A finite, non-negative decimal from a decimal string or a JSON integer/decimal."""
    if isinstance(value, bool | float):
        raise EventError("invalid_event",
                         "quantity must be a decimal string or a JSON number", "quantity")
    if isinstance(value, str):
        if not _DECIMAL_RE.match(value):
            raise EventError("invalid_event", f"quantity {value!r} is not a decimal number",
                             "quantity")
        try:
            number = Decimal(value)
        except InvalidOperation as exc:  # pragma: no cover - the regex admits valid ones only
            raise EventError("invalid_event", "quantity is not a decimal", "quantity") from exc
    elif isinstance(value, int | Decimal):
        number = Decimal(value)
    else:
        raise EventError("invalid_event",
                         "quantity must be a decimal string or a JSON number", "quantity")
    if not number.is_finite():
        raise EventError("invalid_event", "quantity must be a finite number", "quantity")
    if number < 0:
        raise EventError("invalid_event", "quantity must not be negative", "quantity")
    _sign, digits, exp = _stripped(number)
    if len(digits) + exp > MAX_INTEGER_DIGITS or -exp > MAX_FRACTION_DIGITS:
        raise EventError("invalid_event",
                         f"quantity must have at most {MAX_INTEGER_DIGITS} integer and "
                         f"{MAX_FRACTION_DIGITS} fraction digits", "quantity")
    return Decimal(format_decimal(number))


def parse_timestamp(value: Any, param: str) -> datetime:
    """An RFC 3339 timestamp with an offset, as an aware UTC datetime (to the microsecond:
    further digits are dropped)."""
    if type(value) is str:
        parsed = _TIMESTAMPS.get(value)  # only texts that passed below are in it
        if parsed is not None:
            return parsed
    if type(value) is not str or not _RFC3339_RE.match(value):
        raise EventError("invalid_event",
                         f"{param} must be an RFC 3339 timestamp such as "
                         "2026-01-31T12:00:00Z", param)
    try:
        parsed = datetime.fromisoformat(value.replace("t", "T").replace("z", "Z"))
        parsed = parsed.astimezone(UTC) if parsed.utcoffset() else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise EventError("invalid_event", f"{param}: {exc}", param) from exc
    if len(_TIMESTAMPS) > 4096:
        _TIMESTAMPS.clear()
    _TIMESTAMPS[value] = parsed
    return parsed


#: Producers send many events with the same timestamp text (a batch of one second's calls):
#: parsing each distinct text once is enough.
_TIMESTAMPS: dict[str, datetime] = {}


def window_error(timestamp: datetime, now: datetime, window: timedelta,
                 future: timedelta) -> EventError | None:
    """Why `timestamp` is outside the accepted window around `now`, or None. The window is
    the dedup window: an event older than it could be a resend whose key has expired."""
    if timestamp < now - window:
        return EventError(
            "timestamp_out_of_window",
            f"timestamp {format_timestamp(timestamp)} is older than the {window.days}-day "
            f"window (events must be at or after {format_timestamp(now - window)})",
            "timestamp")
    if timestamp > now + future:
        return EventError(
            "timestamp_out_of_window",
            f"timestamp {format_timestamp(timestamp)} is more than "
            f"{int(future.total_seconds())} s in the future (now is {format_timestamp(now)})",
            "timestamp")
    return None


def _stripped(value: Decimal) -> tuple[int, str, int]:
    """(sign, significant digits without trailing zeros, exponent), exactly (no context)."""
    sign, digit_tuple, exp = value.as_tuple()
    digits = "".join(map(str, digit_tuple)).lstrip("0")
    if not digits:
        return 0, "0", 0
    stripped = digits.rstrip("0")
    return sign, stripped, int(exp) + len(digits) - len(stripped)


def _plain_length(value: Decimal) -> int:
    _sign, digits, exp = _stripped(value)
    return len(digits) + abs(exp) + 2


def json_safe(value: Any, path: str, depth: int = 0) -> Any:
    """Properties as JSON-safe values: exact decimals (non-integer numbers) become normalized
    decimal strings, integers outside 64 bits become strings; NaN/Infinity, unpaired
    surrogates, NUL characters and nesting deeper than MAX_PROPERTIES_DEPTH are refused.

    Values that need none of this (what the parser gives for ordinary properties: text, 64-bit
    integers, booleans, null, shallow objects and arrays) are returned as they are, after one
    walk that builds nothing; the rest take `_json_safe_walk`, which converts or says why not."""
    if _is_safe(value, depth):
        return value
    return _json_safe_walk(value, path, depth)


def _is_safe(value: Any, depth: int) -> bool:
    """True when `_json_safe_walk` would return `value` unchanged (an equal copy)."""
    kind = type(value)
    if kind is dict:
        if depth >= MAX_PROPERTIES_DEPTH:
            return False
        for key, item in value.items():
            # (the common case inline: a call per key and value costs a third of the walk)
            if type(key) is not str or not ((key.isascii() and "\x00" not in key)
                                            or storable_text(key)):
                return False
            kind = type(item)
            if kind is str:
                if not ((item.isascii() and "\x00" not in item) or storable_text(item)):
                    return False
            elif kind is int:
                if not _INT64[0] <= item <= _INT64[1]:
                    return False
            elif not (kind is bool or item is None or _is_safe(item, depth + 1)):
                return False
        return True
    if kind is list:
        return depth < MAX_PROPERTIES_DEPTH and all(_is_safe(item, depth + 1) for item in value)
    if kind is str:
        return storable_text(value)
    if kind is int:
        return _INT64[0] <= value <= _INT64[1]
    return kind is bool or value is None


def _json_safe_walk(value: Any, path: str, depth: int = 0) -> Any:
    """json_safe, converting: a copy of `value` with every number made safe, or EventError.
    An object's plain members are taken inline; a member's path is only written out to
    descend into it or to say what is wrong with it."""
    if isinstance(value, dict | list):
        if depth >= MAX_PROPERTIES_DEPTH:
            raise EventError("invalid_event", f"{path} nests deeper than "
                             f"{MAX_PROPERTIES_DEPTH} levels", path)
        if isinstance(value, list):
            return [_json_safe_walk(v, path, depth + 1) for v in value]
        out = {}
        for k, v in value.items():
            if not k.isascii() and not _is_unicode_text(k):
                raise EventError("invalid_event", f"{path} has a key with an unpaired "
                                 "surrogate", path)
            if "\x00" in k:
                raise EventError("invalid_event", f"{path} has a key with a NUL character "
                                 "(\\u0000), which is not allowed", path)
            kind = type(v)
            if (kind is str and v.isascii() and "\x00" not in v) or kind is bool or v is None or (
                    kind is int and _INT64[0] <= v <= _INT64[1]):
                out[k] = v
            elif kind is Decimal and v.is_finite():
                out[k] = _decimal_text(v)
            else:
                out[k] = _json_safe_walk(v, f"{path}.{k}", depth + 1)
        return out
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if not value.isascii() and not _is_unicode_text(value):
            raise EventError("invalid_event", f"{path} holds an unpaired surrogate", path)
        if "\x00" in value:
            raise EventError("invalid_event", _NUL_MESSAGE.format(path), path)
        return value
    if isinstance(value, int):
        return value if _INT64[0] <= value <= _INT64[1] else str(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise EventError("invalid_event", f"{path} must be a finite number", path)
        return _decimal_text(value)
    if isinstance(value, float):  # not produced by our parser; refused like any float
        raise EventError("invalid_event", f"{path}: floats are not accepted", path)
    raise EventError("invalid_event", f"{path} holds an unsupported value", path)


def _decimal_text(value: Decimal) -> str:
    """A finite decimal property as text: format_decimal's normalized plain form, except that
    a huge exponent, which would expand to megabytes, stays in exponent notation. Decimal's
    own text is that form already when it has no exponent, once trailing fraction zeros go
    (what a JSON number such as 0.125 or 12.50 gives): the common case skips the digit tuple."""
    text = str(value)
    # at most 48 characters: digits and exponent then add up to at most 98, within the plain
    # form's limit below, whatever the trailing zeros
    if len(text) <= 48 and "E" not in text:
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return "0" if text in ("0", "-0") else text
    return format_decimal(value) if _plain_length(value) <= 100 else str(value)


def canonical_json(value: Any) -> bytes:
    """Sorted keys; datetimes as RFC 3339 UTC with "Z" (as format_timestamp writes them)."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_UTC_Z)


def format_timestamp(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def payload_hash(customer: str, meter: str, quantity: Decimal | str,
                 timestamp: datetime | None,
                 properties: Mapping[str, Any] | orjson.Fragment) -> str:
    """What "the same event" means for an idempotency key (see the module docstring).
    `quantity` is a Decimal or its normalized string (normalize_quantity); the timestamp is
    hashed as its UTC instant (canonical_json writes it like format_timestamp); `properties`
    may come as their canonical_json already (a Fragment), which hashes the same."""
    canonical = canonical_json({
        "customer": customer,
        "meter": meter,
        "quantity": quantity if isinstance(quantity, str) else format_decimal(quantity),
        "timestamp": timestamp,
        "properties": properties,
    })
    return hashlib.sha256(canonical).hexdigest()


# ---------------------------------------------------------------- outcomes

_BY_INDEX = attrgetter("index")


def first_per_key(events: Iterable[UsageEvent]) -> list[UsageEvent]:
    """The first occurrence of each idempotency key, in request order."""
    seen: set[str] = set()
    firsts = []
    for ev in events:
        if ev.idempotency_key not in seen:
            seen.add(ev.idempotency_key)
            firsts.append(ev)
    return firsts


def resolve_outcomes(
    events: Sequence[UsageEvent],
    claimed: Mapping[str, tuple[str, str, bool]],
) -> list[Outcome]:
    """Outcomes of valid events once their keys are claimed.

    `claimed[key] = (payload_hash, usage_id, inserted_now)`: the payload that owns the key
    (this request's first occurrence when `inserted_now`, otherwise the one stored before).
    Exactly one event per inserted key is accepted; events matching the owner's payload are
    duplicates of it, the others conflict.
    """
    out = []
    accepted_keys: set[str] = set()
    for ev in events:
        owner_hash, usage_id, inserted = claimed[ev.idempotency_key]
        if ev.payload_hash != owner_hash:
            out.append(_conflict(ev))
        elif inserted and ev.idempotency_key not in accepted_keys:
            accepted_keys.add(ev.idempotency_key)
            out.append(Outcome(ev.index, ev.idempotency_key, "accepted", usage_id))
        else:
            out.append(Outcome(ev.index, ev.idempotency_key, "duplicate", usage_id))
    return out


def _conflict(ev: UsageEvent) -> Outcome:
    return rejected(
        ev.index, ev.idempotency_key, "idempotency_key_conflict",
        "This idempotency_key was already used for an event with a different payload",
        "idempotency_key")


def summarize(outcomes: Iterable[Outcome]) -> dict[str, Any]:
    """The response body: counts and one result per event, in request order."""
    ordered = sorted(outcomes, key=_BY_INDEX)
    counts = Counter(o.status for o in ordered)
    return {
        "object": "usage_ingest_result",
        "accepted": counts.get("accepted", 0),
        "duplicates": counts.get("duplicate", 0),
        "rejected": counts.get("rejected", 0),
        "results": [o.as_dict() for o in ordered],
    }
