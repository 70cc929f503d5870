"""Invoicing domain: rating plan charges into invoice lines, totals, numbering. No I/O.

Rounding rule
-------------
Each line is computed exactly in `Decimal` — a fixed charge is its amount, a usage line is
`quantity × unit_price` — and rounded **once**, to the currency's minor unit
(`money.exponent`: USD 2, JPY 0, KWD 3), half away from zero (`money.to_minor`, i.e.
ROUND_HALF_UP on the magnitude). Nothing is rounded before the multiplication and no line is
re-rounded afterwards. The subtotal and total are the *sum of the rounded lines*, so a total
always equals the sum of the lines the customer sees, even if that differs by a minor unit
from rounding the unrounded sum.

    1500 × 0.002 USD  = 3.000    → 300 cents
    1 × 0.005 USD     = 0.005    → 1 cent (half away from zero)
    3 × 0.0049 USD    = 0.0147   → 1 cent
    7 × 0.5 JPY       = 3.5      → 4 yen
    3 × 0.0005 KWD    = 0.0015   → 2 fils

Invoices
--------
An invoice is identified for idempotency by `(subscription, period_start, kind)`:

- kind `subscription_create`: the first invoice, the plan's `in_advance` fixed charges for the
  subscription's first period;
- kind `subscription_cycle`: the invoice of an ended period — its usage lines and
  `in_arrears` fixed charges, plus, if the subscription renews, the `in_advance` fixed charges
  of the next period. Its `period_start`/`period_end` are those of the ended period.

Every usage charge of the plan gets a line (quantity 0 when no usage was reported), so the
customer sees each metered item. An invoice with no lines at all is not created. An invoice
with lines whose total is zero is finalized and immediately paid (no payment is attempted).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Literal

from billstream_runtime.money import multiply, parse_decimal, to_minor

InvoiceKind = Literal["subscription_create", "subscription_cycle"]
InvoiceStatus = Literal["draft", "open", "paid", "void", "uncollectible"]
LineType = Literal["fixed", "usage"]

NUMBER_PREFIX = "INV-"
NUMBER_WIDTH = 6
#: `payment_id` of `invoice.paid` for an invoice whose total is zero: nothing was charged.
NO_PAYMENT = "none"


class RatingError(ValueError):
    """The plan or usage cannot be rated (a contract violation, not a transient error)."""


# ---------------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class PlanCharge:
    charge_id: str
    type: LineType
    timing: Literal["in_advance", "in_arrears"]
    amount: Decimal | None = None  # major units, fixed charges
    meter: str | None = None  # usage charges
    unit_price: Decimal | None = None  # major units, usage charges


@dataclass(frozen=True, slots=True)
class Plan:
    plan_id: str
    name: str
    currency: str
    charges: tuple[PlanCharge, ...]


@dataclass(frozen=True, slots=True)
class Period:
    start: datetime
    end: datetime


# ---------------------------------------------------------------------------------- outputs


@dataclass(frozen=True, slots=True)
class LineDraft:
    type: LineType
    description: str
    charge_id: str
    quantity: Decimal
    unit_price: Decimal
    amount: int  # minor units
    period: Period


@dataclass(frozen=True, slots=True)
class InvoiceDraft:
    """What a billing event asks to invoice, before it is numbered and stored."""

    kind: InvoiceKind
    currency: str
    lines: tuple[LineDraft, ...]
    period: Period

    @property
    def subtotal(self) -> int:
        return sum(line.amount for line in self.lines)

    @property
    def total(self) -> int:
        return self.subtotal


@dataclass(frozen=True, slots=True)
class Line:
    line_id: str
    type: LineType
    description: str
    charge_id: str
    quantity: Decimal
    unit_price: Decimal
    amount: int
    period_start: datetime
    period_end: datetime


@dataclass(frozen=True, slots=True)
class Invoice:
    invoice_id: str
    tenant_id: str
    environment: str
    number: str
    kind: InvoiceKind
    customer_id: str
    subscription_id: str | None
    status: InvoiceStatus
    currency: str
    subtotal: int
    total: int
    amount_due: int
    amount_paid: int
    period_start: datetime
    period_end: datetime
    issued_at: datetime
    paid_at: datetime | None
    test_clock_id: str | None
    created_at: datetime
    lines: tuple[Line, ...] = field(default=())

    def mark_paid(self, amount: int, at: datetime) -> Invoice:
        if self.status != "open":
            raise ValueError(f"invoice {self.invoice_id} is {self.status}, not open")
        return replace(self, status="paid", amount_paid=amount, paid_at=at)


# ---------------------------------------------------------------------------------- rating


def line_amount(quantity: Decimal, unit_price: Decimal, currency: str) -> int:
    """`quantity × unit_price` exactly, rounded once to minor units, half away from zero."""
    return to_minor(multiply(quantity, unit_price), currency)


def decimal_str(value: Decimal) -> str:
    """A plain decimal string (never exponent notation): `Decimal('1E+3')` → `'1000'`."""
    return format(value, "f")


def _fixed_line(plan: Plan, charge: PlanCharge, period: Period) -> LineDraft:
    if charge.amount is None:
        raise RatingError(f"fixed charge {charge.charge_id} has no amount")
    qty = Decimal(1)
    return LineDraft(
        type="fixed", description=f"{plan.name}: fixed fee", charge_id=charge.charge_id,
        quantity=qty, unit_price=charge.amount,
        amount=line_amount(qty, charge.amount, plan.currency), period=period,
    )


def _usage_line(plan: Plan, charge: PlanCharge, quantity: Decimal, period: Period) -> LineDraft:
    if charge.unit_price is None:
        raise RatingError(f"usage charge {charge.charge_id} has no unit_price")
    return LineDraft(
        type="usage", description=f"{plan.name}: {charge.meter or charge.charge_id} usage",
        charge_id=charge.charge_id, quantity=quantity, unit_price=charge.unit_price,
        amount=line_amount(quantity, charge.unit_price, plan.currency), period=period,
    )


def fixed_lines(plan: Plan, timing: str, period: Period) -> list[LineDraft]:
    return [_fixed_line(plan, c, period) for c in plan.charges
            if c.type == "fixed" and c.timing == timing]


def first_invoice(plan: Plan, period: Period) -> InvoiceDraft | None:
    """The invoice of a new subscription: `in_advance` fixed charges for its first period."""
    lines = fixed_lines(plan, "in_advance", period)
    if not lines:
        return None
    return InvoiceDraft("subscription_create", plan.currency, tuple(lines), period)


def period_invoice(
    plan: Plan,
    period: Period,
    usage: dict[str, Decimal],
    next_period: Period | None,
) -> InvoiceDraft | None:
    """The invoice of an ended period.

    `usage` maps charge_id → quantity for the period. `next_period` is given when the
    subscription renews: its `in_advance` fixed charges are billed for it."""
    lines: list[LineDraft] = []
    for charge in plan.charges:
        if charge.type == "usage":
            lines.append(_usage_line(plan, charge, usage.get(charge.charge_id, Decimal(0)),
                                     period))
    lines += fixed_lines(plan, "in_arrears", period)
    if next_period is not None:
        lines += fixed_lines(plan, "in_advance", next_period)
    if not lines:
        return None
    return InvoiceDraft("subscription_cycle", plan.currency, tuple(lines), period)


def sum_usage(entries: list[tuple[str, str]]) -> dict[str, Decimal]:
    """charge_id → total quantity from `(charge_id, decimal string)` pairs."""
    totals: dict[str, Decimal] = {}
    for charge_id, quantity in entries:
        totals[charge_id] = totals.get(charge_id, Decimal(0)) + parse_decimal(quantity)
    return totals


# ---------------------------------------------------------------------------------- numbers


def format_number(n: int) -> str:
    """The n-th invoice number of a tenant+environment: `INV-000001`. Wider past 999999."""
    if n < 1:
        raise ValueError("invoice numbers start at 1")
    return f"{NUMBER_PREFIX}{n:0{NUMBER_WIDTH}d}"
