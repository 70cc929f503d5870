"""CloudEvents 1.0 usage events: mapped onto the native usage event, then validated as one.

Pure: no I/O. Each function here only *maps* a CloudEvent (structured JSON, a JSON batch, HTTP
binary mode or Kafka binary mode) to the raw native event dict that `domain.parse_event`
validates, exactly as if it had been posted natively. The CloudEvents-specific rules are
checked here (raising `domain.EventError`, code `invalid_event`, `param` named after the
CloudEvents attribute); the values themselves (quantity, timestamp format, lengths, property
size) are validated by `domain.parse_event` afterwards, whose `param` names the native field
(`attribute_param` translates it back).

Mapping (CloudEvents attribute → native field):

| CloudEvents                  | Native            | Rule                                          |
| ---------------------------- | ----------------- | --------------------------------------------- |
| `specversion`                | -                 | required, exactly `"1.0"`                     |
| `source` + `id`              | `idempotency_key` | both required non-empty strings; the key is   |
|                              |                   | `f"{source} {id}"` (one space), at most 255   |
|                              |                   | characters (else param `id`); `source` (a     |
|                              |                   | URI-reference) must hold no whitespace, so    |
|                              |                   | the key splits back unambiguously             |
| `subject`                    | `customer`        | required (usage without a customer cannot be  |
|                              |                   | billed): a `cus_` id or the `external_id`     |
| `type`                       | `meter`           | required: the meter code                      |
| `time`                       | `timestamp`       | optional, RFC 3339; absent → "now" as usual   |
| `data.quantity`              | `quantity`        | taken out of `data`; absent or null → 1       |
| `data` (other members)       | `properties`      | a JSON object; absent or null → `{}`          |
| `datacontenttype`            | -                 | optional; `application/json` or any `+json`   |
|                              |                   | media type (parameters such as `charset` are  |
|                              |                   | allowed)                                      |
| `data_base64`                | -                 | refused: usage data is JSON                   |
| `dataschema`, extensions     | -                 | ignored (e.g. `traceparent`, `partitionkey`,  |
|                              |                   | any custom attribute): not part of the usage  |
|                              |                   | event nor of its payload hash                 |

A `null` attribute is the same as an absent one (JSON event format §2.2).

Content modes:

- structured (`application/cloudevents+json`): one JSON object, `from_structured`;
- batch (`application/cloudevents-batch+json`): a JSON array of 1 to `max_events` structured
  events, `split_batch` then `from_structured` per event;
- HTTP binary: attributes in `ce-<name>` headers (names case-insensitive, values
  percent-decoded as UTF-8 after undoing RFC 7230 quoted-string escaping; a value that is not
  printable ASCII or decodes to invalid UTF-8 is refused), `datacontenttype` in
  `Content-Type` (a `ce-datacontenttype` header is refused, as the binding requires), the body
  is `data`: `from_http_binary`;
- Kafka binary: attributes in `ce_<name>` headers (UTF-8 values, no percent-encoding),
  `datacontenttype` in `content-type`, the message value is `data`: `from_kafka_binary`.
  `is_kafka_binary` tells it from a structured message (a `content-type` of
  `application/cloudevents…` means structured, even with `ce_*` headers).

A repeated attribute header (HTTP or Kafka) is refused: which value would be meant is unclear.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import unquote

from billstream_ingestion.domain import MAX_KEY_LENGTH, BodyError, EventError, Outcome

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
SPECVERSION = "1.0"
#: a content type starting so names an event format: the message is in structured (or batch)
#: mode, whatever `ce-*` / `ce_*` headers come along
EVENT_FORMAT = "application/cloudevents"

# the attributes this mapping reads; every other one is an ignored extension
_REQUIRED = ("id", "source", "type", "subject")
_HTTP_PREFIX = "ce-"
_KAFKA_PREFIX = "ce_"
_PRINTABLE_ASCII = re.compile(r"^[\x20-\x7e]*$")
_QUOTED_PAIR = re.compile(r"\\(.)")

#: native field → CloudEvents attribute, for errors reported by domain.parse_event
_ATTRIBUTE_OF = {
    "idempotency_key": "id",
    "customer": "subject",
    "meter": "type",
    "timestamp": "time",
    "quantity": "data.quantity",
    "properties": "data",
}


def _invalid(message: str, param: str | None) -> EventError:
    return EventError("invalid_event", message, param)


# ---------------------------------------------------------------- the key


def idempotency_key(source: str, id: str) -> str:
    """`f"{source} {id}"`: CloudEvents identifies an event by (source, id); a source holds no
    whitespace, so the first space splits the key back."""
    if any(ch.isspace() for ch in source):
        raise _invalid("source must be a URI-reference without whitespace", "source")
    key = f"{source} {id}"
    if len(key) > MAX_KEY_LENGTH:
        raise _invalid(f"source and id together must be at most {MAX_KEY_LENGTH - 1} "
                       f"characters (the idempotency key is \"<source> <id>\"); "
                       f"got {len(key) - 1}", "id")
    return key


def composed_key(event: Any) -> str | None:
    """The idempotency key of a raw CloudEvent (a dict of its attributes, as in structured
    mode), or None when its `source` and `id` make none. Never raises: the report of an event
    rejected while mapping names its key whenever it can."""
    if not isinstance(event, dict):
        return None
    source, id_ = event.get("source"), event.get("id")
    if not (isinstance(source, str) and source and isinstance(id_, str) and id_):
        return None
    try:
        return idempotency_key(source, id_)
    except EventError:
        return None


def http_binary_key(headers: Mapping[str, str]) -> str | None:
    """`composed_key` of an HTTP binary-mode event, from its `ce-source` and `ce-id` headers
    (None when one is missing, repeated or does not decode)."""
    found: dict[str, str] = {}
    for raw_name, raw_value in _items(headers):
        name = raw_name.lower()
        if name in ("ce-source", "ce-id"):
            attribute = name[len(_HTTP_PREFIX):]
            if attribute in found:
                return None
            try:
                found[attribute] = _http_value(raw_value, attribute)
            except EventError:
                return None
    return composed_key(found)


def kafka_binary_key(headers: Sequence[tuple[str, bytes | None]]) -> str | None:
    """`composed_key` of a Kafka binary-mode record, from its `ce_source` and `ce_id` headers
    (None when one is missing, repeated or not UTF-8)."""
    found: dict[str, str | None] = {}
    for raw_name, raw_value in headers:
        name = _text_name(raw_name)
        if name in ("ce_source", "ce_id"):
            attribute = name[len(_KAFKA_PREFIX):]
            if attribute in found:
                return None
            try:
                found[attribute] = None if raw_value is None else bytes(raw_value).decode()
            except UnicodeDecodeError:
                return None
    return composed_key(found)


# ---------------------------------------------------------------- content modes


def is_structured_json(obj: Any) -> bool:
    """A parsed JSON value that is a structured-mode CloudEvent (not a native event)."""
    return isinstance(obj, dict) and "specversion" in obj


def is_kafka_binary(headers: Sequence[tuple[str, bytes | None]]) -> bool:
    """A Kafka record in binary content mode: it carries a `ce_specversion` header, and no
    `content-type` of an event format (`application/cloudevents…`), which means structured
    mode whatever other headers say (Kafka protocol binding §3)."""
    if any(value is not None and value.decode("latin-1").strip().lower().startswith(
            EVENT_FORMAT) for value in _kafka_content_types(headers)):
        return False
    return any(_text_name(name) == f"{_KAFKA_PREFIX}specversion" for name, _value in headers)


def lacks_specversion(header_names: Iterable[str | bytes]) -> bool:
    """Whether a request or record that is not in binary mode carries CloudEvents attribute
    headers (`ce-id`, `ce_source`, … in any case) but no `ce-specversion`/`ce_specversion`:
    a binary CloudEvent missing it, most likely (see `specversion_missing`)."""
    names = [_text_name(name).lower() for name in header_names]
    return (any(name.startswith((_KAFKA_PREFIX, _HTTP_PREFIX)) for name in names)
            and not any(name in ("ce_specversion", "ce-specversion") for name in names))


def specversion_missing(header: str) -> EventError:
    """The rejection of an event with no idempotency key that `lacks_specversion`: what is
    missing is the header that makes it binary mode, not the key."""
    return EventError(
        "invalid_event", f"There are {header[:3]}* headers but no {header} header, which a "
        "CloudEvent in binary mode needs (without it the event is read as a native event, and "
        "has no idempotency_key)", header)


def kafka_data_is_json(headers: Sequence[tuple[str, bytes | None]]) -> bool:
    """Whether a binary-mode record's `content-type` (its datacontenttype) is JSON, or
    absent (JSON is assumed; a null header is no content type, as `from_kafka_binary` has
    it). Data under another content type is not read: the mapping refuses it."""
    content_type = next(_kafka_content_types(headers), None)
    if content_type is None:
        return True
    try:
        return is_json_media_type(content_type.decode("utf-8"))
    except UnicodeDecodeError:
        return False


def _kafka_content_types(headers: Sequence[tuple[str, bytes | None]]
                         ) -> Iterator[bytes | None]:
    """The values of a Kafka record's `content-type` headers (any case), in order."""
    for name, value in headers:
        if _text_name(name).lower() == "content-type":
            yield None if value is None else bytes(value)


