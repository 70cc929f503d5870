"""Subscription domain: tenants and keys, customers, the catalog, test clocks and the
subscription lifecycle. Pure: no I/O, no asyncpg, no FastAPI. Ids and the current time are
passed in, so every rule here is deterministic and unit-tested without a database.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from billstream_runtime.money import MoneyError, check_currency, exponent

Environment = Literal["test", "live"]
KeyKind = Literal["secret", "publishable"]
Interval = Literal["day", "week", "month", "year"]
Aggregation = Literal["sum", "count", "max"]
Status = Literal["active", "past_due", "canceled"]
ChargeType = Literal["fixed", "usage"]
Timing = Literal["in_advance", "in_arrears"]

#: Statuses whose periods keep turning over (a past-due subscription still renews: its
#: usage keeps being billed while dunning runs).
RENEWABLE: frozenset[str] = frozenset({"active", "past_due"})
#: One test-clock advance may renew a subscription at most this many times (all in one
#: transaction); a larger jump is refused rather than writing an unbounded transaction.
MAX_RENEWALS_PER_ADVANCE = 1000
CODE_PATTERN = re.compile(r"^[a-z0-9_.-]{1,64}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class InvalidInput(Exception):
    """A request the rules refuse; `code` and `param` follow the public error shape."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


# ---------------------------------------------------------------- time


def utc(value: datetime) -> datetime:
    """An aware datetime in UTC (naive values are taken to be UTC)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def add_interval(anchor: datetime, interval: Interval, count: int) -> datetime:
    """`anchor` plus `count` intervals in calendar arithmetic. Months and years clamp the day
    to the target month's length (Jan 31 + 1 month = Feb 28, or 29 in a leap year)."""
    if count < 0:
        raise ValueError("count must be >= 0")
    if interval == "day":
        return anchor + timedelta(days=count)
    if interval == "week":
        return anchor + timedelta(weeks=count)
    if interval == "month":
        months = count
    elif interval == "year":
        months = 12 * count
    else:
        raise ValueError(f"unknown interval {interval!r}")
    years, month0 = divmod(anchor.month - 1 + months, 12)
    year, month = anchor.year + years, month0 + 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def period_bounds(
    anchor: datetime, interval: Interval, interval_count: int, index: int
) -> tuple[datetime, datetime]:
    """Start and end of period `index` (0 = the first). Every boundary is computed from the
    anchor, never from the previous end, so a month-end anchor does not drift
    (Jan 31 → Feb 28 → Mar 31, not Mar 28)."""
    return (
        add_interval(anchor, interval, interval_count * index),
        add_interval(anchor, interval, interval_count * (index + 1)),
    )


# ---------------------------------------------------------------- tenants and keys


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    tenant_id: str
    environment: Environment
    kind: KeyKind
    key_hash: str
    key_prefix: str
    created_at: datetime
    revoked_at: datetime | None = None


def key_prefix_for(environment: Environment, kind: KeyKind) -> str:
    return f"{'sk' if kind == 'secret' else 'pk'}_{environment}_"


def compose_key(environment: Environment, kind: KeyKind, token: str) -> tuple[str, str]:
    """The full key (shown once) and its display prefix (`sk_test_abcd`)."""
    prefix = key_prefix_for(environment, kind)
    key = prefix + token
    return key, key[: len(prefix) + 4]


def check_name(value: str, param: str = "name") -> str:
    name = value.strip()
    if not name:
        raise InvalidInput("parameter_invalid", f"{param} must not be empty", param)
    return name


# ---------------------------------------------------------------- customers


@dataclass(frozen=True, slots=True)
class Customer:
    id: str
    tenant_id: str
    environment: Environment
    external_id: str | None
    name: str | None
    email: str | None
    currency: str | None
    test_clock_id: str | None
    metadata: dict[str, Any]
    created_at: datetime


def check_email(email: str | None) -> str | None:
    if email is None:
        return None
    if not _EMAIL.match(email):
        raise InvalidInput("parameter_invalid", f"email: {email!r} is not an email address",
                           "email")
    return email


def check_currency_param(currency: str, param: str = "currency") -> str:
    try:
        return check_currency(currency)
    except MoneyError as exc:
        raise InvalidInput("parameter_invalid", f"{param}: {exc}", param) from exc


def check_code(code: str, param: str = "code") -> str:
    if not CODE_PATTERN.match(code):
        raise InvalidInput(
            "parameter_invalid",
            f"{param} must match ^[a-z0-9_.-]{{1,64}}$ (lowercase letters, digits, '_', '.', '-')",
            param,
        )
    return code


# ---------------------------------------------------------------- catalog


