"""Ingestion domain: validation, normalization, payload hashing and outcomes (no I/O)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from billstream_ingestion import domain
from billstream_ingestion.domain import Outcome, UsageEvent
from billstream_ingestion.repository import KnownCustomer
from billstream_ingestion.service import default_timestamp


def parse(raw, max_properties_bytes=8192):
    return domain.parse_event(0, raw, max_properties_bytes=max_properties_bytes)


def body(text: str):
    return json.loads(text, parse_float=Decimal, parse_constant=Decimal)


def event(**over):
    raw = {"idempotency_key": "k1", "customer": "acme-1", "meter": "api_calls"}
    raw.update(over)
    return raw


# ---------------------------------------------------------------- split_body


def test_single_event_and_batch_bodies():
    assert domain.split_body({"idempotency_key": "a"}, 1000) == [{"idempotency_key": "a"}]
    assert domain.split_body({"events": [1, 2]}, 1000) == [1, 2]


@pytest.mark.parametrize("raw, code, status", [
    ([], "parameter_invalid", 400),
    ("x", "parameter_invalid", 400),
    ({"events": {}}, "parameter_invalid", 400),
    ({"events": []}, "parameter_invalid", 400),
    ({"events": [], "more": 1}, "parameter_unknown", 400),
    ({"events": [{}] * 1001}, "batch_too_large", 413),
])
def test_unusable_bodies(raw, code, status):
    with pytest.raises(domain.BodyError) as exc:
        domain.split_body(raw, 1000)
    assert (exc.value.code, exc.value.status) == (code, status)


# ---------------------------------------------------------------- one event


def test_defaults_and_normalization():
    ev = parse(event())
    assert isinstance(ev, UsageEvent)
    assert ev.quantity == Decimal(1) and ev.timestamp is None and ev.properties == {}
    ev = parse(body('{"idempotency_key": "k", "customer": "c", "meter": "m", '
                    '"quantity": 1.50, "timestamp": "2026-01-05T10:00:00+01:00", '
                    '"properties": {"region": "eu", "tokens": 2.50, "n": 3, "big": 1e2}}'))
    assert ev.quantity == Decimal("1.5")
    assert ev.timestamp == datetime(2026, 1, 5, 9, tzinfo=UTC)
    assert ev.properties == {"region": "eu", "tokens": "2.5", "n": 3, "big": "100"}


@pytest.mark.parametrize("value, expected", [
    ("1500", "1500"), ("3.50", "3.5"), (1500, "1500"), (Decimal("1E+3"), "1000"),
    ("0.000", "0"), ("0", "0"), ("1e-3", "0.001"), (Decimal("12345678901234567890.1234567890"),
                                                    "12345678901234567890.123456789"),
    ("123456789012345678901234567890.12345678901234567890",
     "123456789012345678901234567890.1234567890123456789"),
])
def test_quantity_normalized_exactly(value, expected):
    assert domain.format_decimal(domain.parse_quantity(value)) == expected


@pytest.mark.parametrize("value", [
    1.5, True, "abc", "1,5", "NaN", "Infinity", Decimal("NaN"), Decimal("-Infinity"), "-1", -2,
    [], {}, "1" * 31, "0." + "1" * 21, " 1",
])
def test_bad_quantities(value):
    with pytest.raises(domain.EventError) as exc:
        domain.parse_quantity(value)
    assert exc.value.param == "quantity"


@pytest.mark.parametrize("raw, param", [
    ({"customer": "c", "meter": "m"}, "idempotency_key"),
    (event(idempotency_key=""), "idempotency_key"),
    (event(idempotency_key="x" * 256), "idempotency_key"),
    (event(idempotency_key=5), "idempotency_key"),
    (event(customer=None), "customer"),
    (event(customer=7), "customer"),
    (event(meter=""), "meter"),
    (event(quantity="lots"), "quantity"),
    (event(timestamp="yesterday"), "timestamp"),
    (event(timestamp="2026-01-01T00:00:00"), "timestamp"),  # no offset
    (event(timestamp="2026-01-01"), "timestamp"),
    (event(timestamp=1767225600), "timestamp"),
    (event(timestamp="2026-02-30T00:00:00Z"), "timestamp"),
    (event(properties=[1]), "properties"),
    (event(properties={"x": Decimal("NaN")}), "properties.x"),
    (event(quantitty=2), "quantitty"),
])
def test_invalid_events_name_the_field(raw, param):
    out = parse(raw)
    assert isinstance(out, Outcome) and out.status == "rejected"
    assert out.code == "invalid_event" and out.param == param, out
    assert out.idempotency_key == (raw.get("idempotency_key")
                                   if isinstance(raw.get("idempotency_key"), str) else None)


def test_not_an_object():
    out = parse(["a"])
    assert out.code == "invalid_event" and out.idempotency_key is None


def test_properties_size_cap():
    out = parse(event(properties={"blob": "x" * 9000}))
    assert out.code == "properties_too_large" and out.param == "properties"
    assert isinstance(parse(event(properties={"blob": "x" * 100}), max_properties_bytes=200),
                      UsageEvent)


def test_huge_exponent_in_properties_stays_compact():
    ev = parse(body('{"idempotency_key": "k", "customer": "c", "meter": "m", '
                    '"properties": {"x": 1e999999999}}'))
    assert ev.properties == {"x": "1E+999999999"}


# ---------------------------------------------------------------- payload hash


def test_payload_hash_is_canonical():
    a = parse(body('{"idempotency_key": "k", "customer": "c", "meter": "m", "quantity": "2.0",'
                   ' "timestamp": "2026-01-01T01:00:00+01:00", "properties": {"a": 1, "b": {"y": 1, "x": 2}}}'))
    b = parse(body('{"meter": "m", "customer": "c", "idempotency_key": "other", "quantity": 2,'
                   ' "timestamp": "2026-01-01T00:00:00Z", "properties": {"b": {"x": 2, "y": 1}, "a": 1}}'))
    assert a.payload_hash == b.payload_hash  # the key itself is not part of the payload
    for change in ({"quantity": 3}, {"customer": "d"}, {"meter": "n"},
                   {"timestamp": "2026-01-01T00:00:01Z"}, {"properties": {"a": 2}}):
        other = parse(event(**{"quantity": 2, "timestamp": "2026-01-01T00:00:00Z",
                               "properties": {"a": 1, "b": {"x": 2, "y": 1}},
                               "customer": "c", "meter": "m", **change}))
        assert other.payload_hash != a.payload_hash, change


def test_payload_hashes_stay_what_they_were_when_their_keys_were_stored():
    """Pinned values. A stored key's hash is compared with every resend for the whole dedup
    window: a change to how the hash is made (a faster serializer, another digest, keys in
    another order) would turn the resends of events accepted before an upgrade into
    conflicts. The hash is SHA-256 of the sorted compact JSON of customer, meter, properties
    (nested keys sorted too), quantity (normalized text) and timestamp (UTC, "Z"; null when
    sent without one)."""
    import hashlib

    canonical = (b'{"customer":"c","meter":"m","properties":{"a":1,"b":{"x":2,"y":1}},'
                 b'"quantity":"2","timestamp":"2026-01-01T00:00:00Z"}')
    expected = "7158b72576ca229922b2b6e6ace50c2f9e1eeb8b77655a60f736d34c7f763cd7"
    assert hashlib.sha256(canonical).hexdigest() == expected
    assert parse(body('{"idempotency_key": "k", "customer": "c", "meter": "m", "quantity": '
                      '"2.0", "timestamp": "2026-01-01T01:00:00+01:00", "properties": '
                      '{"a": 1, "b": {"y": 1, "x": 2}}}')).payload_hash == expected
    assert parse(event(customer="acme-1")).payload_hash == hashlib.sha256(
        b'{"customer":"acme-1","meter":"api_calls","properties":{},"quantity":"1",'
        b'"timestamp":null}').hexdigest()
    assert parse(body('{"idempotency_key": "k", "customer": "cus_01J9", "meter": "gb", '
                      '"quantity": 0.125, "timestamp": "2026-11-22T10:00:00.123456Z", '
                      '"properties": {"r\u00e9gion": "eu", "n": 12.50, '
                      '"big": 99999999999999999999}}')).payload_hash == (
        "004eac6322e548eca564e5ce3752a248bd57adab0f1be810c34818f589ebecc6")


def test_missing_timestamp_is_part_of_the_payload():
    assert parse(event()).payload_hash == parse(event(quantity=1)).payload_hash
    assert parse(event()).payload_hash != parse(
        event(timestamp="2026-01-01T00:00:00Z")).payload_hash


# ---------------------------------------------------------------- outcomes


def _ev(index, key, quantity=1):
    return domain.parse_event(index, event(idempotency_key=key, quantity=quantity),
                              max_properties_bytes=8192)


def test_first_occurrence_wins_within_a_batch():
    evs = [_ev(0, "a"), _ev(1, "b"), _ev(2, "a"), _ev(3, "a", quantity=5)]
    assert [e.index for e in domain.first_per_key(evs)] == [0, 1]
    claimed = {"a": (evs[0].payload_hash, "use_a", True), "b": (evs[1].payload_hash, "use_b", True)}
    out = domain.resolve_outcomes(evs, claimed)
    assert [(o.index, o.status, o.usage_id, o.code) for o in out] == [
        (0, "accepted", "use_a", None),
        (1, "accepted", "use_b", None),
        (2, "duplicate", "use_a", None),
        (3, "rejected", None, "idempotency_key_conflict"),
    ]


def test_keys_seen_before_are_duplicates_or_conflicts():
    evs = [_ev(0, "a"), _ev(1, "b", quantity=2)]
    stored_b = _ev(9, "b", quantity=3).payload_hash
    claimed = {"a": (evs[0].payload_hash, "use_old", False), "b": (stored_b, "use_b", False)}
    out = domain.resolve_outcomes(evs, claimed)
    assert [(o.status, o.usage_id, o.code) for o in out] == [
        ("duplicate", "use_old", None), ("rejected", None, "idempotency_key_conflict")]


def test_summary_counts_and_orders():
    result = domain.summarize([
        Outcome(2, "c", "rejected", code="unknown_meter", message="m"),
        Outcome(0, "a", "accepted", usage_id="use_1"),
        Outcome(1, "a", "duplicate", usage_id="use_1"),
    ])
    assert result == {
        "object": "usage_ingest_result", "accepted": 1, "duplicates": 1, "rejected": 1,
        "results": [
            {"index": 0, "idempotency_key": "a", "status": "accepted", "usage_id": "use_1"},
            {"index": 1, "idempotency_key": "a", "status": "duplicate", "usage_id": "use_1"},
            {"index": 2, "idempotency_key": "c", "status": "rejected", "code": "unknown_meter",
             "message": "m"},
        ],
    }


def test_default_timestamp_follows_the_test_clock():
    now = datetime(2026, 5, 1, tzinfo=UTC)
    frozen = datetime(2026, 1, 15, tzinfo=UTC)
    assert default_timestamp(None, now) == now
    assert default_timestamp(KnownCustomer("cus_1", "acme", None), now) == now
    assert default_timestamp(KnownCustomer("cus_1", "acme", frozen), now) == frozen


def test_the_hot_path_usage_batch_matches_the_contract():
    """service._usage_json / _batch_event build the UsageBatchAccepted JSON without the models:
    it must be what the models would publish, field for field."""
    import orjson

    from billstream_contracts.events import UsageBatchAccepted
    from billstream_ingestion.service import Scope, _batch_event, _usage_json

    parsed = parse(event(quantity="2.50", timestamp="2026-01-05T10:00:00.25+02:00",
                         properties={"region": "eu", "n": Decimal("1.10")}))
    other = parse(event(idempotency_key="k2", customer="nobody-yet"))
    now = datetime(2026, 1, 6, tzinfo=UTC)
    usages = [_usage_json(parsed, "use_1", KnownCustomer("cus_1", "acme-1", None),
                          parsed.timestamp),
              _usage_json(other, "use_2", None, now)]
    new = _batch_event(Scope("ten_1", "test"), "evt_1", usages)
    wire = orjson.loads(orjson.dumps(new.data))
    model = UsageBatchAccepted.model_validate(wire)
    assert model.model_dump(mode="json") == {"usages": [
        {**wire["usages"][0], "timestamp": "2026-01-05T08:00:00.250000Z"},
        {**wire["usages"][1], "timestamp": "2026-01-06T00:00:00Z"}]}
    first, second = wire["usages"]
    assert first["timestamp"] == "2026-01-05T08:00:00.250000Z"
    assert (first["usage_id"], first["customer_id"], first["idempotency_key"]) == (
        "use_1", "cus_1", parsed.idempotency_key)
    assert (second["customer"], second["customer_id"]) == ("nobody-yet", None)
    assert (new.type, new.version, new.id) == (UsageBatchAccepted.event_type,
                                               UsageBatchAccepted.version, "evt_1")
    assert (new.aggregate_type, new.aggregate_id) == ("usage_batch", "evt_1")
    assert first["quantity"] == "2.5" and first["properties"] == {"region": "eu", "n": "1.1"}


def test_usage_batches_are_split_by_size():
    from billstream_ingestion.service import _chunks

    items = [b"x" * 10] * 10  # each costs 11 bytes in the array, the array 2
    assert _chunks(items, 2 + 11 * 10) == [(0, 10)]
    assert _chunks(items, 2 + 11 * 10 - 1) == [(0, 9), (9, 10)]
    assert _chunks(items, 2 + 11 * 3) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    # an item larger than the limit still goes, alone
    assert _chunks([b"y" * 100, b"x", b"y" * 100], 50) == [(0, 1), (1, 2), (2, 3)]
    assert _chunks([b"x"], 50) == [(0, 1)]
