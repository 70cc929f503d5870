"""CloudEvents 1.0 → native usage event mapping (no I/O)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from billstream_ingestion import cloudevents as ce
from billstream_ingestion import domain
from billstream_ingestion.domain import Outcome, UsageEvent


def body(text: str):
    return json.loads(text, parse_float=Decimal, parse_constant=Decimal)


def structured(**over):
    event = {
        "specversion": "1.0", "id": "evt-1", "source": "/billing/api-gateway",
        "type": "api_calls", "subject": "acme-1", "time": "2026-01-05T10:00:00+01:00",
        "datacontenttype": "application/json",
        "data": {"quantity": "3", "region": "eu"},
    }
    for name, value in over.items():
        if value is ...:
            event.pop(name, None)
        else:
            event[name] = value
    return event


def http_headers(**over):
    headers = {"ce-specversion": "1.0", "ce-id": "evt-1", "ce-source": "/billing/api-gateway",
               "ce-type": "api_calls", "ce-subject": "acme-1",
               "Content-Type": "application/json; charset=utf-8"}
    for name, value in over.items():
        name = name.replace("_", "-")
        if value is ...:
            headers.pop(name, None)
        else:
            headers[name] = value
    return headers


def kafka_headers(**over):
    headers = {"ce_specversion": b"1.0", "ce_id": b"evt-1", "ce_source": b"/billing/api-gateway",
               "ce_type": b"api_calls", "ce_subject": b"acme-1",
               "content-type": b"application/json"}
    for name, value in over.items():
        if value is ...:
            headers.pop(name, None)
        else:
            headers[name] = value
    return list(headers.items())


def raises(fn, *args) -> domain.EventError:
    with pytest.raises(domain.EventError) as exc:
        fn(*args)
    assert exc.value.code == "invalid_event"
    return exc.value


def parse(raw, max_properties_bytes=8192):
    return domain.parse_event(0, raw, max_properties_bytes=max_properties_bytes)


# ---------------------------------------------------------------- constants and detection


def test_media_types():
    assert ce.STRUCTURED == "application/cloudevents+json"
    assert ce.BATCH == "application/cloudevents-batch+json"


def test_detection():
    assert ce.is_structured_json(structured())
    assert ce.is_structured_json({"specversion": None})
    assert not ce.is_structured_json({"idempotency_key": "k", "customer": "c", "meter": "m"})
    assert not ce.is_structured_json([structured()])
    assert not ce.is_structured_json("specversion")
    assert ce.is_kafka_binary(kafka_headers())
    assert ce.is_kafka_binary([(b"ce_specversion", b"1.0")])
    assert not ce.is_kafka_binary([("content-type", b"application/cloudevents+json")])
    assert not ce.is_kafka_binary([])


@pytest.mark.parametrize("name, value", [
    ("content-type", b"application/cloudevents+json"),
    ("Content-Type", b"application/cloudevents+json; charset=utf-8"),
    ("CONTENT-TYPE", b" Application/CloudEvents+JSON"),
    (b"content-type", b"application/cloudevents+json"),
    ("content-type", b"application/cloudevents"),
])
def test_an_event_format_content_type_means_kafka_structured_mode(name, value):
    # the Kafka binding: a content-type of application/cloudevents... is structured mode, even
    # with ce_* headers (the value is then read as a structured event)
    headers = [(n, v) for n, v in kafka_headers() if n != "content-type"]
    assert not ce.is_kafka_binary([*headers, (name, value)])
    assert not ce.is_kafka_binary([(name, value), *headers])
    assert ce.is_kafka_binary(headers)  # no content-type: binary
    assert ce.is_kafka_binary([*headers, (name, None)])
    assert ce.is_kafka_binary([*headers, (name, b"application/json; charset=utf-8")])


# ---------------------------------------------------------------- the key


def test_key_is_source_space_id():
    assert ce.idempotency_key("/src", "id-1") == "/src id-1"
    # the id may hold spaces: the first space still splits it back, the source has none
    key = ce.idempotency_key("urn:x:y", "an id with spaces")
    assert key.split(" ", 1) == ["urn:x:y", "an id with spaces"]


@pytest.mark.parametrize("source", ["/a b", "/a\tb", "/a\nb", "/a\u00a0b", "/a\u2003b", " /a"])
def test_key_source_must_hold_no_whitespace(source):
    assert raises(ce.idempotency_key, source, "x").param == "source"


def test_key_length_limit():
    source = "/s"
    longest_id = "i" * (domain.MAX_KEY_LENGTH - len(source) - 1)
    assert len(ce.idempotency_key(source, longest_id)) == domain.MAX_KEY_LENGTH
    err = raises(ce.idempotency_key, source, longest_id + "i")
    assert err.param == "id"
    err = raises(ce.idempotency_key, "/" + "s" * 300, "1")
    assert err.param == "id"


def test_composed_key_of_a_raw_event():
    assert ce.composed_key(structured()) == "/billing/api-gateway evt-1"
    # whatever else is wrong with the event: its key is reported with its rejection
    assert ce.composed_key(structured(data=[1], subject=..., data_base64="eA==")) == (
        "/billing/api-gateway evt-1")
    assert ce.composed_key({"source": "//acme", "id": "i1"}) == "//acme i1"


@pytest.mark.parametrize("event", [
    structured(id=...), structured(source=...), structured(id=None), structured(id=""),
    structured(source=""), structured(id=7), structured(source=["/s"]),
    structured(source="/my source"), structured(id="i" * 300), [structured()], "x", None,
])
def test_composed_key_is_none_without_a_valid_source_and_id(event):
    assert ce.composed_key(event) is None


# ---------------------------------------------------------------- structured mode


def test_structured_mapping():
    assert ce.from_structured(structured()) == {
        "idempotency_key": "/billing/api-gateway evt-1",
        "customer": "acme-1",
        "meter": "api_calls",
        "quantity": "3",
        "timestamp": "2026-01-05T10:00:00+01:00",
        "properties": {"region": "eu"},
    }


def test_structured_defaults():
    raw = ce.from_structured(structured(time=..., data=..., datacontenttype=...))
    assert raw == {"idempotency_key": "/billing/api-gateway evt-1", "customer": "acme-1",
                   "meter": "api_calls", "quantity": 1, "properties": {}}
    assert "timestamp" not in raw


@pytest.mark.parametrize("over", [
    {"data": None}, {"data": {}}, {"data": {"quantity": None}}, {"time": None},
    {"datacontenttype": None}, {"data_base64": None},
])
def test_null_is_absent(over):
    raw = ce.from_structured(structured(**over))
    if "time" in over:
        assert "timestamp" not in raw
    if "data" in over:
        assert raw["quantity"] == 1


def test_quantity_is_taken_out_of_data_exactly():
    raw = ce.from_structured(body(
        '{"specversion": "1.0", "id": "1", "source": "/s", "type": "m", "subject": "c",'
        ' "data": {"quantity": 0.1, "tokens": 2.50, "n": 3}}'))
    assert raw["quantity"] == Decimal("0.1") and isinstance(raw["quantity"], Decimal)
    assert str(raw["quantity"]) == "0.1"
    assert raw["properties"] == {"tokens": Decimal("2.50"), "n": 3}
    ev = parse(raw)
    assert ev.quantity == Decimal("0.1") and ev.properties == {"tokens": "2.5", "n": 3}


def test_input_is_not_mutated():
    event = structured()
    snapshot = json.loads(json.dumps(event))
    ce.from_structured(event)
    assert event == snapshot


def test_extensions_are_ignored():
    plain = ce.from_structured(structured())
    extended = ce.from_structured(structured(
        dataschema="https://example.com/schema.json",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        partitionkey="acme-1", comexampleextension1="value", comexampleothervalue=5,
        unsetextension=None))
    assert extended == plain
    assert parse(extended).payload_hash == parse(plain).payload_hash


@pytest.mark.parametrize("content_type", [
    "application/json", "application/json; charset=utf-8", "Application/JSON",
    "application/vnd.billstream.usage+json", "application/cloudevents+json",
    " application/json ",
])
def test_json_content_types(content_type):
    assert ce.from_structured(structured(datacontenttype=content_type))["meter"] == "api_calls"


@pytest.mark.parametrize("over, param", [
    ({"specversion": ...}, "specversion"),
    ({"specversion": None}, "specversion"),
    ({"specversion": "0.3"}, "specversion"),
    ({"specversion": "1.0.2"}, "specversion"),
    ({"specversion": 1.0}, "specversion"),
    ({"specversion": Decimal("1.0")}, "specversion"),
    ({"id": ...}, "id"),
    ({"id": ""}, "id"),
    ({"id": 7}, "id"),
    ({"source": ...}, "source"),
    ({"source": ""}, "source"),
    ({"source": ["/s"]}, "source"),
    ({"source": "/my source"}, "source"),
    ({"type": ...}, "type"),
    ({"type": ""}, "type"),
    ({"type": {"code": "m"}}, "type"),
    ({"subject": ...}, "subject"),
    ({"subject": None}, "subject"),
    ({"subject": ""}, "subject"),
    ({"subject": 42}, "subject"),
    ({"datacontenttype": "text/xml"}, "datacontenttype"),
    ({"datacontenttype": "text/plain"}, "datacontenttype"),
    ({"datacontenttype": "application/jsonl"}, "datacontenttype"),
    ({"datacontenttype": "+json"}, "datacontenttype"),
    ({"datacontenttype": ""}, "datacontenttype"),
    ({"datacontenttype": 5}, "datacontenttype"),
    ({"data": ..., "data_base64": "eyJxdWFudGl0eSI6IDF9"}, "data_base64"),
    ({"data_base64": "eyJxdWFudGl0eSI6IDF9"}, "data_base64"),
    ({"data": "<much wow=\"xml\"/>"}, "data"),
    ({"data": [1, 2]}, "data"),
    ({"data": 5}, "data"),
    ({"data": True}, "data"),
    ({"id": "i" * 300}, "id"),
])
def test_structured_errors_name_the_attribute(over, param):
    assert raises(ce.from_structured, structured(**over)).param == param


@pytest.mark.parametrize("value", [None, [], "x", 5, [structured()]])
def test_structured_must_be_an_object(value):
    assert raises(ce.from_structured, value).param is None


def test_validation_order_is_stable():
    # a completely wrong event reports the version first, then the required attributes
    assert raises(ce.from_structured, {"specversion": "2.0"}).param == "specversion"
    assert raises(ce.from_structured, {"specversion": "1.0"}).param == "id"
    assert raises(ce.from_structured, {"specversion": "1.0", "id": "1"}).param == "source"


# ---------------------------------------------------------------- the spec's examples


SPEC_XML = """{
    "specversion" : "1.0",
    "type" : "com.example.someevent",
    "source" : "/mycontext",
    "id" : "A234-1234-1234",
    "time" : "2018-04-05T17:31:00Z",
    "comexampleextension1" : "value",
    "comexampleothervalue" : 5,
    "unsetextension": null,
    "datacontenttype" : "text/xml",
    "data" : "<much wow=\\"xml\\"/>"
}"""

SPEC_BINARY = """{
    "specversion" : "1.0",
    "type" : "com.example.someevent",
    "source" : "/mycontext",
    "id" : "B234-1234-1234",
    "time" : "2018-04-05T17:31:00Z",
    "comexampleextension1" : "value",
    "comexampleothervalue" : 5,
    "datacontenttype" : "application/vnd.apache.thrift.binary",
    "data_base64" : "... base64 encoded string ..."
}"""

SPEC_JSON = """{
    "specversion" : "1.0",
    "type" : "com.example.someevent",
    "source" : "/mycontext",
    "subject": null,
    "id" : "C234-1234-1234",
    "time" : "2018-04-05T17:31:00Z",
    "comexampleextension1" : "value",
    "comexampleothervalue" : 5,
    "datacontenttype" : "application/json",
    "data" : {
        "appinfoA" : "abc",
        "appinfoB" : 123,
        "appinfoC" : true
    }
}"""


def test_spec_examples():
    # the spec's own examples are no usage events: XML data, binary data, no subject
    assert raises(ce.from_structured, body(SPEC_XML)).param == "subject"
    assert raises(ce.from_structured, body(SPEC_BINARY)).param == "subject"
    assert raises(ce.from_structured, body(SPEC_JSON)).param == "subject"
    with_subject = body(SPEC_XML) | {"subject": "acme-1"}
    assert raises(ce.from_structured, with_subject).param == "datacontenttype"
    with_subject = body(SPEC_BINARY) | {"subject": "acme-1"}
    assert raises(ce.from_structured, with_subject).param == "datacontenttype"
    with_subject = body(SPEC_JSON) | {"subject": "acme-1"}
    assert ce.from_structured(with_subject) == {
        "idempotency_key": "/mycontext C234-1234-1234", "customer": "acme-1",
        "meter": "com.example.someevent", "quantity": 1,
        "timestamp": "2018-04-05T17:31:00Z",
        "properties": {"appinfoA": "abc", "appinfoB": 123, "appinfoC": True},
    }


def test_spec_batch_example():
    batch = body("[" + SPEC_BINARY + "," + SPEC_JSON + "]")
    events = ce.split_batch(batch, 1000)
    assert len(events) == 2
    assert raises(ce.from_structured, events[0] | {"subject": "c"}).param == "datacontenttype"
    assert ce.from_structured(events[1] | {"subject": "c"})["customer"] == "c"


# ---------------------------------------------------------------- into the domain


def test_structured_event_parses_into_a_usage_event():
    ev = parse(ce.from_structured(body(
        '{"specversion": "1.0", "id": "evt-42", "source": "https://gw.example.com/edge",'
        ' "type": "api_calls", "subject": "cus_123", "time": "2026-01-05T10:00:00+01:00",'
        ' "datacontenttype": "application/json", "traceparent": "00-ab-cd-01",'
        ' "data": {"quantity": "1.50", "region": "eu", "tokens": 2.50}}')))
    assert isinstance(ev, UsageEvent)
    assert ev.idempotency_key == "https://gw.example.com/edge evt-42"
    assert ev.customer == "cus_123" and ev.meter == "api_calls"
    assert ev.quantity == Decimal("1.5")
    assert ev.timestamp == datetime(2026, 1, 5, 9, tzinfo=UTC)
    assert ev.properties == {"region": "eu", "tokens": "2.5"}
    native = parse({"idempotency_key": "other", "customer": "cus_123", "meter": "api_calls",
                    "quantity": "1.5", "timestamp": "2026-01-05T09:00:00Z",
                    "properties": {"tokens": "2.5", "region": "eu"}})
    assert ev.payload_hash == native.payload_hash  # the same usage, whichever format


@pytest.mark.parametrize("over, native_param, attribute", [
    ({"data": {"quantity": "-1"}}, "quantity", "data.quantity"),
    ({"data": {"quantity": True}}, "quantity", "data.quantity"),
    ({"time": "yesterday"}, "timestamp", "time"),
    ({"subject": "c" * 256}, "customer", "subject"),
    ({"type": "m" * 256}, "meter", "type"),
    ({"data": {"x": Decimal("NaN")}}, "properties.x", "data.x"),
])
def test_values_are_validated_by_the_domain(over, native_param, attribute):
    out = parse(ce.from_structured(structured(**over)))
    assert isinstance(out, Outcome) and out.status == "rejected"
    assert out.param == native_param
    assert ce.attribute_param(out.param) == attribute
    assert out.idempotency_key == "/billing/api-gateway evt-1"


def test_properties_size_cap_applies_to_data():
    out = parse(ce.from_structured(structured(data={"blob": "x" * 9000})))
    assert out.code == "properties_too_large"
    assert ce.attribute_param(out.param) == "data"


def test_attribute_param():
    assert ce.attribute_param(None) is None
    assert ce.attribute_param("idempotency_key") == "id"
    assert ce.attribute_param("properties.a.b") == "data.a.b"
    assert ce.attribute_param("somethingelse") == "somethingelse"


# ---------------------------------------------------------------- batch mode


def test_split_batch():
    events = [structured(id=str(i)) for i in range(3)]
    assert ce.split_batch(events, 3) == events


@pytest.mark.parametrize("raw, max_events, code, status", [
    ({}, 10, "parameter_invalid", 400),
    (structured(), 10, "parameter_invalid", 400),
    ({"events": [structured()]}, 10, "parameter_invalid", 400),
    ("[]", 10, "parameter_invalid", 400),
    (None, 10, "parameter_invalid", 400),
    ([], 10, "parameter_invalid", 400),
    ([structured()] * 11, 10, "batch_too_large", 413),
])
def test_unusable_batches(raw, max_events, code, status):
    with pytest.raises(domain.BodyError) as exc:
        ce.split_batch(raw, max_events)
    assert (exc.value.code, exc.value.status) == (code, status)


# ---------------------------------------------------------------- HTTP binary mode


def test_http_binary_mapping():
    raw = ce.from_http_binary(http_headers(ce_time="2026-01-05T10:00:00Z"),
                              body('{"quantity": 2.5, "region": "eu"}'))
    assert raw == {
        "idempotency_key": "/billing/api-gateway evt-1", "customer": "acme-1",
        "meter": "api_calls", "quantity": Decimal("2.5"),
        "timestamp": "2026-01-05T10:00:00Z", "properties": {"region": "eu"},
    }
    assert parse(raw).quantity == Decimal("2.5")


def test_http_binary_spec_example():
    headers = {"Host": "webhook.example.com", "ce-specversion": "1.0",
               "ce-type": "com.example.someevent", "ce-time": "2018-04-05T03:56:24Z",
               "ce-id": "1234-1234-1234", "ce-source": "/mycontext/subcontext",
               "ce-subject": "acme-1", "Content-Type": "application/json; charset=utf-8",
               "Content-Length": "2"}
    raw = ce.from_http_binary(headers, {})
    assert raw == {"idempotency_key": "/mycontext/subcontext 1234-1234-1234",
                   "customer": "acme-1", "meter": "com.example.someevent", "quantity": 1,
                   "timestamp": "2018-04-05T03:56:24Z", "properties": {}}


def test_http_header_names_are_case_insensitive():
    headers = {"CE-SpecVersion": "1.0", "Ce-Id": "evt-1", "CE-SOURCE": "/billing/api-gateway",
               "ce-Type": "api_calls", "Ce-Subject": "acme-1", "content-type": "application/json"}
    assert ce.from_http_binary(headers, None) == ce.from_http_binary(http_headers(), None)


def test_http_empty_body_and_no_content_type():
    raw = ce.from_http_binary(http_headers(**{"Content-Type": ...}), None)
    assert raw["quantity"] == 1 and raw["properties"] == {}


def test_http_header_values_are_percent_decoded():
    raw = ce.from_http_binary(http_headers(
        ce_subject="Euro%20%E2%82%AC%20%F0%9F%98%80", ce_id="a%25b%22c",
        ce_source="/caf%c3%a9", ce_type="api%5Fcalls", ce_time="2026-01-05T10%3A00%3A00Z"),
        None)
    assert raw["customer"] == "Euro \u20ac \U0001f600"
    assert raw["idempotency_key"] == "/caf\u00e9 a%b\"c"  # one round of decoding only
    assert raw["meter"] == "api_calls"
    assert raw["timestamp"] == "2026-01-05T10:00:00Z"


def test_http_quoted_string_values():
    raw = ce.from_http_binary(http_headers(ce_subject='"acme \\"one\\""'), None)
    assert raw["customer"] == 'acme "one"'
    raw = ce.from_http_binary(http_headers(ce_subject='"a%20b"'), None)
    assert raw["customer"] == "a b"


def test_http_extensions_are_ignored():
    plain = ce.from_http_binary(http_headers(), {"a": 1})
    extended = ce.from_http_binary(http_headers(
        ce_traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ce_dataschema="https://example.com/s.json", ce_comexample="x", Authorization="Bearer x",
        **{"ce-": "empty name"}), {"a": 1})
    assert extended == plain


class RepeatingHeaders(dict):
    """Like Starlette's Headers: .items() keeps repeated headers."""

    def __init__(self, items):
        super().__init__(items)
        self._items = items

    def items(self):
        return list(self._items)