def split_batch(body: Any, max_events: int) -> list[Any]:
    """The events of a JSON batch body (`application/cloudevents-batch+json`)."""
    if not isinstance(body, list):
        raise BodyError("parameter_invalid",
                        "A CloudEvents batch body must be a JSON array of events")
    if not body:
        raise BodyError("parameter_invalid",
                        "A CloudEvents batch must hold at least one event")
    if len(body) > max_events:
        raise BodyError("batch_too_large",
                        f"A batch holds at most {max_events} events; got {len(body)}",
                        status=413)
    return body


def from_structured(ce: Any) -> dict[str, Any]:
    """One structured-mode CloudEvent (a parsed JSON object) → a raw native event."""
    if not isinstance(ce, dict):
        raise _invalid("A CloudEvent must be a JSON object", None)
    return _to_native(ce, data=ce.get("data"))


def from_http_binary(headers: Mapping[str, str], data: Any) -> dict[str, Any]:
    """HTTP binary content mode: attributes in `ce-*` headers, `data` the parsed JSON body
    (None for an empty body, or one not read because its Content-Type is not JSON: that
    datacontenttype is refused before data is looked at)."""
    attributes: dict[str, Any] = {}
    for raw_name, raw_value in _items(headers):
        name = raw_name.lower()
        if name == "content-type":
            _put(attributes, "datacontenttype", raw_value.strip(), "Content-Type")
        elif name.startswith(_HTTP_PREFIX) and len(name) > len(_HTTP_PREFIX):
            attribute = name[len(_HTTP_PREFIX):]
            if attribute == "datacontenttype":
                raise _invalid("In binary mode datacontenttype travels in Content-Type; a "
                               "ce-datacontenttype header is not allowed", "datacontenttype")
            _put(attributes, attribute, _http_value(raw_value, attribute), raw_name)
    return _to_native(attributes, data=data)