@dataclass(frozen=True, slots=True)
class Meter:
    id: str
    tenant_id: str
    environment: Environment
    code: str
    name: str | None
    aggregation: Aggregation
    field: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ChargeSpec:
    """A charge as requested (amounts already parsed to Decimal, never from a float)."""

    type: ChargeType
    timing: Timing | None = None
    amount: Decimal | None = None
    meter: str | None = None
    model: Literal["per_unit"] | None = None
    unit_price: Decimal | None = None


@dataclass(frozen=True, slots=True)
class Charge:
    charge_id: str
    type: ChargeType
    timing: Timing
    amount: Decimal | None = None  # major units, for fixed charges
    meter: str | None = None  # meter code, for usage charges
    model: Literal["per_unit"] | None = None
    unit_price: Decimal | None = None  # major units per unit

    @property
    def amount_str(self) -> str | None:
        return None if self.amount is None else format(self.amount, "f")

    @property
    def unit_price_str(self) -> str | None:
        return None if self.unit_price is None else format(self.unit_price, "f")


def build_charge(spec: ChargeSpec, index: int, currency: str, charge_id: str) -> Charge:
    """Validate one requested charge and fill its defaults (fixed: in advance; usage: in
    arrears). Params are named `charges[i].field`."""
    p = f"charges[{index}]"
    if spec.type == "fixed":
        for name in ("meter", "model", "unit_price"):
            if getattr(spec, name) is not None:
                raise InvalidInput("parameter_invalid",
                                   f"{p}.{name} is not allowed on a fixed charge", f"{p}.{name}")
        if spec.amount is None:
            raise InvalidInput("parameter_missing", f"{p}.amount is required for a fixed charge",
                               f"{p}.amount")
        amount = _non_negative(spec.amount, f"{p}.amount")
        exp = exponent(currency)
        minor = amount.quantize(Decimal(1).scaleb(-exp))
        if minor != amount:
            raise InvalidInput(
                "parameter_invalid",
                f"{p}.amount has more decimals than {currency} allows ({exp})",
                f"{p}.amount",
            )
        amount = minor
        return Charge(charge_id, "fixed", spec.timing or "in_advance", amount=amount)
    if spec.amount is not None:
        raise InvalidInput("parameter_invalid", f"{p}.amount is not allowed on a usage charge",
                           f"{p}.amount")
    if not spec.meter:
        raise InvalidInput("parameter_missing", f"{p}.meter is required for a usage charge",
                           f"{p}.meter")
    if spec.unit_price is None:
        raise InvalidInput("parameter_missing",
                           f"{p}.unit_price is required for a usage charge", f"{p}.unit_price")
    timing = spec.timing or "in_arrears"
    if timing != "in_arrears":
        raise InvalidInput("parameter_invalid",
                           f"{p}.timing: usage is measured over the period, so it is billed"
                           " in_arrears", f"{p}.timing")
    return Charge(charge_id, "usage", timing, meter=spec.meter, model=spec.model or "per_unit",
                  unit_price=_non_negative(spec.unit_price, f"{p}.unit_price"))


#: Prices beyond this (in major units) or with more decimals than this are refused: every
#: amount an invoice can compute from them fits the ledger (see billstream_runtime.money).
MAX_PRICE = Decimal(10) ** 12
MAX_PRICE_DECIMALS = 12


def _non_negative(value: Decimal, param: str) -> Decimal:
    if not value.is_finite() or value < 0:
        raise InvalidInput("parameter_invalid", f"{param} must be a decimal number >= 0", param)
    if value > MAX_PRICE:
        raise InvalidInput("parameter_invalid", f"{param} must be at most {MAX_PRICE:,}", param)
    if -value.as_tuple().exponent > MAX_PRICE_DECIMALS:
        raise InvalidInput("parameter_invalid",
                           f"{param} may have at most {MAX_PRICE_DECIMALS} decimals", param)
    return value


@dataclass(frozen=True, slots=True)
class Plan:
    id: str
    tenant_id: str
    environment: Environment
    code: str
    name: str
    currency: str
    interval: Interval
    interval_count: int
    charges: tuple[Charge, ...]
    created_at: datetime


def check_interval_count(count: int) -> int:
    if count < 1 or count > 365:
        raise InvalidInput("parameter_invalid", "interval_count must be between 1 and 365",
                           "interval_count")
    return count


# ---------------------------------------------------------------- test clocks


@dataclass(frozen=True, slots=True)
class TestClock:
    __test__ = False  # not a pytest test class

    id: str
    tenant_id: str
    environment: Environment
    name: str | None
    frozen_time: datetime
    status: Literal["ready"]
    created_at: datetime

    def advanced_to(self, frozen_time: datetime) -> TestClock:
        """The clock moved forward; time never goes back nor stands still."""
        target = utc(frozen_time)
        if target <= self.frozen_time:
            raise InvalidInput(
                "parameter_invalid",
                "frozen_time must be later than the clock's current frozen_time "
                f"({self.frozen_time.isoformat()})",
                "frozen_time",
            )
        return replace(self, frozen_time=target)


