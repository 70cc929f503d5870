"""Property-based tests of the native usage event schema (domain.parse_event, split_body,
resolve_outcomes, summarize, payload_hash).

Raw events are generated as `json.loads(body, parse_float=Decimal, parse_constant=Decimal)`
can produce them: dicts, lists, str, int (huge ones too), Decimal (NaN/Infinity included),
bool, None. Floats never come out of that parser; they are fed in anyway where the domain
promises to refuse them.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
import orjson
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from billstream_ingestion import domain
from billstream_ingestion.domain import Outcome, UsageEvent
from billstream_runtime.money import format_decimal

CAP = 8192
BASE = {"idempotency_key": "k", "customer": "c", "meter": "m"}
BIG_CAP = 1 << 20
INT64 = (-(2**63), 2**63 - 1)

props = settings(max_examples=200, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def parse(raw: Any, cap: int = CAP, index: int = 0) -> UsageEvent | Outcome:
    return domain.parse_event(index, raw, max_properties_bytes=cap)


# ---------------------------------------------------------------- strategies

# unicode without lone surrogates or NUL (see test_lone_surrogates_are_rejected and
# test_nul_characters_are_rejected below)
_chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
texts = st.text(_chars, max_size=12)
keys = st.text(_chars, min_size=1, max_size=domain.MAX_KEY_LENGTH)
refs = st.text(_chars, min_size=1, max_size=domain.MAX_REF_LENGTH)

huge_ints = st.integers(min_value=-(10**400), max_value=10**400)
json_ints = st.one_of(st.integers(min_value=INT64[0], max_value=INT64[1]), huge_ints)
# what parse_float/parse_constant hand over: any Decimal, huge exponents included
json_decimals = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True),
    st.builds(lambda m, e: Decimal(f"{m}e{e}"),
              st.integers(min_value=-(10**25), max_value=10**25),
              st.integers(min_value=-(10**9), max_value=10**9)),
    st.sampled_from([Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity"),
                     Decimal("-0"), Decimal("0.000"), Decimal("1e999999999")]),
)
json_leaves = st.one_of(st.none(), st.booleans(), json_ints, json_decimals, texts)
json_values = st.recursive(
    json_leaves,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(texts, children, max_size=4)),
    max_leaves=12,
)
anything = st.one_of(json_values, st.floats())


@st.composite
def quantities(draw) -> Decimal:
    """A valid quantity: finite, non-negative, at most 30 integer and 20 fraction digits
    (trailing zeros do not count); small ones likely."""
    whole = draw(st.one_of(st.integers(0, 1000), st.integers(0, 10**30 - 1)))
    places = draw(st.integers(0, 20))
    frac = draw(st.integers(0, 10**places - 1)) if places else 0
    if not places:
        return Decimal(whole)
    trailing_zeros = "0" * draw(st.integers(0, 3))  # not counted as fraction digits
    return Decimal(f"{whole}.{frac:0{places}d}{trailing_zeros}")


def spellings(d: Decimal) -> list[Any]:
    """Equal quantities, written every way a client may send them."""
    plain = f"{d:f}"
    out: list[Any] = [d, str(d), plain, f"{d:e}", Decimal(plain + ("0" if "." in plain
                                                                      else ".0")),
                      json.loads(str(d), parse_float=Decimal)]
    if d == d.to_integral_value():
        out.append(int(d))
    return out


@st.composite
def timestamps(draw) -> tuple[str, datetime]:
    """(an RFC 3339 text with an offset, the instant it names in UTC)."""
    local = draw(st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31)))
    places = draw(st.integers(0, 6))
    micro = local.microsecond - local.microsecond % 10 ** (6 - places)
    local = local.replace(microsecond=micro)
    offset = draw(st.integers(-(23 * 60 + 59), 23 * 60 + 59))
    sep = draw(st.sampled_from(["T", "t", " "]))
    text = (f"{local.year:04d}-{local.month:02d}-{local.day:02d}{sep}"
            f"{local.hour:02d}:{local.minute:02d}:{local.second:02d}")
    if places:
        text += "." + f"{micro:06d}"[:places]
    if offset == 0 and draw(st.booleans()):
        text += draw(st.sampled_from(["Z", "z"]))
    else:
        sign = "-" if offset < 0 or (offset == 0 and draw(st.booleans())) else "+"
        text += f"{sign}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"
    zone = timezone(timedelta(minutes=offset))
    return text, local.replace(tzinfo=zone).astimezone(UTC)


# property values as the JSON parser produces them, finite numbers only
finite_decimals = st.decimals(allow_nan=False, allow_infinity=False)
prop_leaves = st.one_of(st.none(), st.booleans(), json_ints, finite_decimals, texts)
prop_values = st.recursive(
    prop_leaves,
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(texts, children, max_size=3)),
    max_leaves=8,
)
properties = st.dictionaries(texts, prop_values, max_size=5)


@st.composite
def events(draw) -> tuple[dict[str, Any], dict[str, Any]]:
    """(a well-formed raw event, what it must parse to)."""
    quantity = draw(st.one_of(st.none(), quantities()))
    timestamp = draw(st.one_of(st.none(), timestamps()))
    raw: dict[str, Any] = {"idempotency_key": draw(keys), "customer": draw(refs),
                           "meter": draw(refs)}
    if quantity is not None:
        raw["quantity"] = draw(st.sampled_from(spellings(quantity)))
    elif draw(st.booleans()):
        raw["quantity"] = None
    if timestamp is not None:
        raw["timestamp"] = timestamp[0]
    props = draw(st.one_of(st.none(), properties))
    if props is not None or draw(st.booleans()):
        raw["properties"] = props
    expected = {"quantity": Decimal(1) if quantity is None else quantity,
                "timestamp": None if timestamp is None else timestamp[1],
                "properties": props or {}}
    return raw, expected


# an event whose every field may be anything, though mostly almost right
def _mostly(valid, other=anything):
    return st.integers(0, 3).flatmap(lambda i: other if i == 0 else valid)


field_values = {
    "idempotency_key": _mostly(keys),
    "customer": _mostly(refs),
    "meter": _mostly(refs),
    "quantity": _mostly(st.one_of(quantities(), st.builds(str, quantities()))),
    "timestamp": _mostly(timestamps().map(lambda t: t[0])),
    "properties": _mostly(properties),
}
_required = ("idempotency_key", "customer", "meter")
event_shaped = st.builds(
    lambda extra, fields: {**extra, **fields},
    st.integers(0, 3).flatmap(
        lambda i: st.dictionaries(texts, anything, max_size=2) if i == 0 else st.just({})),
    st.one_of(
        st.fixed_dictionaries({k: v for k, v in field_values.items() if k in _required},
                              optional={k: v for k, v in field_values.items()
                                        if k not in _required}),
        st.fixed_dictionaries({}, optional=field_values),
    ),
)


def assert_json_safe_equal(got: Any, sent: Any) -> None:
    """`got` is what json_safe must make of `sent` (a reference independent of its code)."""
    if isinstance(sent, dict):
        assert isinstance(got, dict) and list(got) == list(sent)
        for k in sent:
            assert_json_safe_equal(got[k], sent[k])
    elif isinstance(sent, list):
        assert isinstance(got, list) and len(got) == len(sent)
        for g, s in zip(got, sent, strict=True):
            assert_json_safe_equal(g, s)
    elif isinstance(sent, Decimal):
        # kept exactly, as a string (never a float)
        assert isinstance(got, str) and Decimal(got) == sent, (got, sent)
    else:
        expected = sent
        if type(sent) is int and not INT64[0] <= sent <= INT64[1]:
            expected = str(sent)  # integers beyond 64 bits travel as strings
        assert type(got) is type(expected) and got == expected, (got, sent)


def no_floats_or_decimals(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and no_floats_or_decimals(v) for k, v in value.items())
    if isinstance(value, list):
        return all(no_floats_or_decimals(v) for v in value)
    return not isinstance(value, float | Decimal)


# ---------------------------------------------------------------- never raises


CODES = {"invalid_event", "properties_too_large"}


def check_total(raw: Any, cap: int = CAP) -> UsageEvent | Outcome:
    out = parse(raw, cap)
    if isinstance(out, Outcome):
        assert out.status == "rejected" and out.code in CODES and out.message
        sent_key = raw.get("idempotency_key") if isinstance(raw, dict) else None
        assert out.idempotency_key == (sent_key if isinstance(sent_key, str) else None)
    else:
        assert isinstance(out, UsageEvent)
        assert isinstance(out.quantity, Decimal) and out.quantity.is_finite()
        assert out.quantity >= 0
        assert out.timestamp is None or out.timestamp.utcoffset() == timedelta(0)
        assert no_floats_or_decimals(out.properties)
        assert len(domain.canonical_json(out.properties)) <= cap
        assert len(out.payload_hash) == 64
    return out


@props
@given(anything)
def test_any_json_value_is_an_event_or_a_rejection(raw):
    check_total(raw)


@props
@given(event_shaped, st.sampled_from([0, 64, CAP]))
def test_any_event_shaped_object_is_an_event_or_a_rejection(raw, cap):
    check_total(raw, cap)


@props
@given(st.lists(event_shaped, min_size=1, max_size=3))
def test_any_batch_body_splits_into_its_events(raws):
    assert domain.split_body({"events": raws}, 3) == raws
    for index, raw in enumerate(raws):
        out = domain.parse_event(index, raw, max_properties_bytes=CAP)
        assert out.index == index


@props
@given(anything, st.integers(1, 5))
def test_split_body_is_total(body, max_events):
    try:
        events_ = domain.split_body(body, max_events)
    except domain.BodyError as err:
        assert err.code in {"parameter_invalid", "parameter_unknown", "batch_too_large"}
        assert err.status == (413 if err.code == "batch_too_large" else 400)
        if err.code == "batch_too_large":
            assert len(body["events"]) > max_events
    else:
        assert isinstance(body, dict)
        if "events" in body:
            assert events_ is body["events"] and 1 <= len(events_) <= max_events
        else:
            assert events_ == [body]


# ---------------------------------------------------------------- well-formed events


@props
@given(events())
def test_well_formed_events_are_parsed(generated):
    raw, expected = generated
    ev = check_total(raw, BIG_CAP)
    assert isinstance(ev, UsageEvent), ev
    assert ev.idempotency_key == raw["idempotency_key"]
    assert (ev.customer, ev.meter) == (raw["customer"], raw["meter"])
    assert type(ev.quantity) is Decimal and ev.quantity == expected["quantity"]
    assert format_decimal(ev.quantity) == format_decimal(expected["quantity"])
    assert ev.timestamp == expected["timestamp"]
    if ev.timestamp is not None:
        assert ev.timestamp.tzinfo is UTC
    assert_json_safe_equal(ev.properties, expected["properties"])


@props
@given(events(), timestamps(), st.one_of(st.none(), refs), keys)
def test_the_usage_json_is_the_bytes_orjson_writes(generated, ts, customer_id, usage_id):
    """service._usage_json writes with msgspec (a result kept costs less than orjson's: see
    its docstring); the bytes must stay those orjson writes (UTC as "Z", microseconds when
    there are any, text past ASCII as UTF-8, control characters escaped), whichever wrote
    a usage into the log."""
    from billstream_ingestion.repository import KnownCustomer
    from billstream_ingestion.service import _usage_json

    ev = parse(generated[0], BIG_CAP)
    assert isinstance(ev, UsageEvent), ev
    customer = None if customer_id is None else KnownCustomer(customer_id, None, None)
    got = _usage_json(ev, usage_id, customer, ts[1])
    assert got == orjson.dumps({
        "usage_id": usage_id, "idempotency_key": ev.idempotency_key, "customer": ev.customer,
        "customer_id": customer_id, "meter": ev.meter, "quantity": ev.quantity_text,
        "timestamp": ts[1], "properties": ev.properties}, option=orjson.OPT_UTC_Z)
    assert orjson.loads(got)["timestamp"] == domain.format_timestamp(ts[1])


@props
@given(quantities())
def test_every_spelling_of_a_quantity_parses_to_the_same_decimal(quantity):
    hashes = set()
    for spelling in spellings(quantity):
        ev = parse({**BASE, "quantity": spelling})
        assert isinstance(ev, UsageEvent), (spelling, ev)
        assert type(ev.quantity) is Decimal and ev.quantity == quantity
        assert format_decimal(ev.quantity) == format_decimal(quantity)
        hashes.add(ev.payload_hash)
    assert len(hashes) == 1


def test_equal_quantities_hash_the_same():
    hashes = {parse({**BASE, "quantity": q}).payload_hash
              for q in ("1.50", "1.5", Decimal("1.500"), Decimal("15E-1"),
                        json.loads("1.50", parse_float=Decimal))}
    assert len(hashes) == 1
    assert domain.payload_hash("c", "m", Decimal("1.500"), None, {}) == domain.payload_hash(
        "c", "m", Decimal("1.5"), None, {})


@props
@given(timestamps(), st.integers(-(23 * 60 + 59), 23 * 60 + 59))
def test_a_timestamp_is_the_same_instant_whatever_its_offset(ts, minutes):
    text, instant = ts
    zone = timezone(timedelta(minutes=minutes))
    local = instant.astimezone(zone)
    assume(datetime(2, 1, 1, tzinfo=UTC) <= local.replace(tzinfo=UTC) <= datetime(
        9998, 12, 31, tzinfo=UTC))
    other = local.isoformat()  # same instant, another offset
    a, b = parse({**BASE, "timestamp": text}), parse({**BASE, "timestamp": other})
    assert a.timestamp == b.timestamp == instant
    assert a.payload_hash == b.payload_hash


# ---------------------------------------------------------------- payload hash


def reordered(value: Any, rnd) -> Any:
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        return {k: reordered(v, rnd) for k, v in items}
    if isinstance(value, list):
        return [reordered(v, rnd) for v in value]
    return value


@props
@given(events(), st.randoms(use_true_random=False))
def test_payload_hash_ignores_the_order_of_property_keys(generated, rnd):
    raw, _expected = generated
    shuffled = {k: raw[k] for k in rnd.sample(list(raw), len(raw))}
    shuffled["properties"] = reordered(raw.get("properties"), rnd)
    a, b = parse(raw, BIG_CAP), parse(shuffled, BIG_CAP)
    assert a.payload_hash == b.payload_hash
    # the idempotency key is not part of the payload
    c = parse({**raw, "idempotency_key": raw["idempotency_key"] + "x"}, BIG_CAP)
    assert c.payload_hash == a.payload_hash


def canonical_properties(value: Any) -> bytes:
    return domain.canonical_json(domain.json_safe(value or {}, "properties"))


@props
@given(events(), st.data())
def test_payload_hash_changes_with_any_field(generated, data):
    raw, expected = generated
    field = data.draw(st.sampled_from(["customer", "meter", "quantity", "timestamp",
                                       "properties"]))
    changed = dict(raw)
    if field in ("customer", "meter"):
        changed[field] = data.draw(refs.filter(lambda v: v != raw[field]))
    elif field == "quantity":
        q = data.draw(quantities().filter(lambda q: q != expected["quantity"]))
        changed["quantity"] = data.draw(st.sampled_from(spellings(q)))
    elif field == "timestamp":
        other = data.draw(st.one_of(st.none(), timestamps()))
        assume((other and other[1]) != expected["timestamp"])
        if other is None:
            changed.pop("timestamp", None)
        else:
            changed["timestamp"] = other[0]
    else:
        other = data.draw(properties)
        assume(canonical_properties(other) != canonical_properties(raw.get("properties")))
        changed["properties"] = other
    a, b = parse(raw, BIG_CAP), parse(changed, BIG_CAP)
    assert isinstance(b, UsageEvent)
    assert a.payload_hash != b.payload_hash, field


@props
@given(timestamps(), st.integers(min_value=1, max_value=10**6))
def test_one_microsecond_is_another_payload(ts, micros):
    text, instant = ts
    later = instant + timedelta(microseconds=micros)
    assume(later.year <= 9998)
    a = parse({**BASE, "timestamp": text})
    b = parse({**BASE, "timestamp": later.isoformat()})
    assert a.timestamp == instant and b.timestamp == later
    assert a.payload_hash != b.payload_hash


# ---------------------------------------------------------------- outcomes of a batch


@st.composite
def batches(draw):
    """Events over a few keys and payloads, some keys stored before, some events invalid."""
    n_keys = draw(st.integers(1, 4))
    key_names = draw(st.lists(keys, min_size=n_keys, max_size=n_keys, unique=True))
    payloads = draw(st.lists(st.tuples(refs, quantities()), min_size=1, max_size=3))
    raws = []
    for _ in range(draw(st.integers(1, 12))):
        if draw(st.integers(0, 9)) == 0:  # an invalid one
            raws.append({"idempotency_key": draw(st.sampled_from(key_names)),
                         "customer": "c", "meter": "m", "quantity": "-1"})
            continue
        customer, quantity = draw(st.sampled_from(payloads))
        raws.append({"idempotency_key": draw(st.sampled_from(key_names)),
                     "customer": customer, "meter": "m", "quantity": str(quantity)})
    stored: dict[str, str] = {}  # key → hash stored before this request
    for key in key_names:
        choice = draw(st.integers(-2, len(payloads) - 1))
        if choice == -1:
            stored[key] = "0" * 64  # another payload, stored long ago
        elif choice >= 0:
            customer, quantity = payloads[choice]
            stored[key] = domain.payload_hash(customer, "m", Decimal(format_decimal(quantity)),
                                              None, {})
    return raws, stored


def claim(firsts: list[UsageEvent], stored: dict[str, str]) -> dict[str, tuple[str, str, bool]]:
    """What repository.claim_keys answers: the owner of each key."""
    claimed = {}
    for ev in firsts:
        if ev.idempotency_key in stored:
            claimed[ev.idempotency_key] = (stored[ev.idempotency_key],
                                           f"use_old_{ev.idempotency_key}", False)
        else:
            claimed[ev.idempotency_key] = (ev.payload_hash, f"use_{ev.index}", True)
    return claimed


@props
@given(batches())
def test_batch_outcomes(batch):
    raws, stored = batch
    outcomes, valid = [], []
    for index, raw in enumerate(raws):
        parsed = domain.parse_event(index, raw, max_properties_bytes=CAP)
        (outcomes if isinstance(parsed, Outcome) else valid).append(parsed)
    firsts = domain.first_per_key(valid)
    assert len({ev.idempotency_key for ev in firsts}) == len(firsts)
    claimed = claim(firsts, stored)
    resolved = domain.resolve_outcomes(valid, claimed)
    assert [o.index for o in resolved] == [ev.index for ev in valid]

    by_index = {o.index: o for o in outcomes + resolved}
    assert sorted(by_index) == list(range(len(raws)))
    first_index = {ev.idempotency_key: ev.index for ev in firsts}
    for ev in valid:
        out = by_index[ev.index]
        owner_hash, usage_id, inserted = claimed[ev.idempotency_key]
        assert out.idempotency_key == ev.idempotency_key
        if ev.payload_hash != owner_hash:
            assert (out.status, out.code, out.usage_id) == (
                "rejected", "idempotency_key_conflict", None)
        elif inserted and ev.index == first_index[ev.idempotency_key]:
            assert (out.status, out.usage_id) == ("accepted", usage_id)
        else:
            assert (out.status, out.usage_id) == ("duplicate", usage_id)
    for key in {ev.idempotency_key for ev in valid}:
        accepted = [o for o in resolved if o.idempotency_key == key and o.status == "accepted"]
        assert len(accepted) == (0 if key in stored else 1)

    summary = domain.summarize(list(reversed(outcomes + resolved)))
    assert summary["accepted"] + summary["duplicates"] + summary["rejected"] == len(raws)
    assert [r["index"] for r in summary["results"]] == list(range(len(raws)))
    for result, raw in zip(summary["results"], raws, strict=True):
        assert result["idempotency_key"] == raw["idempotency_key"]
    json.dumps(summary)  # the response body is plain JSON


# ---------------------------------------------------------------- rejections and their code


def rejected_param(raw: Any, cap: int = CAP) -> tuple[str, str | None]:
    out = parse(raw, cap)
    assert isinstance(out, Outcome) and out.status == "rejected", out
    return out.code, out.param



@props
@given(st.sampled_from(["idempotency_key", "customer", "meter"]),
       st.text(_chars, min_size=256, max_size=400))
def test_strings_over_255_characters(field, value):
    assert rejected_param({**BASE, field: value}) == ("invalid_event", field)
    assert isinstance(parse({**BASE, field: value[:255]}), UsageEvent)


@props
@given(st.one_of(st.floats(), st.booleans(),
                 st.sampled_from([Decimal("NaN"), Decimal("sNaN"), Decimal("Infinity"),
                                  Decimal("-Infinity"), "NaN", "Infinity", "-Infinity", "inf",
                                  "nan"]),
                 st.decimals(max_value=Decimal("-1E-20"), allow_nan=False),
                 st.integers(max_value=-1),
                 quantities().filter(bool).map(lambda q: f"-{q}"),
                 st.lists(st.integers(), max_size=2),
                 st.dictionaries(texts, st.integers(), max_size=2)))
def test_bad_quantities_are_rejected(value):
    assert rejected_param({**BASE, "quantity": value}) == ("invalid_event", "quantity")


@props
@given(st.one_of(st.integers(min_value=10**30, max_value=10**40),
                 st.integers(1, 10**20 - 1).map(lambda n: Decimal(n).scaleb(-21))
                 .filter(lambda d: len(format_decimal(d).partition(".")[2]) > 20)))
def test_quantities_beyond_the_digit_limits_are_rejected(value):
    assert rejected_param({**BASE, "quantity": value}) == ("invalid_event", "quantity")
    assert rejected_param({**BASE, "quantity": str(value)}) == ("invalid_event", "quantity")


@props
@given(properties, st.sampled_from([Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity"),
                                    float("nan"), float("inf"), 1.5]), st.data())
def test_non_finite_or_float_properties_are_rejected(props_, bad, data):
    name = data.draw(texts)
    nested = data.draw(st.sampled_from(["flat", "list", "object"]))
    if nested == "flat":
        props_ = {**props_, name: bad}
        param = f"properties.{name}"
    elif nested == "list":
        props_ = {**props_, name: [1, bad]}
        param = f"properties.{name}"
    else:
        props_ = {**props_, name: {"inner": bad}}
        param = f"properties.{name}.inner"
    assert rejected_param({**BASE, "properties": props_}, BIG_CAP) == ("invalid_event", param)


@props
@given(properties)
def test_properties_size_cap_is_exact(props_):
    size = len(canonical_properties(props_))
    assert isinstance(parse({**BASE, "properties": props_}, size), UsageEvent)
    assert rejected_param({**BASE, "properties": props_}, size - 1) == (
        "properties_too_large", "properties")


@props
@given(st.one_of(st.lists(anything, max_size=2), texts, json_ints, json_decimals,
                 st.booleans()))
def test_properties_that_are_not_an_object(value):
    assert rejected_param({**BASE, "properties": value}) == ("invalid_event", "properties")


@props
@given(st.one_of(json_ints, json_decimals, st.booleans(), st.lists(texts, max_size=2),
                 st.dictionaries(texts, texts, max_size=2)),
       st.sampled_from(["idempotency_key", "customer", "meter", "timestamp"]))
def test_non_string_fields(value, field):
    assert rejected_param({**BASE, field: value}) == ("invalid_event", field)


# ---------------------------------------------------------------- inputs that once crashed
# Inputs json.loads accepts that make parse_event raise instead of rejecting the event (the
# request would fail with a 500, the good events of its batch with it).


def _body(text: str) -> Any:
    return json.loads(text, parse_float=Decimal, parse_constant=Decimal)


@pytest.mark.parametrize("text", [
    '{"idempotency_key": "k", "customer": "\\ud800", "meter": "m"}',
    '{"idempotency_key": "k", "customer": "c", "meter": "\\udfff"}',
    '{"idempotency_key": "k", "customer": "c", "meter": "m", "properties": {"a": "\\ud800"}}',
    '{"idempotency_key": "k", "customer": "c", "meter": "m", "properties": {"\\udc00": 1}}',
    '{"idempotency_key": "\\ud800", "customer": "c", "meter": "m"}',  # accepted, unstorable
])
def test_lone_surrogates_are_rejected(text):
    out = parse(_body(text))
    assert isinstance(out, Outcome) and out.code == "invalid_event"


@pytest.mark.parametrize(("text", "param"), [
    ('{"idempotency_key": "k\\u0000", "customer": "c", "meter": "m"}', "idempotency_key"),
    ('{"idempotency_key": "k", "customer": "\\u0000", "meter": "m"}', "customer"),
    ('{"idempotency_key": "k", "customer": "c", "meter": "é\\u0000"}', "meter"),
    ('{"idempotency_key": "k", "customer": "c", "meter": "m", "properties": {"a": "x\\u0000"}}',
     "properties.a"),
    ('{"idempotency_key": "k", "customer": "c", "meter": "m",'
     ' "properties": {"a": {"b": ["\\u0000"]}}}', "properties.a.b"),
    ('{"idempotency_key": "k", "customer": "c", "meter": "m", "properties": {"\\u0000": 1}}',
     "properties"),
])
def test_nul_characters_are_rejected(text, param):
    """PostgreSQL stores no NUL in text or jsonb: accepted, such an event would fail its
    whole batch (HTTP) or poll (Kafka) at the write, or metering's jsonb later."""
    out = parse(_body(text))
    assert isinstance(out, Outcome) and (out.code, out.param) == ("invalid_event", param)
    assert "NUL" in out.message
    # backslash-u-zero-zero-zero-zero as text is fine
    assert isinstance(parse({**BASE, "properties": {"a": "\\u0000"}}), UsageEvent)


