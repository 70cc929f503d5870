"""Records of the Kafka input topic `billstream.usage.raw`, and the rejection records ingestion
writes to `billstream.usage.rejected`. Pure: no I/O.

An input record (see docs/ingestion.md, "Kafka input"):
- header `billstream-api-key`: a secret API key of the tenant and environment (`sk_test_…`,
  `sk_live_…`), the same key as over HTTP;
- key: the customer (recommended: keeps one customer's events in order on one partition;
  nothing depends on it);
- value: ONE usage event, UTF-8 JSON, in one of three shapes:
  - native: the same object as `POST /v1/usage/events` takes;
  - CloudEvents structured mode: a JSON object with `specversion` (header
    `content-type: application/cloudevents+json` optional);
  - CloudEvents binary mode: attributes in `ce_*` headers (`ce_specversion`, `ce_id`,
    `ce_source`, `ce_type`, `ce_subject`, `ce_time`), `content-type: application/json`, and
    the value is the event's `data`.
  Numbers are read exactly (never through a float), as over HTTP.
"""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from billstream_ingestion import cloudevents, domain
from billstream_ingestion.domain import EventError, Outcome
from billstream_messaging.records import printable_header_name

API_KEY_HEADER = "billstream-api-key"
OUTCOME_HEADER = "billstream-outcome"


@dataclass(slots=True)
class Decoded:
    """One input record: the API key it carries and the native raw event, or why not."""

    api_key: str | None
    raw: dict[str, Any] | None = None
    error: EventError | None = None
    idempotency_key: str | None = None  # best effort, for the rejection record
    cloudevent: bool = False


#: The API key header's value → the key: producers send the same few keys on every record.
_API_KEYS: dict[bytes, str] = {}


def decode(value: bytes | None, headers: Any, max_bytes: int) -> Decoded:
    if headers and len(headers) == 1 and value is not None and len(value) <= max_bytes:
        # the usual record: the API key (seen before) its only header, a native event; what
        # the general reading below decides for it, decided with less work
        name, header_value = headers[0]
        api_key = (_API_KEYS.get(header_value)
                   if name == API_KEY_HEADER and type(header_value) is bytes else None)
        if api_key is not None:
            try:
                parsed = domain.fast_loads(value)
            except (ValueError, ArithmeticError, RecursionError):
                pass  # read again below, which says why
            else:
                if type(parsed) is dict and "specversion" not in parsed:
                    return Decoded(api_key, parsed)
    return read(value, headers, max_bytes)


def read(value: bytes | None, headers: Any, max_bytes: int) -> Decoded:
    """`decode`, for any record."""
    headers = list(headers or ())
    api_key = None
    unreadable_key = False
    for name, header_value in headers:
        if name.lower() == API_KEY_HEADER and header_value is not None:
            api_key = _API_KEYS.get(header_value) if type(header_value) is bytes else None
            if api_key is None:
                try:
                    api_key = bytes(header_value).decode("utf-8").strip()
                except UnicodeDecodeError:
                    unreadable_key = True
                else:
                    if type(header_value) is bytes:
                        if len(_API_KEYS) > 1024:
                            _API_KEYS.clear()
                        _API_KEYS[header_value] = api_key
    if unreadable_key and api_key is None:
        return Decoded(None, error=EventError(
            "invalid_api_key", f"The {API_KEY_HEADER} header is not UTF-8 text",
            API_KEY_HEADER))
    # the API key alone is not a CloudEvent: binary mode needs ce_* headers besides it
    binary = len(headers) > 1 and cloudevents.is_kafka_binary(headers)
    if binary and (not (value or b"").strip() or not cloudevents.kafka_data_is_json(headers)):
        # no data (data is absent), or data that is not JSON: refused for its
        # datacontenttype before the value is read
        try:
            return Decoded(api_key, cloudevents.from_kafka_binary(headers, None),
                           cloudevent=True)
        except EventError as err:
            return Decoded(api_key, error=err, idempotency_key=cloudevents.kafka_binary_key(
                headers), cloudevent=True)
    if value is None:
        return Decoded(api_key, error=EventError("invalid_event", "The record has no value",
                                                 None))
    # a binary CloudEvent's key is in its headers: reported with it whatever its value holds
    if len(value) > max_bytes:
        return Decoded(api_key, error=EventError(
            "event_too_large", f"The record value is {len(value)} bytes; at most {max_bytes} "
            "are allowed for one usage event", None),
            idempotency_key=cloudevents.kafka_binary_key(headers) if binary else None,
            cloudevent=binary)
    try:
        parsed = domain.loads(value)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        return Decoded(api_key, error=EventError(
            "invalid_json", f"The record value is not valid UTF-8 JSON: {exc}", None),
            idempotency_key=cloudevents.kafka_binary_key(headers) if binary else None,
            cloudevent=binary)
    try:
        if binary:
            return Decoded(api_key, cloudevents.from_kafka_binary(headers, parsed),
                           cloudevent=True)
        if cloudevents.is_structured_json(parsed):
            return Decoded(api_key, cloudevents.from_structured(parsed), cloudevent=True)
    except EventError as err:  # reported with the composed key when there is one
        key = (cloudevents.kafka_binary_key(headers) if binary
               else cloudevents.composed_key(parsed))
        return Decoded(api_key, error=err, idempotency_key=key, cloudevent=True)
    if not isinstance(parsed, dict):
        return Decoded(api_key, error=EventError(
            "invalid_event", "The record value must be one usage event (a JSON object)", None))
    if "idempotency_key" not in parsed and cloudevents.lacks_specversion(
            name for name, _value in headers):
        return Decoded(api_key, error=cloudevents.specversion_missing("ce_specversion"),
                       idempotency_key=cloudevents.kafka_binary_key(headers), cloudevent=True)
    return Decoded(api_key, parsed)