@pytest.mark.parametrize("headers, data, param", [
    (http_headers(ce_specversion=...), None, "specversion"),
    (http_headers(ce_specversion="0.3"), None, "specversion"),
    (http_headers(ce_id=...), None, "id"),
    (http_headers(ce_id=""), None, "id"),
    (http_headers(ce_source=...), None, "source"),
    (http_headers(ce_source="/a%20b"), None, "source"),  # whitespace once decoded
    (http_headers(ce_type=...), None, "type"),
    (http_headers(ce_subject=...), None, "subject"),
    (http_headers(ce_subject="%C0%A0"), None, "subject"),  # overlong UTF-8
    (http_headers(ce_subject="%FF"), None, "subject"),
    (http_headers(ce_subject="caf\u00e9"), None, "subject"),  # not percent-encoded
    (http_headers(ce_subject="a\x7fb"), None, "subject"),
    (http_headers(**{"Content-Type": "text/xml"}), None, "datacontenttype"),
    (http_headers(ce_datacontenttype="application/json"), None, "datacontenttype"),
    (http_headers(), [1], "data"),
    (http_headers(), "text", "data"),
    (http_headers(ce_id="i" * 300), None, "id"),
    (RepeatingHeaders([*http_headers().items(), ("CE-ID", "evt-2")]), None, "id"),
])
def test_http_binary_errors(headers, data, param):
    assert raises(ce.from_http_binary, headers, data).param == param