@pytest.mark.parametrize("text", [
    "0." + "1" * 50 + "0", "1" * 30 + "." + "1" * 39 + "0", "-0." + "1" * 60 + "000",
    "0.000001" + "1" * 50 + "0", "0." + "1" * 46 + "0",
])
def test_long_decimal_properties_keep_their_text(text):
    """A decimal whose plain form would pass 100 characters is kept as str() writes it,
    trailing zeros included, as it always was: the payload hash of a resent event depends
    on it."""
    value = Decimal(text)
    assert domain.json_safe({"x": value}, "properties") == reference_json_safe({"x": value},
                                                                              "properties")


def test_numbers_beyond_the_range_of_decimals_are_bad_json():
    body = (b'{"idempotency_key": "k", "customer": "c", "meter": "m",'
            b' "quantity": 1e99999999999999999999}')
    for form in (body, body.decode()):
        with pytest.raises(ValueError):
            domain.loads(form)
        with pytest.raises(ValueError):
            domain.exact_loads(form)


@pytest.mark.parametrize("depth, opening, closing", [(300, '{"a":', "}"), (600, "[", "]")])
def test_deeply_nested_properties_are_rejected(depth, opening, closing):
    nested = opening * depth + "1" + closing * depth
    out = parse(_body('{"idempotency_key": "k", "customer": "c", "meter": "m", '
                      f'"properties": {{"x": {nested}}}}}'))
    assert isinstance(out, Outcome) and out.status == "rejected"


