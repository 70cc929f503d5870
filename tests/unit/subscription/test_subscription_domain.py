"""Subscription domain: calendar period arithmetic, renewal planning, catalog rules."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billstream_subscription import domain
from billstream_subscription.domain import (
    ChargeSpec,
    Customer,
    InvalidInput,
    Plan,
    Subscription,
    TestClock,
    add_interval,
    period_bounds,
    plan_clock_advance,
    plan_renewals,
)


def t(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def plan(interval: domain.Interval = "month", count: int = 1, currency: str = "USD") -> Plan:
    return Plan("plan_1", "ten_1", "test", "pro", "Pro", currency, interval, count, (), t(2026, 1, 1))


def customer(currency: str | None = "USD", clock: str | None = "clk_1") -> Customer:
    return Customer("cus_1", "ten_1", "test", "acme-1", "Acme", None, currency, clock, {},
                    t(2026, 1, 1))


def subscription(start: datetime, p: Plan | None = None, sub_id: str = "sub_1") -> Subscription:
    return Subscription.start(subscription_id=sub_id, customer=customer(), plan=p or plan(),
                              now=start)


# ---------------------------------------------------------------- period arithmetic


@pytest.mark.parametrize(("anchor", "interval", "count", "expected"), [
    (t(2026, 1, 15, 10, 30), "month", 1, t(2026, 2, 15, 10, 30)),
    (t(2026, 1, 31), "month", 1, t(2026, 2, 28)),
    (t(2028, 1, 31), "month", 1, t(2028, 2, 29)),  # leap year
    (t(2026, 1, 31), "month", 2, t(2026, 3, 31)),
    (t(2026, 1, 31), "month", 3, t(2026, 4, 30)),
    (t(2026, 11, 30), "month", 3, t(2027, 2, 28)),
    (t(2026, 12, 15), "month", 1, t(2027, 1, 15)),
    (t(2026, 1, 1), "month", 24, t(2028, 1, 1)),
    (t(2028, 2, 29), "year", 1, t(2029, 2, 28)),
    (t(2028, 2, 29), "year", 4, t(2032, 2, 29)),
    (t(2026, 1, 1), "day", 45, t(2026, 2, 15)),
    (t(2026, 1, 1), "week", 2, t(2026, 1, 15)),
    (t(2026, 1, 1), "month", 0, t(2026, 1, 1)),
])
def test_add_interval(anchor, interval, count, expected):
    assert add_interval(anchor, interval, count) == expected


def test_month_end_anchor_does_not_drift():
    """Jan 31 → Feb 28 → Mar 31 → Apr 30: each boundary from the anchor, not the last end."""
    anchor = t(2026, 1, 31)
    ends = [period_bounds(anchor, "month", 1, i)[1] for i in range(4)]
    assert ends == [t(2026, 2, 28), t(2026, 3, 31), t(2026, 4, 30), t(2026, 5, 31)]
    assert period_bounds(anchor, "month", 1, 1) == (t(2026, 2, 28), t(2026, 3, 31))


def test_interval_count_multiplies():
    assert period_bounds(t(2026, 1, 31), "month", 3, 1) == (t(2026, 4, 30), t(2026, 7, 31))
    assert period_bounds(t(2026, 1, 1), "week", 2, 2) == (t(2026, 1, 29), t(2026, 2, 12))


@given(
    anchor=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                        timezones=st.just(UTC)),
    interval=st.sampled_from(["day", "week", "month", "year"]),
    count=st.integers(1, 12),
    index=st.integers(0, 60),
)
def test_periods_are_contiguous_and_increasing(anchor, interval, count, index):
    start, end = period_bounds(anchor, interval, count, index)
    next_start, next_end = period_bounds(anchor, interval, count, index + 1)
    assert start < end == next_start < next_end
    assert start.time() == anchor.time() and start.tzinfo == anchor.tzinfo
    if interval in ("month", "year"):
        assert start.day == anchor.day or start.day < anchor.day  # clamped, never later


# ---------------------------------------------------------------- renewal planning


def test_start_uses_now_and_first_period():
    sub = subscription(t(2026, 1, 31))
    assert sub.status == "active" and sub.period_index == 0
    assert (sub.started_at, sub.current_period_start, sub.current_period_end) == (
        t(2026, 1, 31), t(2026, 1, 31), t(2026, 2, 28))
    assert sub.customer_external_id == "acme-1" and sub.test_clock_id == "clk_1"


def test_currency_mismatch_is_refused():
    with pytest.raises(InvalidInput) as err:
        Subscription.start(subscription_id="sub_1", customer=customer("EUR"), plan=plan(),
                           now=t(2026, 1, 1))
    assert err.value.code == "currency_mismatch" and err.value.param == "plan"
    # a customer without a currency takes any plan
    Subscription.start(subscription_id="sub_1", customer=customer(None), plan=plan(),
                       now=t(2026, 1, 1))


def test_nothing_due_before_the_period_ends():
    sub = subscription(t(2026, 1, 1))
    assert plan_renewals(sub, t(2026, 1, 31, 23, 59, 59)).renewals == []


def test_period_ending_exactly_now_renews():
    sub = subscription(t(2026, 1, 1))
    renewals = plan_renewals(sub, t(2026, 2, 1)).renewals
    assert len(renewals) == 1
    assert renewals[0].ended.current_period_end == t(2026, 2, 1)
    assert renewals[0].renewed.current_period_start == t(2026, 2, 1)


def test_a_jump_over_three_months_renews_three_times_in_order():
    sub = subscription(t(2026, 1, 31))
    result = plan_renewals(sub, t(2026, 4, 30, 12))
    periods = [(r.ended.current_period_start, r.ended.current_period_end,
                r.renewed.current_period_start, r.renewed.current_period_end)
               for r in result.renewals]
    assert periods == [
        (t(2026, 1, 31), t(2026, 2, 28), t(2026, 2, 28), t(2026, 3, 31)),
        (t(2026, 2, 28), t(2026, 3, 31), t(2026, 3, 31), t(2026, 4, 30)),
        (t(2026, 3, 31), t(2026, 4, 30), t(2026, 4, 30), t(2026, 5, 31)),
    ]
    assert [r.boundary for r in result.renewals] == [t(2026, 2, 28), t(2026, 3, 31),
                                                      t(2026, 4, 30)]
    assert [r.renewed.period_index for r in result.renewals] == [1, 2, 3]
    assert result.complete and result.final.current_period_end == t(2026, 5, 31)
    # planning again from the final state finds nothing left: renewal is not repeatable
    assert plan_renewals(result.final, t(2026, 4, 30, 12)).renewals == []


def test_limit_stops_and_reports_incomplete():
    sub = subscription(t(2026, 1, 1), plan("day"))
    result = plan_renewals(sub, t(2026, 1, 11), limit=4)
    assert len(result.renewals) == 4 and not result.complete
    rest = plan_renewals(result.final, t(2026, 1, 11))
    assert len(rest.renewals) == 6 and rest.complete


def test_past_due_renews_and_canceled_does_not():
    sub = subscription(t(2026, 1, 1))
    past_due = sub.marked_past_due()
    assert past_due is not None and past_due.status == "past_due"
    assert len(plan_renewals(past_due, t(2026, 3, 1)).renewals) == 2
    canceled = replace(sub, status="canceled")
    assert plan_renewals(canceled, t(2027, 1, 1)).renewals == []


def test_clock_advance_merges_subscriptions_in_time_order():
    a = subscription(t(2026, 1, 1), sub_id="sub_a")  # renews Feb 1, Mar 1
    b = subscription(t(2026, 1, 15), sub_id="sub_b")  # renews Feb 15
    renewals = plan_clock_advance([b, a], t(2026, 3, 1))
    assert [(r.ended.id, r.boundary) for r in renewals] == [
        ("sub_a", t(2026, 2, 1)), ("sub_b", t(2026, 2, 15)), ("sub_a", t(2026, 3, 1))]


def test_clock_advance_refuses_an_unbounded_jump():
    sub = subscription(t(2026, 1, 1), plan("day"))
    with pytest.raises(InvalidInput) as err:
        plan_clock_advance([sub], t(2026, 1, 1) + timedelta(days=11), max_per_subscription=10)
    assert err.value.param == "frozen_time"
    assert len(plan_clock_advance([sub], t(2026, 1, 11), max_per_subscription=10)) == 10


def test_status_transitions():
    sub = subscription(t(2026, 1, 1))
    assert sub.reactivated() is None  # already active
    past_due = sub.marked_past_due()
    assert past_due.marked_past_due() is None  # a second failure changes nothing
    assert past_due.reactivated().status == "active"


# ---------------------------------------------------------------- clocks


def test_clock_only_moves_forward():
    clock = TestClock("clk_1", "ten_1", "test", None, t(2026, 1, 1), "ready", t(2026, 1, 1))
    assert clock.advanced_to(t(2026, 2, 1)).frozen_time == t(2026, 2, 1)
    for same_or_earlier in (t(2026, 1, 1), t(2025, 12, 31)):
        with pytest.raises(InvalidInput) as err:
            clock.advanced_to(same_or_earlier)
        assert (err.value.code, err.value.param) == ("parameter_invalid", "frozen_time")


def test_test_mode_only():
    domain.require_test_mode("test")
    with pytest.raises(InvalidInput) as err:
        domain.require_test_mode("live")
    assert err.value.code == "test_mode_only"


# ---------------------------------------------------------------- catalog and keys


def test_fixed_charge_defaults_and_minor_units():
    c = domain.build_charge(ChargeSpec("fixed", amount=Decimal("49")), 0, "USD", "chg_1")
    assert (c.timing, c.amount_str) == ("in_advance", "49.00")
    c = domain.build_charge(ChargeSpec("fixed", amount=Decimal("1000")), 0, "JPY", "chg_1")
    assert c.amount_str == "1000"
    c = domain.build_charge(ChargeSpec("fixed", amount=Decimal("49.000"), timing="in_arrears"),
                            0, "USD", "chg_1")
    assert (c.timing, c.amount_str) == ("in_arrears", "49.00")


def test_usage_charge_defaults():
    c = domain.build_charge(ChargeSpec("usage", meter="api_calls", unit_price=Decimal("0.002")),
                            1, "USD", "chg_2")
    assert (c.timing, c.model, c.meter, c.unit_price_str) == (
        "in_arrears", "per_unit", "api_calls", "0.002")


@pytest.mark.parametrize(("spec", "code", "param"), [
    (ChargeSpec("fixed"), "parameter_missing", "charges[3].amount"),
    (ChargeSpec("fixed", amount=Decimal("-1")), "parameter_invalid", "charges[3].amount"),
    (ChargeSpec("fixed", amount=Decimal("1.005")), "parameter_invalid", "charges[3].amount"),
    (ChargeSpec("fixed", amount=Decimal("1"), meter="x"), "parameter_invalid",
     "charges[3].meter"),
    (ChargeSpec("usage", unit_price=Decimal("1")), "parameter_missing", "charges[3].meter"),
    (ChargeSpec("usage", meter="m"), "parameter_missing", "charges[3].unit_price"),
    (ChargeSpec("usage", meter="m", unit_price=Decimal("-0.1")), "parameter_invalid",
     "charges[3].unit_price"),
    (ChargeSpec("usage", meter="m", unit_price=Decimal("1"), timing="in_advance"),
     "parameter_invalid", "charges[3].timing"),
    (ChargeSpec("usage", meter="m", unit_price=Decimal("1"), amount=Decimal("1")),
     "parameter_invalid", "charges[3].amount"),
])
def test_invalid_charges(spec, code, param):
    with pytest.raises(InvalidInput) as err:
        domain.build_charge(spec, 3, "USD", "chg_1")
    assert (err.value.code, err.value.param) == (code, param)


@pytest.mark.parametrize("code", ["api_calls", "a", "v1.requests-total", "x" * 64])
def test_valid_codes(code):
    assert domain.check_code(code) == code


@pytest.mark.parametrize("code", ["", "API", "has space", "x" * 65, "é"])
def test_invalid_codes(code):
    with pytest.raises(InvalidInput):
        domain.check_code(code)


def test_compose_key():
    key, prefix = domain.compose_key("test", "secret", "a" * 32)
    assert key == "sk_test_" + "a" * 32 and prefix == "sk_test_aaaa"
    key, prefix = domain.compose_key("live", "publishable", "b" * 32)
    assert key.startswith("pk_live_") and prefix == "pk_live_bbbb"


def test_currency_and_email_checks():
    assert domain.check_currency_param("usd") == "USD"
    with pytest.raises(InvalidInput) as err:
        domain.check_currency_param("XXX")
    assert err.value.param == "currency"
    with pytest.raises(InvalidInput):
        domain.check_email("not-an-email")