# ---------------------------------------------------------------- Kafka binary mode


def test_kafka_binary_mapping():
    headers = kafka_headers(ce_time=b"2026-01-05T10:00:00Z", ce_subject="caf\u00e9".encode(),
                            traceparent=b"00-ab-cd-01", ce_partitionkey=b"acme-1")
    raw = ce.from_kafka_binary(headers, body('{"quantity": "7", "region": "eu"}'))
    assert raw == {
        "idempotency_key": "/billing/api-gateway evt-1", "customer": "caf\u00e9",
        "meter": "api_calls", "quantity": "7", "timestamp": "2026-01-05T10:00:00Z",
        "properties": {"region": "eu"},
    }
    ev = parse(raw)
    assert isinstance(ev, UsageEvent) and ev.quantity == Decimal(7)


def test_kafka_values_are_not_percent_decoded():
    raw = ce.from_kafka_binary(kafka_headers(ce_subject=b"a%20b"), None)
    assert raw["customer"] == "a%20b"


def test_kafka_bytes_header_names_and_empty_value():
    headers = [(name.encode(), value) for name, value in kafka_headers()]
    assert ce.from_kafka_binary(headers, None) == ce.from_kafka_binary(kafka_headers(), None)
    raw = ce.from_kafka_binary(kafka_headers(**{"content-type": None}), None)
    assert raw["properties"] == {}


