"""Public API models of payments (request and response shapes; never tables or events)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from billstream_payments.domain import Payment, PaymentMethod


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


class AttachPaymentMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, description="A gateway token, e.g. `tok_visa`")


class CardOut(BaseModel):
    brand: str
    last4: str


class PaymentMethodOut(BaseModel):
    id: str
    object: Literal["payment_method"] = "payment_method"
    customer: str
    type: Literal["card"]
    card: CardOut
    default: bool
    livemode: bool
    created: datetime

    @classmethod
    def of(cls, pm: PaymentMethod) -> PaymentMethodOut:
        return cls(id=pm.payment_method_id, customer=pm.customer_id, type=pm.type,
                   card=CardOut(brand=pm.brand, last4=pm.last4), default=pm.is_default,
                   livemode=pm.environment == "live", created=_utc(pm.created_at))


class PaymentMethodList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PaymentMethodOut]
    has_more: bool


class PaymentOut(BaseModel):
    id: str
    object: Literal["payment"] = "payment"
    invoice: str
    customer: str
    amount: int
    currency: str
    status: Literal["pending", "succeeded", "failed"]
    failure_code: str | None
    failure_message: str | None
    payment_method: str | None
    livemode: bool
    created: datetime

    @classmethod
    def of(cls, p: Payment) -> PaymentOut:
        return cls(id=p.payment_id, invoice=p.invoice_id, customer=p.customer_id,
                   amount=p.amount, currency=p.currency, status=p.status,
                   failure_code=p.failure_code, failure_message=p.failure_message,
                   payment_method=p.payment_method_id, livemode=p.environment == "live",
                   created=_utc(p.created_at))


class PaymentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PaymentOut]
    has_more: bool