def from_kafka_binary(headers: Sequence[tuple[str, bytes | None]], data: Any) -> dict[str, Any]:
    """Kafka binary content mode: attributes in `ce_*` headers (UTF-8), `content-type` for
    datacontenttype, `data` the parsed JSON message value (None when empty)."""
    attributes: dict[str, Any] = {}
    for raw_name, raw_value in headers:
        name = _text_name(raw_name)
        if name.lower() == "content-type":
            attribute = "datacontenttype"
        elif name.startswith(_KAFKA_PREFIX) and len(name) > len(_KAFKA_PREFIX):
            attribute = name[len(_KAFKA_PREFIX):]
        else:
            continue
        value = None
        if raw_value is not None:
            try:
                value = bytes(raw_value).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _invalid(f"Header {name} is not valid UTF-8", attribute) from exc
        _put(attributes, attribute, value, name)
    return _to_native(attributes, data=data)


def attribute_param(param: str | None) -> str | None:
    """The CloudEvents name of a native field named in a `domain.parse_event` rejection
    (`customer` → `subject`, `properties.region` → `data.region`, ...)."""
    if param is None:
        return None
    head, dot, rest = param.partition(".")
    if head == "properties" and dot:
        return f"data.{rest}"
    return _ATTRIBUTE_OF.get(param, param)


