"""How a Kafka input record is read (raw_records.decode): what a CloudEvent that cannot be
mapped is reported as, and an API key header that is not text."""

from __future__ import annotations

import msgspec
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from billstream_ingestion import raw_records

AUTH = (raw_records.API_KEY_HEADER, b"sk_test_x")
CAP = 64 * 1024


def _binary(id_: bytes, *extra: tuple[str, bytes]) -> list[tuple[str, bytes]]:
    return [AUTH, ("ce_specversion", b"1.0"), ("ce_id", id_), ("ce_source", b"//s"),
            ("ce_type", b"api_calls"), ("ce_subject", b"acme-1"), *extra]


def test_a_structured_event_that_cannot_be_mapped_is_reported_with_its_composed_key():
    value = orjson.dumps({"specversion": "1.0", "id": "x1", "source": "//s",
                          "type": "api_calls", "subject": "acme-1", "data": [1]})
    decoded = raw_records.decode(value, [AUTH], CAP)
    assert (decoded.error.code, decoded.error.param) == ("invalid_event", "data")
    assert decoded.idempotency_key == "//s x1" and decoded.cloudevent
    no_source = orjson.dumps({"specversion": "1.0", "id": "x1", "type": "api_calls"})
    assert raw_records.decode(no_source, [AUTH], CAP).idempotency_key is None


def test_a_binary_event_that_cannot_be_mapped_is_reported_with_its_composed_key():
    decoded = raw_records.decode(b"[1, 2]", _binary(b"x2"), CAP)
    assert (decoded.error.param, decoded.idempotency_key) == ("data", "//s x2")


def test_binary_data_that_is_not_json_is_refused_for_its_content_type_not_as_bad_json():
    for value in (b"hello", b""):
        decoded = raw_records.decode(value, _binary(b"x3", ("content-type", b"text/plain")),
                                     CAP)
        assert (decoded.error.code, decoded.error.param) == ("invalid_event",
                                                             "datacontenttype")
        assert decoded.idempotency_key == "//s x3"
    unreadable = raw_records.decode(b"hello", _binary(b"x4", ("content-type", b"\xff")), CAP)
    assert unreadable.error.param == "datacontenttype"
    # a JSON content type (parameters allowed) reads the value as JSON
    ok = raw_records.decode(b'{"quantity": 2}', _binary(
        b"x5", ("Content-Type", b"application/json; charset=utf-8")), CAP)
    assert ok.error is None and ok.raw["quantity"] == 2
    bad_json = raw_records.decode(b"hello", _binary(b"x6", ("content-type",
                                                            b"application/json")), CAP)
    assert bad_json.error.code == "invalid_json"


def test_a_binary_event_whose_value_cannot_be_read_is_reported_with_its_composed_key():
    """Its key is in its headers: the report names it whatever the value holds."""
    for value, code in ((b'{"quantity":', "invalid_json"), (b"\xff", "invalid_json"),
                        (b"1" * (CAP + 1), "event_too_large")):
        decoded = raw_records.decode(value, _binary(b"x7"), CAP)
        assert (decoded.error.code, decoded.idempotency_key) == (code, "//s x7")
        assert decoded.cloudevent
    native = raw_records.decode(b'{"quantity":', [AUTH], CAP)  # no key to give
    assert (native.error.code, native.idempotency_key) == ("invalid_json", None)


def test_an_api_key_header_that_is_not_utf8_is_said_to_be_so():
    decoded = raw_records.decode(b"{}", [(raw_records.API_KEY_HEADER, b"\xff")], CAP)
    assert (decoded.error.code, decoded.error.param) == ("invalid_api_key",
                                                         raw_records.API_KEY_HEADER)
    assert "not UTF-8" in decoded.error.message


def test_a_null_content_type_header_is_no_content_type():
    decoded = raw_records.decode(b'{"quantity": 5}', _binary(b"x7", ("content-type", None)),
                                 CAP)
    assert decoded.error is None and decoded.raw["quantity"] == 5


