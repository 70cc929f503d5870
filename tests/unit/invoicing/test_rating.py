"""Line rating, rounding and invoice drafting (pure domain, no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from billstream_invoicing import domain
from billstream_invoicing.domain import Period, Plan, PlanCharge

JAN = Period(datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 2, 1, tzinfo=UTC))
FEB = Period(datetime(2025, 2, 1, tzinfo=UTC), datetime(2025, 3, 1, tzinfo=UTC))


def plan(*charges: PlanCharge, currency: str = "USD") -> Plan:
    return Plan(plan_id="plan_1", name="Pro", currency=currency, charges=charges)


BASE = PlanCharge("base", "fixed", "in_advance", amount=Decimal("49.00"))
API = PlanCharge("api", "usage", "in_arrears", meter="api_calls", unit_price=Decimal("0.002"))
SUPPORT = PlanCharge("support", "fixed", "in_arrears", amount=Decimal("10"))


@pytest.mark.parametrize(
    ("quantity", "unit_price", "currency", "minor"),
    [
        ("1500", "0.002", "USD", 300),  # 3.000 USD
        ("1", "49.00", "USD", 4900),
        ("1", "0.005", "USD", 1),  # exactly half a cent: away from zero
        ("1", "0.00499", "USD", 0),
        ("3", "0.0049", "USD", 1),  # 0.0147, rounded once after multiplying
        ("1", "0.015", "USD", 2),
        ("1", "0.025", "USD", 3),  # banker's rounding would give 2
        ("1", "-0.005", "USD", -1),  # half away from zero for credits
        ("7", "0.5", "JPY", 4),  # 3.5 yen → 4
        ("1", "1200", "JPY", 1200),  # JPY has no minor unit
        ("3", "0.0005", "KWD", 2),  # 0.0015 KWD → 2 fils (3 decimals)
        ("0", "0.002", "USD", 0),
        ("1000000", "0.0000001", "USD", 10),  # 0.1 → 10 cents, no float drift
    ],
)
def test_line_amount_rounds_once_half_away_from_zero(quantity, unit_price, currency, minor):
    assert domain.line_amount(Decimal(quantity), Decimal(unit_price), currency) == minor


def test_rounding_happens_per_line_and_totals_sum_rounded_lines():
    # Three usage charges of 0.005 each: each line rounds to 1 cent, so the total is 3 cents,
    # not round(0.015) = 2 cents: the total equals the sum of the lines the customer sees.
    charges = [PlanCharge(f"c{i}", "usage", "in_arrears", meter=f"m{i}",
                          unit_price=Decimal("0.005")) for i in range(3)]
    draft = domain.period_invoice(plan(*charges), JAN, {f"c{i}": Decimal(1) for i in range(3)},
                                  None)
    assert [ln.amount for ln in draft.lines] == [1, 1, 1]
    assert draft.subtotal == draft.total == 3


def test_first_invoice_bills_in_advance_fixed_charges_for_the_first_period():
    draft = domain.first_invoice(plan(BASE, API, SUPPORT), JAN)
    assert draft is not None and draft.kind == "subscription_create"
    assert [(ln.charge_id, ln.amount, ln.period) for ln in draft.lines] == [("base", 4900, JAN)]
    assert draft.total == 4900 and draft.period == JAN


def test_first_invoice_is_none_without_in_advance_charges():
    assert domain.first_invoice(plan(API, SUPPORT), JAN) is None


def test_period_invoice_example_5200():
    draft = domain.period_invoice(plan(BASE, API), JAN, {"api": Decimal("1500")}, FEB)
    assert draft is not None and draft.kind == "subscription_cycle" and draft.period == JAN
    by_charge = {ln.charge_id: ln for ln in draft.lines}
    assert by_charge["api"].amount == 300 and by_charge["api"].period == JAN
    assert by_charge["api"].quantity == Decimal("1500")
    assert by_charge["api"].unit_price == Decimal("0.002")
    assert by_charge["base"].amount == 4900 and by_charge["base"].period == FEB
    assert draft.total == 5200


def test_period_invoice_without_renewal_bills_arrears_only():
    draft = domain.period_invoice(plan(BASE, API, SUPPORT), JAN, {"api": Decimal("10")}, None)
    assert [(ln.charge_id, ln.amount) for ln in draft.lines] == [("api", 2), ("support", 1000)]


def test_usage_charge_without_usage_gets_a_zero_line():
    draft = domain.period_invoice(plan(API), JAN, {}, None)
    assert [(ln.charge_id, ln.quantity, ln.amount) for ln in draft.lines] == [
        ("api", Decimal(0), 0)]
    assert draft.total == 0


def test_period_invoice_none_when_nothing_to_bill():
    assert domain.period_invoice(plan(BASE), JAN, {}, None) is None


def test_jpy_invoice():
    yen = plan(PlanCharge("base", "fixed", "in_advance", amount=Decimal("980")),
               PlanCharge("api", "usage", "in_arrears", meter="m", unit_price=Decimal("0.15")),
               currency="JPY")
    draft = domain.period_invoice(yen, JAN, {"api": Decimal("333")}, FEB)
    # 333 × 0.15 = 49.95 → 50 yen
    assert [ln.amount for ln in draft.lines] == [50, 980] and draft.total == 1030


def test_sum_usage_adds_entries_per_charge_and_refuses_floats():
    assert domain.sum_usage([("a", "1.5"), ("a", "2"), ("b", "0")]) == {
        "a": Decimal("3.5"), "b": Decimal(0)}


def test_fixed_charge_without_amount_is_a_rating_error():
    with pytest.raises(domain.RatingError):
        domain.first_invoice(plan(PlanCharge("x", "fixed", "in_advance")), JAN)


def test_decimal_str_never_uses_exponents():
    assert domain.decimal_str(Decimal("1E+3")) == "1000"
    assert domain.decimal_str(Decimal("0.002")) == "0.002"
