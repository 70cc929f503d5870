"""Request parsing: money never arrives as a float; times are normalized to UTC."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from pydantic import ValidationError

from billstream_subscription.schemas import AdvanceTestClock, ChargeIn, CreatePlan


@pytest.mark.parametrize(("value", "expected"), [
    ("49.00", Decimal("49.00")), (" 0.002 ", Decimal("0.002")), (49, Decimal(49)),
    ("1e3", Decimal("1E+3")),
])
def test_decimal_strings_and_integers_are_accepted(value, expected):
    assert ChargeIn(type="fixed", amount=value).amount == expected


@pytest.mark.parametrize("value", [49.0, 0.002, True, "abc", "NaN", "Infinity", [1]])
def test_floats_and_non_numbers_are_refused(value):
    with pytest.raises(ValidationError) as err:
        ChargeIn(type="usage", meter="m", unit_price=value)
    assert err.value.errors()[0]["loc"] == ("unit_price",)


def test_float_message_is_clear():
    with pytest.raises(ValidationError) as err:
        CreatePlan.model_validate({"code": "pro", "name": "Pro", "currency": "USD",
                                   "interval": "month",
                                   "charges": [{"type": "fixed", "amount": 49.5}]})
    error = err.value.errors()[0]
    assert error["loc"] == ("charges", 0, "amount")
    assert "not a JSON number with a fraction" in error["msg"]


def test_unknown_fields_are_refused():
    with pytest.raises(ValidationError):
        CreatePlan.model_validate({"code": "pro", "name": "Pro", "currency": "USD",
                                   "interval": "month", "colour": "red"})


def test_times_are_aware_and_utc():
    body = AdvanceTestClock.model_validate({"frozen_time": "2026-01-01T02:00:00+02:00"})
    assert body.frozen_time == datetime(2026, 1, 1, tzinfo=UTC)
    assert body.frozen_time.utcoffset().total_seconds() == 0
    with pytest.raises(ValidationError):
        AdvanceTestClock.model_validate({"frozen_time": "2026-01-01T00:00:00"})