def require_test_mode(environment: Environment, what: str = "Test clocks",
                      param: str | None = None) -> None:
    if environment != "test":
        raise InvalidInput("test_mode_only", f"{what} are only available in test mode", param)


# ---------------------------------------------------------------- subscriptions


@dataclass(frozen=True, slots=True)
class Subscription:
    id: str
    tenant_id: str
    environment: Environment
    customer_id: str
    customer_external_id: str | None
    plan: Plan
    status: Status
    started_at: datetime
    period_index: int  # how many periods have ended; the current one is period_index
    current_period_start: datetime
    current_period_end: datetime
    test_clock_id: str | None
    created_at: datetime

    @classmethod
    def start(cls, *, subscription_id: str, customer: Customer, plan: Plan,
              now: datetime) -> Subscription:
        if customer.currency is not None and customer.currency != plan.currency:
            raise InvalidInput(
                "currency_mismatch",
                f"The customer's currency is {customer.currency} but the plan is priced in "
                f"{plan.currency}",
                "plan",
            )
        start = utc(now)
        _, end = period_bounds(start, plan.interval, plan.interval_count, 0)
        return cls(
            id=subscription_id, tenant_id=customer.tenant_id, environment=customer.environment,
            customer_id=customer.id, customer_external_id=customer.external_id, plan=plan,
            status="active", started_at=start, period_index=0, current_period_start=start,
            current_period_end=end, test_clock_id=customer.test_clock_id, created_at=start,
        )

    def next_period(self) -> Subscription:
        index = self.period_index + 1
        start, end = period_bounds(self.started_at, self.plan.interval,
                                   self.plan.interval_count, index)
        return replace(self, period_index=index, current_period_start=start,
                       current_period_end=end)

    def marked_past_due(self) -> Subscription | None:
        """Past due after a failed payment; None when nothing changes."""
        return replace(self, status="past_due") if self.status == "active" else None

    def reactivated(self) -> Subscription | None:
        """Active again once a past-due subscription's invoice is paid; None otherwise."""
        return replace(self, status="active") if self.status == "past_due" else None


@dataclass(frozen=True, slots=True)
class Renewal:
    """One period boundary crossed: `ended` is the subscription as it was during the period
    that ended, `renewed` the subscription in its next period."""

    ended: Subscription
    renewed: Subscription

    @property
    def boundary(self) -> datetime:
        return self.ended.current_period_end


@dataclass(frozen=True, slots=True)
class RenewalPlan:
    renewals: list[Renewal] = field(default_factory=list)
    complete: bool = True  # False when `limit` stopped it before `now`

    @property
    def final(self) -> Subscription | None:
        return self.renewals[-1].renewed if self.renewals else None


def plan_renewals(sub: Subscription, now: datetime, limit: int | None = None) -> RenewalPlan:
    """Every boundary `sub` crosses up to `now` (a period ending exactly at `now` has ended),
    in order; at most `limit` of them."""
    renewals: list[Renewal] = []
    current = sub
    while current.status in RENEWABLE and current.current_period_end <= now:
        if limit is not None and len(renewals) >= limit:
            return RenewalPlan(renewals, complete=False)
        nxt = current.next_period()
        renewals.append(Renewal(current, nxt))
        current = nxt
    return RenewalPlan(renewals)


def renewals_in_order(plans: Sequence[RenewalPlan]) -> list[Renewal]:
    """Renewals of several subscriptions merged in time order (ties by subscription id), so
    that a clock jump replays history as it would have happened."""
    merged = [r for p in plans for r in p.renewals]
    return sorted(merged, key=lambda r: (r.boundary, r.ended.id, r.ended.period_index))


def plan_clock_advance(
    subs: Sequence[Subscription], now: datetime, max_per_subscription: int = MAX_RENEWALS_PER_ADVANCE
) -> list[Renewal]:
    """All renewals a test clock jump to `now` implies, in time order. Refuses a jump that
    would renew one subscription more than `max_per_subscription` times."""
    plans = []
    for sub in subs:
        plan = plan_renewals(sub, now, limit=max_per_subscription)
        if not plan.complete:
            raise InvalidInput(
                "parameter_invalid",
                f"frozen_time is too far ahead: subscription {sub.id} would renew more than "
                f"{max_per_subscription} times; advance in smaller steps",
                "frozen_time",
            )
        plans.append(plan)
    return renewals_in_order(plans)
