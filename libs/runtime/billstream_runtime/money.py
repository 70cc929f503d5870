"""Money: integer minor units with an ISO 4217 currency; Decimal in between; never a float.

Rounding rule (documented in docs/architecture.md#money): a line amount is computed exactly in
Decimal (quantity × unit price, or a fixed amount) and rounded once, to the currency's minor
unit, half away from zero (ROUND_HALF_UP). Invoice totals are sums of rounded lines, so a total
always equals the sum of the lines a customer sees.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation, Inexact, Rounded

# ISO 4217 minor-unit exponents that differ from 2.
_EXPONENTS: dict[str, int] = {
    "BIF": 0, "CLP": 0, "DJF": 0, "GNF": 0, "ISK": 0, "JPY": 0, "KMF": 0, "KRW": 0, "PYG": 0,
    "RWF": 0, "UGX": 0, "UYI": 0, "VND": 0, "VUV": 0, "XAF": 0, "XOF": 0, "XPF": 0,
    "BHD": 3, "IQD": 3, "JOD": 3, "KWD": 3, "LYD": 3, "OMR": 3, "TND": 3,
    "CLF": 4, "UYW": 4,
}
# Currencies accepted by the API (ISO 4217 active codes commonly used for billing).
CURRENCIES: frozenset[str] = frozenset(
    """AED AUD BGN BHD BRL CAD CHF CLP CNY CZK DKK EUR GBP HKD HUF IDR ILS INR ISK JOD JPY KRW
    KWD MXN MYR NOK NZD OMR PHP PLN RON SAR SEK SGD THB TND TRY TWD UAH USD VND ZAR""".split()
)


class MoneyError(ValueError):
    pass


#: The largest amount an invoice line or total can hold: a PostgreSQL bigint of minor units.
MAX_MINOR = 2**63 - 1
#: Rating arithmetic is exact: products of quantities and prices are computed with this many
#: significant digits (Python's default is 28) and any operation that would round is an error.
EXACT = Context(prec=120, traps=[InvalidOperation, Inexact, Rounded])


def multiply(quantity: Decimal, unit_price: Decimal) -> Decimal:
    """quantity × unit price, exactly (never silently rounded)."""
    try:
        return EXACT.multiply(quantity, unit_price)
    except (Inexact, Rounded, InvalidOperation) as exc:
        raise MoneyError(f"{quantity} × {unit_price} cannot be computed exactly") from exc


def exponent(currency: str) -> int:
    return _EXPONENTS.get(currency.upper(), 2)


def check_currency(currency: str) -> str:
    code = currency.upper()
    if code not in CURRENCIES:
        raise MoneyError(f"unsupported currency {currency!r}")
    return code


def parse_decimal(value: str | int | Decimal) -> Decimal:
    """A decimal from a string or int. Floats are refused: they cannot represent money."""
    if isinstance(value, bool) or isinstance(value, float):
        raise MoneyError("amounts and quantities must be decimal strings or integers, not floats")
    try:
        result = Decimal(value)
    except (InvalidOperation, TypeError) as exc:
        raise MoneyError(f"{value!r} is not a decimal number") from exc
    if not result.is_finite():
        raise MoneyError(f"{value!r} is not a finite number")
    return result


def to_minor(amount: Decimal, currency: str) -> int:
    """Round a major-unit Decimal to integer minor units, half away from zero. Amounts beyond
    MAX_MINOR minor units are refused (MoneyError) rather than overflowing."""
    exp = exponent(currency)
    context = Context(prec=120, rounding=ROUND_HALF_UP)
    try:
        minor = int(context.scaleb(amount, exp).to_integral_value(context=context))
    except (InvalidOperation, OverflowError, ValueError) as exc:
        raise MoneyError(f"{amount} {currency} is not a representable amount") from exc
    if abs(minor) > MAX_MINOR:
        raise MoneyError(f"{amount} {currency} exceeds the largest amount ({MAX_MINOR} minor units)")
    return minor


def format_decimal(value: Decimal) -> str:
    """Normalized plain decimal string for quantities: no exponent, no trailing zeros ("1500",
    "3.5", "0.002"), exact whatever the number of digits (Decimal.normalize would round to the
    context's 28). Non-finite values are refused."""
    if not value.is_finite():
        raise MoneyError(f"{value!r} is not a finite number")
    sign, digit_tuple, exp = value.as_tuple()
    digits = "".join(map(str, digit_tuple)).lstrip("0")
    if not digits:
        return "0"
    stripped = digits.rstrip("0")
    exp = int(exp) + len(digits) - len(stripped)
    if exp >= 0:
        text = stripped + "0" * exp
    else:
        point = len(stripped) + exp
        text = (stripped[:point] + "." + stripped[point:] if point > 0
                else "0." + "0" * -point + stripped)
    return ("-" if sign else "") + text


def format_minor(amount: int, currency: str) -> str:
    """`4900, "USD"` → `"49.00"`."""
    exp = exponent(currency)
    return str(Decimal(amount).scaleb(-exp).quantize(Decimal(1).scaleb(-exp)))