#: A report (its key, value and headers) stays under this many bytes: aiokafka's producer
#: refuses a record over `max_request_size` (1 MiB by default), and so do brokers over
#: `message.max.bytes` (about 1 MB by default). A report that cannot be sent holds its poll,
#: and every record behind it, back for good.
REPORT_BUDGET_BYTES = 512 * 1024
#: At most this many bytes of the input record's headers travel with its report.
MAX_FORWARDED_HEADER_BYTES = 64 * 1024
HEADERS_OMITTED_HEADER = "billstream-headers-omitted"
_HEADER_OVERHEAD = 10  # a header's two length varints, and then some
_SHORT_TEXT = 1024


@dataclass(frozen=True, slots=True)
class Report:
    """A record for `billstream.usage.rejected`."""

    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]

    def size(self) -> int:
        return (len(self.key or b"") + len(self.value)
                + sum(len(name.encode("utf-8")) + len(v) + _HEADER_OVERHEAD
                      for name, v in self.headers))


def report(*, outcome: Outcome, topic: str, partition: int, offset: int, key: bytes | None,
           value: bytes | None, headers: Any, tenant_id: str | None,
           environment: str | None, now: datetime | None = None,
           max_echo_bytes: int = 64 * 1024,
           budget: int = REPORT_BUDGET_BYTES) -> Report:
    """The report of an input record's outcome (documented shape), keyed like the input
    record and with its headers (`forwarded_headers`), always under `budget` bytes. Until it
    fits, it leaves out, in this order: the echo of the input's value, the echo of its key,
    the input's headers, the input's key as the report's key, and any text of the outcome
    past 1 KiB. `source` names the input record, which the topic keeps."""
    forwarded = forwarded_headers(headers, outcome.status)
    report_key = key if key is None or len(key) <= max_echo_bytes else None
    common = dict(outcome=outcome, topic=topic, partition=partition, offset=offset, key=key,
                  value=value, tenant_id=tenant_id, environment=environment,
                  now=now or datetime.now(UTC), max_echo_bytes=max_echo_bytes)
    no_echo = {"echo_value": False, "echo_key": False}
    bare_headers = forwarded_headers(headers, outcome.status, max_bytes=0)
    for change, report_headers in (({}, forwarded), ({"echo_value": False}, forwarded),
                                   (no_echo, forwarded), (no_echo, bare_headers)):
        made = Report(report_key, rejection(**common, **change), report_headers)
        if made.size() <= budget:
            return made
    short = dataclasses.replace(outcome, **{
        name: _shortened(getattr(outcome, name))
        for name in ("idempotency_key", "message", "param")})
    return Report(None, rejection(**{**common, "outcome": short}, **no_echo), bare_headers)


def _shortened(text: str | None) -> str | None:
    if text is None or len(text) <= _SHORT_TEXT:
        return text
    return text[:_SHORT_TEXT] + "…"


def rejection(
    *,
    outcome: Outcome,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    tenant_id: str | None,
    environment: str | None,
    now: datetime | None = None,
    max_echo_bytes: int = 64 * 1024,
    echo_key: bool = True,
    echo_value: bool = True,
) -> bytes:
    """The JSON value of a record on `billstream.usage.rejected` (documented shape; `report`
    makes the whole record). The input record's key and value are echoed when each is at
    most `max_echo_bytes` (the input's cap for one event) and asked for, else left out
    (`value_omitted`, `value_bytes`)."""
    record: dict[str, Any] = {"key": None, "value": None}
    for name, raw, echo in (("key", key, echo_key), ("value", value, echo_value)):
        if raw is None:
            continue
        if not echo or len(raw) > max_echo_bytes:
            record[f"{name}_omitted"] = True
            record[f"{name}_bytes"] = len(raw)
            continue
        record[name] = _text(raw)
        if record[name] is None:
            record[f"{name}_base64"] = base64.b64encode(raw).decode()
    body = {
        "object": "usage_rejection",
        "status": outcome.status,  # "rejected", or "duplicate" for a resent event
        "code": outcome.code or ("duplicate" if outcome.status == "duplicate" else None),
        "message": outcome.message or (
            "An event with this idempotency key was already accepted; this one was not "
            "counted again" if outcome.status == "duplicate" else None),
        "param": outcome.param,
        "idempotency_key": outcome.idempotency_key,
        "usage_id": outcome.usage_id,  # of the original, for a duplicate
        "tenant_id": tenant_id,
        "environment": environment,
        "source": {"topic": topic, "partition": partition, "offset": offset},
        "record": record,
        "created_at": now or datetime.now(UTC),
    }
    return orjson.dumps(body, option=orjson.OPT_UTC_Z)


def forwarded_headers(headers: Any, status: str,
                      max_bytes: int = MAX_FORWARDED_HEADER_BYTES) -> list[tuple[str, bytes]]:
    """The input record's headers minus the API key, plus the outcome (a name that was not
    UTF-8 written with \\x escapes: billstream_messaging.records). Headers past
    `max_bytes` in all (names, values and a few bytes each) are left out, and their number
    is given in `billstream-headers-omitted` (the input record, which `source` names, has
    them)."""
    out: list[tuple[str, bytes]] = []
    size = omitted = 0
    for name, v in headers or ():
        if name.lower() == API_KEY_HEADER:
            continue
        value = bytes(v) if v is not None else b""
        printable = printable_header_name(name)
        size += len(printable.encode("utf-8")) + len(value) + _HEADER_OVERHEAD
        if size > max_bytes:
            omitted += 1
            continue
        out.append((printable, value))
    if omitted:
        out.append((HEADERS_OMITTED_HEADER, str(omitted).encode()))
    out.append((OUTCOME_HEADER, status.encode()))
    return out


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None