def test_a_binary_event_without_ce_specversion_is_told_so():
    """Without `ce_specversion` a record is read as a native event; one that carries other
    CloudEvents headers and no idempotency_key was meant as a binary CloudEvent, and the
    report says what is missing instead of `idempotency_key is required`."""
    attributes = [h for h in _binary(b"x8") if h[0] != "ce_specversion"]
    for headers in (attributes, [AUTH, ("CE_ID", b"x8"), ("CE_SOURCE", b"//s")],
                    [AUTH, ("ce-id", b"x8")]):
        decoded = raw_records.decode(b'{"quantity": 2}', headers, CAP)
        assert (decoded.error.code, decoded.error.param) == ("invalid_event", "ce_specversion")
        assert "ce_specversion" in decoded.error.message
    # reported with its composed key, as any binary CloudEvent refused
    assert raw_records.decode(b"{}", attributes, CAP).idempotency_key == "//s x8"
    # it has a ce_specversion (structured mode by its content type; upper case): not told
    # it has none
    for headers in (_binary(b"x9", ("content-type", b"application/cloudevents+json")),
                    [AUTH, ("CE_SPECVERSION", b"1.0"), ("CE_ID", b"x9")]):
        assert raw_records.decode(b'{"quantity": 2}', headers, CAP).error is None
    # a native event that happens to carry such headers is still a native event
    native = orjson.dumps({"idempotency_key": "k", "customer": "c", "meter": "m"})
    assert raw_records.decode(native, attributes, CAP).error is None
    assert raw_records.decode(b'{"quantity": 2}', [AUTH], CAP).error is None  # (prepare's)


def _seen(d: raw_records.Decoded) -> tuple:
    error = d.error and (d.error.code, d.error.message, d.error.param)
    return (d.api_key, d.raw, error, d.idempotency_key, d.cloudevent)


_leaves = (st.none() | st.booleans() | st.integers() | st.text(max_size=8)
           | st.decimals(allow_nan=False, allow_infinity=False))
_json = st.recursive(_leaves, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)
#: objects with the names the readings look at: native events, CloudEvents, neither
_names = st.sampled_from(["idempotency_key", "customer", "meter", "quantity", "timestamp",
                          "properties", "specversion", "id", "source", "type", "subject",
                          "data", "x"])
_objects = st.dictionaries(_names, _json, max_size=7)


_value = msgspec.json.Encoder(decimal_format="number").encode  # big ints, exact decimals


@settings(max_examples=300, deadline=None)
@given(st.one_of(_objects.map(_value), _json.map(_value), st.binary(max_size=40),
                 st.sampled_from([b"[" * 2000, b"1e999999999999999999", b"NaN", b'{"a":1}x',
                                  b'{"idempotency_key":"k","q":1.5e3}'])),
       st.sampled_from([AUTH, (raw_records.API_KEY_HEADER.upper(), b"sk_test_x"),
                        (raw_records.API_KEY_HEADER, b"sk_test_other"), ("trace", b"sk_test_x"),
                        (raw_records.API_KEY_HEADER, None), ("ce_specversion", b"1.0")]),
       st.sampled_from([CAP, 8]))
def test_the_usual_record_is_read_as_the_general_reading_reads_it(value, header, cap):
    """decode's fast path (one header, an API key seen before, a native event) decides what
    the general reading (`read`) decides, for any value and a lone header of any kind."""
    raw_records.decode(b"{}", [AUTH], CAP)  # the key is one seen before
    assert _seen(raw_records.decode(value, (header,), cap)) == _seen(
        raw_records.read(value, (header,), cap))


def test_the_fast_path_is_taken_for_the_usual_record(monkeypatch):
    """(The test above would pass with no fast path at all: this one shows it is there.)"""
    raw_records.decode(b"{}", (AUTH,), CAP)  # the key, seen
    monkeypatch.setattr(raw_records, "read", None)
    decoded = raw_records.decode(b'{"idempotency_key": "k", "meter": "m"}', (AUTH,), CAP)
    assert decoded.raw == {"idempotency_key": "k", "meter": "m"} and decoded.api_key == "sk_test_x"
