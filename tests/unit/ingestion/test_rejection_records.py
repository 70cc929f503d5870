"""Reports on `billstream.usage.rejected` always fit in a Kafka record: the input record's key,
value and headers are echoed up to a cap, and what is left out is said. A report too large
to produce would hold its whole poll back forever (nothing after it could be committed)."""

from __future__ import annotations

import orjson

from billstream_ingestion import raw_records
from billstream_ingestion.domain import rejected

CAP = 64 * 1024


def _report(key: bytes | None, value: bytes | None) -> dict:
    outcome = rejected(0, None, "event_too_large", "too large")
    return orjson.loads(raw_records.rejection(
        outcome=outcome, topic="billstream.usage.raw", partition=4, offset=1, key=key,
        value=value, tenant_id=None, environment=None, max_echo_bytes=CAP))


def test_a_value_over_the_cap_is_left_out_and_its_size_given() -> None:
    # 800,000 bytes that are not UTF-8 would be 1.07 MB of base64: over the broker's limit
    report = _report(b"acme-1", b"\xff" * 800_000)
    assert report["record"] == {"key": "acme-1", "value": None, "value_omitted": True,
                                "value_bytes": 800_000}
    assert report["source"] == {"topic": "billstream.usage.raw", "partition": 4, "offset": 1}
    assert len(raw_records.rejection(
        outcome=rejected(0, None, "x", "y"), topic="t", partition=0, offset=0, key=None,
        value=b'"' * 900_000, tenant_id=None, environment=None, max_echo_bytes=CAP)) < 2048


def test_values_and_keys_up_to_the_cap_are_echoed() -> None:
    text = b"x" * CAP
    report = _report(text, text)
    assert report["record"] == {"key": text.decode(), "value": text.decode()}
    binary = _report(None, b"\xff" * CAP)["record"]
    assert binary["value"] is None and len(binary["value_base64"]) > CAP
    assert "value_omitted" not in binary and binary["key"] is None


def test_a_key_over_the_cap_is_left_out_too() -> None:
    record = _report(b"k" * (CAP + 1), b"{}")["record"]
    assert record == {"key": None, "key_omitted": True, "key_bytes": CAP + 1, "value": "{}"}


def test_headers_are_forwarded_up_to_a_size_and_the_rest_counted() -> None:
    headers = [(raw_records.API_KEY_HEADER, b"sk_test_secret"), ("trace", b"t-1"),
               ("big", b"b" * 40_000), ("bigger", b"c" * 40_000), ("small", b"s"),
               ("nothing", None)]
    out = raw_records.forwarded_headers(headers, "rejected")
    assert out == [("trace", b"t-1"), ("big", b"b" * 40_000),
                   (raw_records.HEADERS_OMITTED_HEADER, b"3"),
                   (raw_records.OUTCOME_HEADER, b"rejected")]
    assert raw_records.forwarded_headers(headers[:2] + headers[-1:], "duplicate") == [
        ("trace", b"t-1"), ("nothing", b""), (raw_records.OUTCOME_HEADER, b"duplicate")]


def _sized(report: raw_records.Report) -> int:
    """The record's size as aiokafka's producer measures it against max_request_size."""
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    return DefaultRecordBatchBuilder.estimate_size_in_bytes(report.key, report.value,
                                                            report.headers)


def _full_report(key, value, headers, outcome=None, cap=CAP) -> raw_records.Report:
    return raw_records.report(
        outcome=outcome or rejected(0, "k", "invalid_json", "bad"), topic="t", partition=0,
        offset=7, key=key, value=value, headers=headers, tenant_id=None, environment=None,
        max_echo_bytes=cap)


def test_every_report_fits_its_budget_whatever_the_escaping() -> None:
    # control bytes are UTF-8: each echoes as \u0001, six bytes; a name that is not UTF-8
    # prints as \xNN, four bytes per byte
    key = value = b"\x01" * CAP
    name = (b"\xff" * 60_000).decode("utf-8", "surrogateescape")
    report = _full_report(key, value, [(name, b"v")])
    assert report.size() <= raw_records.REPORT_BUDGET_BYTES
    assert _sized(report) < 1024 * 1024
    body = orjson.loads(report.value)
    assert body["record"]["value_omitted"] and body["record"]["value_bytes"] == CAP
    assert body["source"]["offset"] == 7


def test_empty_headers_count_too() -> None:
    report = _full_report(b"k", b"{}", [("", None)] * 120_000)
    assert report.size() <= raw_records.REPORT_BUDGET_BYTES
    omitted = dict(report.headers)[raw_records.HEADERS_OMITTED_HEADER]
    assert 0 < int(omitted) < 120_000
    assert len(report.headers) == 120_000 - int(omitted) + 2


def test_what_is_left_out_goes_in_order_and_a_large_input_key_is_not_the_reports_key() -> None:
    fits = _full_report(b"acme-1", b"{}", [("trace", b"t")])
    assert (fits.key, orjson.loads(fits.value)["record"]) == (b"acme-1",
                                                               {"key": "acme-1", "value": "{}"})
    assert ("trace", b"t") in fits.headers
    big_key = _full_report(b"k" * (CAP + 1), b"{}", [])
    assert big_key.key is None
    # an operator's cap so large that the outcome's own text would not fit
    huge = rejected(0, "k" * 600_000, "invalid_event", "m" * 600_000, "p" * 600_000)
    report = _full_report(b"x" * 300_000, b"y" * 300_000, [("trace", b"t")], huge,
                          cap=1 << 20)
    assert report.size() <= raw_records.REPORT_BUDGET_BYTES and report.key is None
    body = orjson.loads(report.value)
    assert body["record"] == {"key": None, "key_omitted": True, "key_bytes": 300_000,
                              "value": None, "value_omitted": True, "value_bytes": 300_000}
    assert len(body["message"]) == 1025 and body["message"].endswith("…")
    assert dict(report.headers)[raw_records.HEADERS_OMITTED_HEADER] == b"1"