@pytest.mark.parametrize("value", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"])
def test_timestamps_beyond_year_9999_in_utc_are_rejected(value):
    out = parse({**BASE, "timestamp": value})
    assert isinstance(out, Outcome) and out.param == "timestamp"


@pytest.mark.parametrize("quantity", ["1\n", "\u0661\u0665", "1\u0661", "\uff11"])
def test_quantities_are_ascii_digits_only(quantity):
    out = parse({**BASE, "quantity": quantity})
    assert isinstance(out, Outcome) and out.param == "quantity"


@pytest.mark.parametrize("value", ["2026-01-01T00:00:00Z\n", "\u0662026-01-01T00:00:00Z"])
def test_timestamps_are_ascii_and_end_where_they_end(value):
    out = parse({**BASE, "timestamp": value})
    assert isinstance(out, Outcome) and out.param == "timestamp"


# ---------------------------------------------------------------- the fast JSON parser


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (1 == Decimal(1) is not enough)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b if not isinstance(a, Decimal) else str(a) == str(b)


_json_values = st.recursive(
    st.none() | st.booleans() | st.text() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.decimals(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def _encode(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False) if not isinstance(
        value, Decimal) else str(value)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_json_values)
def test_loads_is_exactly_the_exact_parser(value):
    """domain.loads (msgspec first, the json module for what it refuses) gives the exact
    parser's answer: every non-integer number anywhere, every integer beyond 64 bits, exact."""
    text = json.dumps(value, default=lambda d: float(d) if False else _DecimalText(d))
    text = text.replace('"\\u0000DEC', "").replace('DEC\\u0000"', "")
    expected = domain.exact_loads(text)
    assert _same(domain.loads(text.encode()), expected)
    assert _same(domain.loads(text), expected)


class _DecimalText(str):
    """A Decimal written into JSON as a bare number (json.dumps has no hook for that): the
    marker quotes are stripped after encoding."""

    def __new__(cls, d: Decimal):
        return str.__new__(cls, f"\x00DEC{d}DEC\x00")


@pytest.mark.parametrize("text", [
    '{"q": 1.5}', '{"q": [1, {"x": 2.50}]}', '{"q": 1e400}', '{"q": -0.0}',
    '{"q": 123456789012345678901234567890}', '{"q": NaN}', '{"q": Infinity}',
    '{"k": "\\ud800"}', '[' * 2000 + ']' * 2000, '{"a": 1, "a": 2}', '{"q": 10}',
    # what a one-pass parser could take differently (msgspec parses first, see domain.loads)
    '"a\x01b"', '1e99999999999', '01', '+1', '.5', '[1,]', '{"a": 1,}', '\ufeff[1]', '1.',
    '1E2', '0e0', '-0', '"\\uD83D\\uDE00"', '9' * 5000, '1' + '0' * 400 + '.5',
    ' \t\n[1]\n ', '[1] // comment',
])
def test_loads_edge_cases_match_the_exact_parser(text):
    for form in (text.encode(), text):  # bytes (a body, a record) and str alike
        try:
            expected = domain.exact_loads(form)
        except (ValueError, RecursionError) as exc:
            with pytest.raises(type(exc)):
                domain.loads(form)
            continue
        assert _same(domain.loads(form), expected)


def test_loads_refuses_what_the_exact_parser_refuses():
    for bad in (b'{"a": }', b"\xff", b'{"a": 1} x', b""):
        with pytest.raises(ValueError):
            domain.loads(bad)
    assert isinstance(domain.loads(b'{"q": 1.5}')["q"], Decimal)
    assert type(domain.loads(b'{"q": 15}')["q"]) is int


# ---------------------------------------------------------------- json_safe's shortcuts
# json_safe returns values that need no conversion as they are (domain._is_safe), and its
# converting walk takes plain members inline and decimals through their own text
# (domain._decimal_text). Both must decide exactly as the plain walk below, json_safe as it
# was written first.


def reference_json_safe(value: Any, path: str, depth: int = 0) -> Any:
    if isinstance(value, dict | list):
        if depth >= domain.MAX_PROPERTIES_DEPTH:
            raise domain.EventError("invalid_event", f"{path} nests deeper than "
                                    f"{domain.MAX_PROPERTIES_DEPTH} levels", path)
        if isinstance(value, list):
            return [reference_json_safe(v, path, depth + 1) for v in value]
        out = {}
        for k, v in value.items():
            if not k.isascii() and not domain._is_unicode_text(k):
                raise domain.EventError("invalid_event", f"{path} has a key with an unpaired "
                                        "surrogate", path)
            if "\x00" in k:
                raise domain.EventError("invalid_event", f"{path} has a key with a NUL "
                                        "character (\\u0000), which is not allowed", path)
            out[k] = reference_json_safe(v, f"{path}.{k}", depth + 1)
        return out
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if not value.isascii() and not domain._is_unicode_text(value):
            raise domain.EventError("invalid_event", f"{path} holds an unpaired surrogate",
                                    path)
        if "\x00" in value:
            raise domain.EventError("invalid_event", f"{path} holds a NUL character "
                                    "(\\u0000), which is not allowed", path)
        return value
    if isinstance(value, int):
        return value if INT64[0] <= value <= INT64[1] else str(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise domain.EventError("invalid_event", f"{path} must be a finite number", path)
        return format_decimal(value) if domain._plain_length(value) <= 100 else str(value)
    if isinstance(value, float):
        raise domain.EventError("invalid_event", f"{path}: floats are not accepted", path)
    raise domain.EventError("invalid_event", f"{path} holds an unsupported value", path)


surrogates = st.sampled_from(["\ud800", "a\udfffb", "\udc00\ud800", "\x00", "a\x00",
                              "é\x00"])  # (and NUL, refused as well)
near_limit = st.integers(min_value=domain.MAX_PROPERTIES_DEPTH - 2,
                         max_value=domain.MAX_PROPERTIES_DEPTH + 1)


def _outcome(fn, value, depth=0):
    try:
        return "value", fn(value, "properties", depth)
    except domain.EventError as err:
        return "error", err.code, err.param, err.message


@props
@given(st.recursive(st.one_of(json_leaves, surrogates, st.floats()),
                    lambda children: st.one_of(
                        st.lists(children, max_size=4),
                        st.dictionaries(st.one_of(texts, surrogates), children, max_size=4)),
                    max_leaves=16),
       st.integers(min_value=0, max_value=domain.MAX_PROPERTIES_DEPTH))
def test_json_safe_decides_as_the_plain_walk(value, depth):
    expected = _outcome(reference_json_safe, value, depth)
    assert _outcome(domain.json_safe, value, depth) == expected
    assert _outcome(domain._json_safe_walk, value, depth) == expected


long_plain_decimals = st.builds(
    lambda sign, whole, frac, zeros: Decimal(f"{sign}{whole}.{frac}{'0' * zeros}"),
    st.sampled_from(["", "-"]), st.sampled_from(["0", "1", "12345678901234567890"]),
    st.text(alphabet="0123456789", min_size=0, max_size=70), st.integers(0, 5))


@props
@given(st.one_of(json_decimals.filter(lambda d: d.is_finite()), long_plain_decimals))
def test_a_decimal_property_reads_as_the_plain_walk_writes_it(value):
    assert domain._decimal_text(value) == reference_json_safe(value, "p")
    text = format(value, "f") if -80 < value.adjusted() < 80 else str(value)
    parsed = domain.loads(text.encode())
    if isinstance(parsed, Decimal):  # as a JSON number in a body
        assert domain._decimal_text(parsed) == reference_json_safe(parsed, "p")


@props
@given(near_limit, st.sampled_from(["list", "object"]), st.one_of(json_leaves, surrogates))
def test_json_safe_decides_as_the_walk_at_the_depth_limit(levels, shape, leaf):
    value = leaf
    for _ in range(levels):
        value = [value] if shape == "list" else {"a": value}
    assert _outcome(domain.json_safe, {"x": value}) == _outcome(reference_json_safe,
                                                                {"x": value})


@props
@given(properties, st.sampled_from(["1", "2.5"]), st.none() | st.just(datetime(2026, 1, 1,
                                                                            tzinfo=UTC)))
def test_properties_hash_the_same_as_their_canonical_bytes(props_, quantity, ts):
    safe = domain.json_safe(props_, "properties")
    fragment = orjson.Fragment(domain.canonical_json(safe))
    assert (domain.payload_hash("c", "m", quantity, ts, fragment)
            == domain.payload_hash("c", "m", quantity, ts, safe))
    event = parse({**BASE, "quantity": quantity, "properties": props_}, BIG_CAP)
    if isinstance(event, UsageEvent) and ts is None:
        assert event.payload_hash == domain.payload_hash("c", "m", quantity, None, safe)