@pytest.mark.parametrize("headers, data, param", [
    (kafka_headers(ce_specversion=...), None, "specversion"),
    (kafka_headers(ce_specversion=b"1.1"), None, "specversion"),
    (kafka_headers(ce_id=...), None, "id"),
    (kafka_headers(ce_id=None), None, "id"),
    (kafka_headers(ce_source=b"/a b"), None, "source"),
    (kafka_headers(ce_type=b""), None, "type"),
    (kafka_headers(ce_subject=...), None, "subject"),
    (kafka_headers(ce_subject=b"\xff\xfe"), None, "subject"),
    (kafka_headers(**{"content-type": b"application/avro"}), None, "datacontenttype"),
    (kafka_headers(ce_data_base64=b"eyJ9"), None, "data_base64"),
    (kafka_headers(), 5, "data"),
    ([*kafka_headers(), ("ce_subject", b"other")], None, "subject"),
])
def test_kafka_binary_errors(headers, data, param):
    assert raises(ce.from_kafka_binary, headers, data).param == param


def test_all_modes_agree():
    data = {"quantity": Decimal("0.1"), "region": "eu"}
    structured_raw = ce.from_structured(structured(time=..., data=data))
    http_raw = ce.from_http_binary(http_headers(), data)
    kafka_raw = ce.from_kafka_binary(kafka_headers(), data)
    assert structured_raw == http_raw == kafka_raw
    assert structured_raw["quantity"] == Decimal("0.1")


