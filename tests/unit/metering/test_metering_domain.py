"""Metering domain: event values, aggregation, period usage per charge, formats (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from billstream_contracts.events import Charge
from billstream_metering import domain
from billstream_metering.domain import Meter, Totals


@pytest.mark.parametrize("raw, expected", [
    (3, Decimal(3)), ("2.5", Decimal("2.5")), (" 7 ", Decimal(7)), ("1e3", Decimal(1000)),
    (0.1, Decimal("0.1")), (True, None), (None, None), ("abc", None), ([1], None),
    ({"a": 1}, None), ("NaN", None), (float("inf"), None), ("1e99999", None),
])
def test_field_values(raw, expected):
    assert domain.field_value(raw) == expected


def test_usage_value_is_quantity_or_the_meter_field():
    props = {"tokens": "12.5", "n": 4}
    q = Decimal(2)
    assert domain.usage_value(q, props, Meter("m", "sum")) == q
    assert domain.usage_value(q, props, None) == q  # meter not known yet: provisional
    assert domain.usage_value(q, props, Meter("m", "sum", "tokens")) == Decimal("12.5")
    assert domain.usage_value(q, props, Meter("m", "max", "n")) == Decimal(4)
    assert domain.usage_value(q, props, Meter("m", "sum", "missing")) is None
    assert domain.usage_value(q, None, Meter("m", "sum", "tokens")) is None


def test_aggregations():
    t = Totals(Decimal("10.5"), 4, Decimal(7))
    assert domain.aggregate("sum", t) == Decimal("10.5")
    assert domain.aggregate("count", t) == Decimal(4)
    assert domain.aggregate("max", t) == Decimal(7)
    for aggregation in ("sum", "count", "max"):
        assert domain.aggregate(aggregation, domain.NO_USAGE) == 0
    # rows counted but without a value (missing field): count counts them, sum/max skip them
    t = Totals(None, 3, None)
    assert (domain.aggregate("sum", t), domain.aggregate("count", t),
            domain.aggregate("max", t)) == (0, 3, 0)


def _charges():
    return [
        Charge(charge_id="ch_fixed", type="fixed", timing="in_advance", amount="49.00"),
        Charge(charge_id="ch_calls", type="usage", timing="in_arrears", meter="api_calls",
               model="per_unit", unit_price="0.001"),
        Charge(charge_id="ch_peak", type="usage", timing="in_arrears", meter="seats",
               model="per_unit", unit_price="5"),
        Charge(charge_id="ch_calls_2", type="usage", timing="in_arrears", meter="api_calls",
               model="per_unit", unit_price="0"),
        Charge(charge_id="ch_gb", type="usage", timing="in_arrears", meter="storage_gb",
               model="per_unit", unit_price="0.1"),
    ]


def test_usage_per_charge():
    totals = {"api_calls": Totals(Decimal("1500.000"), 1500, Decimal(1)),
              "seats": Totals(Decimal(30), 3, Decimal(12))}
    meters = {"api_calls": Meter("api_calls", "sum"), "seats": Meter("seats", "max")}
    usage = domain.charge_usage(_charges(), totals, meters)
    assert [(u.charge_id, u.meter, u.quantity, u.usage_count) for u in usage] == [
        ("ch_calls", "api_calls", "1500", 1500),
        ("ch_peak", "seats", "12", 3),
        ("ch_calls_2", "api_calls", "1500", 1500),
        ("ch_gb", "storage_gb", "0", 0),  # no usage, and a meter unknown here: sum of nothing
    ]
    assert domain.usage_meters(_charges()) == ["api_calls", "seats", "storage_gb"]
    assert domain.charge_usage(_charges()[:1], totals, meters) == []


@pytest.mark.parametrize("value, text", [
    (Decimal(1500), "1500"), (Decimal("1.5E+3"), "1500"), (Decimal("3.50"), "3.5"),
    (Decimal("0.000"), "0"), (Decimal("-0"), "0"), (Decimal("0.0001"), "0.0001"),
    (Decimal("-2.50"), "-2.5"), (Decimal("123456789012345678901234567890.5"),
                                 "123456789012345678901234567890.5"),
])
def test_decimal_format(value, text):
    assert domain.format_decimal(value) == text


def test_timestamps():
    assert domain.parse_timestamp("2026-02-01T01:00:00+01:00") == datetime(2026, 2, 1,
                                                                              tzinfo=UTC)
    assert domain.format_timestamp(datetime(2026, 2, 1, tzinfo=UTC)) == "2026-02-01T00:00:00Z"
    for bad in ("2026-02-01", "2026-02-01T00:00:00", "yesterday"):
        with pytest.raises(ValueError):
            domain.parse_timestamp(bad)
