from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billstream_runtime.money import (
    MoneyError, check_currency, exponent, format_minor, parse_decimal, to_minor,
)


@pytest.mark.parametrize(
    ("amount", "currency", "minor"),
    [
        ("49.00", "USD", 4900),
        ("3.00", "USD", 300),
        (str(Decimal(1500) * Decimal("0.002")), "USD", 300),
        ("0.005", "USD", 1),  # half away from zero
        ("0.0049999", "USD", 0),
        ("-0.005", "USD", -1),
        ("2.675", "USD", 268),  # a float would give 267
        ("1000.5", "JPY", 1001),
        ("0.0005", "KWD", 1),
        ("1.2345", "KWD", 1235),
    ],
)
def test_to_minor_rounds_half_away_from_zero(amount, currency, minor):
    assert to_minor(Decimal(amount), currency) == minor


def test_exponents_follow_iso_4217():
    assert (exponent("USD"), exponent("JPY"), exponent("KWD"), exponent("eur")) == (2, 0, 3, 2)


def test_format_minor():
    assert format_minor(5200, "USD") == "52.00"
    assert format_minor(1001, "JPY") == "1001"
    assert format_minor(1235, "KWD") == "1.235"


def test_floats_are_refused():
    with pytest.raises(MoneyError):
        parse_decimal(0.1)  # type: ignore[arg-type]
    with pytest.raises(MoneyError):
        parse_decimal("NaN")
    with pytest.raises(MoneyError):
        parse_decimal("abc")
    assert parse_decimal("0.002") == Decimal("0.002")
    assert parse_decimal(7) == Decimal(7)


def test_currency_check():
    assert check_currency("usd") == "USD"
    with pytest.raises(MoneyError):
        check_currency("XXX")


@given(st.integers(min_value=-10**12, max_value=10**12))
def test_minor_round_trip(minor):
    assert to_minor(Decimal(format_minor(minor, "USD")), "USD") == minor


def test_large_products_are_exact_and_overflow_is_refused():
    from billstream_runtime.money import MAX_MINOR, multiply

    q = Decimal("123456789012345678901234567890")
    p = Decimal("0.000000000001")
    exact = Decimal("123456789012345678.901234567890")
    assert q * p != exact  # Python's default 28-digit context rounds silently
    assert multiply(q, p) == exact
    assert to_minor(multiply(q, p), "JPY") == 123456789012345679
    with pytest.raises(MoneyError):
        to_minor(multiply(q, p), "USD")  # 1.2e19 cents does not fit the ledger
    with pytest.raises(MoneyError):
        to_minor(Decimal(MAX_MINOR) + 1, "JPY")
    assert to_minor(Decimal(MAX_MINOR), "JPY") == MAX_MINOR


@pytest.mark.parametrize(("value", "text"), [
    ("1500", "1500"), ("1500.000", "1500"), ("1E+3", "1000"), ("0.0020", "0.002"),
    ("-3.50", "-3.5"), ("0E-7", "0"), ("123456789012345678901234567890.123456789",
                                       "123456789012345678901234567890.123456789"),
])
def test_format_decimal_is_plain_and_exact(value, text):
    from billstream_runtime.money import format_decimal

    assert format_decimal(Decimal(value)) == text


def test_format_decimal_refuses_non_finite():
    from billstream_runtime.money import format_decimal

    with pytest.raises(MoneyError):
        format_decimal(Decimal("NaN"))