def in_cloudevent_terms(outcome: Outcome) -> Outcome:
    """An outcome of an event that came as a CloudEvent, its `param` named as the attribute
    it came from."""
    if outcome.param is None:
        return outcome
    return dataclasses.replace(outcome, param=attribute_param(outcome.param))


# ---------------------------------------------------------------- the mapping


def _to_native(attributes: Mapping[str, Any], *, data: Any) -> dict[str, Any]:
    specversion = attributes.get("specversion")
    if specversion is None:
        raise _invalid("specversion is required", "specversion")
    if specversion != SPECVERSION:
        raise _invalid(f"Only CloudEvents specversion {SPECVERSION!r} is supported",
                       "specversion")
    values = {name: _required_text(attributes, name) for name in _REQUIRED}
    content_type = attributes.get("datacontenttype")
    if content_type is not None and not is_json_media_type(content_type):
        raise _invalid("datacontenttype must be application/json or a +json media type",
                       "datacontenttype")
    if attributes.get("data_base64") is not None:
        raise _invalid("data_base64 is not accepted: usage data must be a JSON object",
                       "data_base64")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _invalid("data must be a JSON object", "data")
    properties = {k: v for k, v in data.items() if k != "quantity"}
    quantity = data.get("quantity")
    raw: dict[str, Any] = {
        "idempotency_key": idempotency_key(values["source"], values["id"]),
        "customer": values["subject"],
        "meter": values["type"],
        "quantity": 1 if quantity is None else quantity,
        "properties": properties,
    }
    if attributes.get("time") is not None:
        raw["timestamp"] = attributes["time"]
    return raw


def _required_text(attributes: Mapping[str, Any], name: str) -> str:
    value = attributes.get(name)
    if value is None:
        raise _invalid(f"{name} is required", name)
    if not isinstance(value, str):
        raise _invalid(f"{name} must be a string", name)
    if not value:
        raise _invalid(f"{name} must not be empty", name)
    return value


def is_json_media_type(value: Any) -> bool:
    """`application/json` or a `+json` media type, parameters allowed: a datacontenttype
    usage data may have."""
    if not isinstance(value, str):
        return False
    media_type = value.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.endswith("+json") and "/" in media_type)


# ---------------------------------------------------------------- headers


def _items(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    # Starlette's Headers keeps repeated headers in .items(); a dict has one per key
    return list(headers.items())


def _text_name(name: str | bytes) -> str:
    return name.decode("utf-8", "replace") if isinstance(name, bytes | bytearray) else name


def _put(attributes: dict[str, Any], attribute: str, value: Any, header: str) -> None:
    if attribute in attributes:
        raise _invalid(f"Header {header} is repeated", attribute)
    attributes[attribute] = value


def _http_value(value: str, attribute: str) -> str:
    """One `ce-*` header value: RFC 7230 quoted-string escaping undone, then one round of
    percent-decoding as UTF-8 (HTTP protocol binding §3.1.3.2)."""
    value = value.strip(" \t")
    if not _PRINTABLE_ASCII.match(value):
        raise _invalid(f"Header ce-{attribute} must be printable ASCII (percent-encode the "
                       "rest as UTF-8)", attribute)
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = _QUOTED_PAIR.sub(r"\1", value[1:-1])
    try:
        return unquote(value, encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise _invalid(f"Header ce-{attribute} percent-decodes to invalid UTF-8",
                       attribute) from exc
