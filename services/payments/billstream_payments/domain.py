"""Payments domain: payment methods, payments and their outcome, and the gateway port. No I/O.

A payment is recorded `pending` when an invoice is finalized with an amount due, then settled
exactly once, by the collector task, to `succeeded` or `failed`. Failed stays failed: retrying
per a dunning policy is a later feature (it will add attempts, not rewrite this one).

Business time: a payment's `created` and the `occurred_at` of its events are the invoice's
`issued_at` (a test clock's time in test mode), so a customer on a test clock sees invoice and
payment on one coherent timeline.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal, Protocol

PaymentStatus = Literal["pending", "succeeded", "failed"]

PAYMENT_METHOD_MISSING = "payment_method_missing"
PAYMENT_METHOD_MISSING_MESSAGE = "The customer has no default payment method"


class InvalidToken(ValueError):
    """The gateway does not know this token."""


# ---------------------------------------------------------------------------------- gateway port


@dataclass(frozen=True, slots=True)
class Card:
    brand: str
    last4: str


@dataclass(frozen=True, slots=True)
class ChargeResult:
    succeeded: bool
    charge_id: str | None = None  # the gateway's reference
    failure_code: str | None = None
    failure_message: str | None = None


class Gateway(Protocol):
    """A card gateway. Adapters are chosen in bootstrap.py."""

    async def card_for(self, token: str) -> Card:
        """The card a token stands for; raises InvalidToken if the gateway does not know it."""
        ...

    async def charge(self, token: str, amount: int, currency: str,
                     idempotency_key: str) -> ChargeResult:
        """Charge `amount` minor units. Idempotent on `idempotency_key`: a retried call with
        the same key never charges twice and returns the first result."""
        ...


# ---------------------------------------------------------------------------------- entities


@dataclass(frozen=True, slots=True)
class Customer:
    customer_id: str
    tenant_id: str
    environment: str
    test_clock_id: str | None


@dataclass(frozen=True, slots=True)
class PaymentMethod:
    payment_method_id: str
    tenant_id: str
    environment: str
    customer_id: str
    gateway_token: str
    type: Literal["card"]
    brand: str
    last4: str
    is_default: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Payment:
    payment_id: str
    tenant_id: str
    environment: str
    invoice_id: str
    customer_id: str
    amount: int
    currency: str
    status: PaymentStatus
    created_at: datetime  # business time: the invoice's issued_at
    payment_method_id: str | None = None
    failure_code: str | None = None
    failure_message: str | None = None
    gateway_charge_id: str | None = None

    def settle(self, method: PaymentMethod | None, result: ChargeResult | None) -> Payment:
        """The settled payment: failed with `payment_method_missing` when there is no method,
        else as the gateway answered."""
        if self.status != "pending":
            raise ValueError(f"payment {self.payment_id} is already {self.status}")
        if method is None:
            return replace(self, status="failed", failure_code=PAYMENT_METHOD_MISSING,
                           failure_message=PAYMENT_METHOD_MISSING_MESSAGE)
        if result is None:
            raise ValueError("a payment with a method needs the gateway's result")
        if result.succeeded:
            return replace(self, status="succeeded", payment_method_id=method.payment_method_id,
                           gateway_charge_id=result.charge_id)
        return replace(self, status="failed", payment_method_id=method.payment_method_id,
                       gateway_charge_id=result.charge_id,
                       failure_code=result.failure_code or "charge_failed",
                       failure_message=result.failure_message or "The charge failed")


def should_collect(status: str, amount_due: int) -> bool:
    """A finalized invoice is charged only if it is open and something is due."""
    return status == "open" and amount_due > 0
