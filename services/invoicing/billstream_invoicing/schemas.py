"""Public API models of invoicing (response shapes; never tables or events)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel

from billstream_invoicing.domain import Invoice, decimal_str


def _utc(value: datetime | None) -> datetime | None:
    return value.astimezone(UTC) if value is not None else None


class InvoiceLineOut(BaseModel):
    id: str
    type: Literal["fixed", "usage"]
    description: str
    charge_id: str
    quantity: str
    unit_price: str
    amount: int
    period_start: datetime
    period_end: datetime


class InvoiceOut(BaseModel):
    id: str
    object: Literal["invoice"] = "invoice"
    number: str
    customer: str
    subscription: str | None
    status: Literal["draft", "open", "paid", "void", "uncollectible"]
    currency: str
    lines: list[InvoiceLineOut]
    subtotal: int
    total: int
    amount_due: int
    amount_paid: int
    period_start: datetime
    period_end: datetime
    issued_at: datetime
    paid_at: datetime | None
    livemode: bool
    created: datetime

    @classmethod
    def of(cls, inv: Invoice) -> InvoiceOut:
        return cls(
            id=inv.invoice_id, number=inv.number, customer=inv.customer_id,
            subscription=inv.subscription_id, status=inv.status, currency=inv.currency,
            lines=[
                InvoiceLineOut(
                    id=ln.line_id, type=ln.type, description=ln.description,
                    charge_id=ln.charge_id, quantity=decimal_str(ln.quantity),
                    unit_price=decimal_str(ln.unit_price), amount=ln.amount,
                    period_start=_utc(ln.period_start), period_end=_utc(ln.period_end),
                )
                for ln in inv.lines
            ],
            subtotal=inv.subtotal, total=inv.total, amount_due=inv.amount_due,
            amount_paid=inv.amount_paid, period_start=_utc(inv.period_start),
            period_end=_utc(inv.period_end), issued_at=_utc(inv.issued_at),
            paid_at=_utc(inv.paid_at), livemode=inv.environment == "live",
            created=_utc(inv.created_at),
        )


class InvoiceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[InvoiceOut]
    has_more: bool