# ---------------------------------------------------------------- the key of a binary event


def test_composed_key_of_binary_headers():
    assert ce.http_binary_key(http_headers()) == "/billing/api-gateway evt-1"
    assert ce.http_binary_key(http_headers(ce_subject=..., ce_id="a%20b")) == (
        "/billing/api-gateway a b")
    assert ce.http_binary_key({"CE-Source": "//acme", "Ce-Id": "i1"}) == "//acme i1"
    assert ce.kafka_binary_key(kafka_headers()) == "/billing/api-gateway evt-1"
    assert ce.kafka_binary_key([(b"ce_source", b"//acme"), (b"ce_id", b"i1")]) == "//acme i1"


@pytest.mark.parametrize("headers", [
    http_headers(ce_id=...), http_headers(ce_source=...), http_headers(ce_id=""),
    http_headers(ce_source="/a%20b"), http_headers(ce_id="%FF"), http_headers(ce_id="caf\u00e9"),
    http_headers(ce_id="i" * 300),
    RepeatingHeaders([*http_headers().items(), ("CE-ID", "evt-2")]),
])
def test_http_binary_key_is_none_without_a_valid_source_and_id(headers):
    assert ce.http_binary_key(headers) is None


@pytest.mark.parametrize("headers", [
    kafka_headers(ce_id=...), kafka_headers(ce_id=None), kafka_headers(ce_source=b"/a b"),
    kafka_headers(ce_id=b"\xff"), [*kafka_headers(), ("ce_source", b"/other")],
])
def test_kafka_binary_key_is_none_without_a_valid_source_and_id(headers):
    assert ce.kafka_binary_key(headers) is None
