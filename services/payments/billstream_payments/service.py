"""Payments use cases: attach a payment method, record what a finalized invoice asks to
collect, collect it through the gateway, and the queries of the API.

The gateway is never called inside a database transaction: the `invoice.finalized` handler
only records a pending payment (and wakes the collector); `collect_due` leases pending
payments, calls the gateway outside any transaction, then records the outcome and appends its
event in one short transaction.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import structlog

from billstream_contracts import Envelope
from billstream_contracts.events import (
    InvoiceFinalized,
    PaymentFailed,
    PaymentMethodAttached,
    PaymentSucceeded,
)
from billstream_messaging.store import EventStore, NewEvent
from billstream_payments import domain, repository
from billstream_payments.domain import Customer, Gateway, Payment, PaymentMethod
from billstream_runtime.ids import new_id

log = structlog.get_logger("billstream.payments")

#: NOTIFY channel that wakes the collector when a pending payment is recorded.
COLLECT_CHANNEL = "billstream_payments_collect"


# ---------------------------------------------------------------------------------- invoices


async def record_invoice(conn: asyncpg.Connection, env: Envelope, data: InvoiceFinalized
                         ) -> Payment | None:
    """`invoice.finalized` → a pending payment for the amount due (one per invoice)."""
    inv = data.invoice
    if not domain.should_collect(inv.status, inv.amount_due):
        log.info("nothing_to_collect", invoice_id=inv.invoice_id, status=inv.status,
                 amount_due=inv.amount_due)
        return None
    payment = Payment(
        payment_id=new_id("pay"), tenant_id=env.tenant_id, environment=env.environment,
        invoice_id=inv.invoice_id, customer_id=inv.customer_id, amount=inv.amount_due,
        currency=inv.currency, status="pending", created_at=inv.issued_at,
    )
    if not await repository.insert_pending(conn, payment, inv.test_clock_id):
        log.info("invoice_already_has_a_payment", invoice_id=inv.invoice_id)
        return None
    await repository.notify(conn, COLLECT_CHANNEL)
    return payment


# ---------------------------------------------------------------------------------- collecting


async def collect_due(pool: asyncpg.Pool, store: EventStore, gateway: Gateway, *,
                      batch_size: int, lease_s: float, retry_in_s: float) -> int:
    """Collect up to `batch_size` pending payments; returns how many were leased."""
    async with pool.acquire() as conn:
        async with conn.transaction():
            leased = await repository.claim_pending(conn, batch_size, lease_s)
        for payment in leased:
            # Charges run one after another: renew the lease of each right before its charge,
            # so a slow gateway cannot let another collector charge it at the same time.
            if not await repository.renew_lease(conn, payment.payment_id, lease_s):
                log.warning("lease_lapsed", payment_id=payment.payment_id)
                continue
            try:
                await _collect(conn, store, gateway, payment)
            except Exception as exc:  # noqa: BLE001 - a gateway outage: retry after the delay
                log.warning("collect_failed", payment_id=payment.payment_id, error=repr(exc),
                            retry_in_s=retry_in_s)
                await repository.release(conn, payment.payment_id, retry_in_s)
    return len(leased)


async def _collect(conn: asyncpg.Connection, store: EventStore, gateway: Gateway,
                   payment: Payment) -> None:
    method = await repository.default_method(conn, payment.tenant_id, payment.environment,
                                             payment.customer_id)
    result = None
    if method is not None:
        # The payment id is the idempotency key: a retry after a crash cannot charge twice.
        result = await gateway.charge(method.gateway_token, payment.amount, payment.currency,
                                      idempotency_key=payment.payment_id)
    settled = payment.settle(method, result)
    async with conn.transaction():
        if not await repository.settle(conn, settled):
            return  # another collector settled it first
        await store.append(conn, [_outcome_event(settled)])
    log.info("payment_settled", payment_id=settled.payment_id, status=settled.status,
             failure_code=settled.failure_code)


def _outcome_event(p: Payment) -> NewEvent:
    if p.status == "succeeded":
        assert p.payment_method_id is not None
        data = PaymentSucceeded(
            payment_id=p.payment_id, invoice_id=p.invoice_id, customer_id=p.customer_id,
            amount=p.amount, currency=p.currency, payment_method_id=p.payment_method_id,
            created_at=p.created_at,
        )
    else:
        data = PaymentFailed(
            payment_id=p.payment_id, invoice_id=p.invoice_id, customer_id=p.customer_id,
            amount=p.amount, currency=p.currency, payment_method_id=p.payment_method_id,
            failure_code=p.failure_code or "charge_failed",
            failure_message=p.failure_message or "", created_at=p.created_at,
        )
    return NewEvent(data=data, tenant_id=p.tenant_id, environment=p.environment,
                    aggregate_type="payment", aggregate_id=p.payment_id,
                    occurred_at=p.created_at)


# ---------------------------------------------------------------------------------- methods


async def attach_method(pool: asyncpg.Pool, store: EventStore, customer: Customer, token: str,
                        card: domain.Card) -> PaymentMethod:
    """Save a gateway token for a customer; the customer's first method becomes default."""
    async with pool.acquire() as conn, conn.transaction():
        # Lock the customer so that two concurrent first attaches cannot both be default.
        locked = await repository.get_customer(conn, customer.tenant_id, customer.environment,
                                               customer.customer_id, for_update=True)
        assert locked is not None
        created_at = await _business_now(conn, locked)
        pm = PaymentMethod(
            payment_method_id=new_id("pm"), tenant_id=locked.tenant_id,
            environment=locked.environment, customer_id=locked.customer_id,
            gateway_token=token, type="card", brand=card.brand, last4=card.last4,
            is_default=not await repository.has_methods(conn, locked), created_at=created_at,
        )
        await repository.insert_method(conn, pm)
        await store.append(conn, [NewEvent(
            data=PaymentMethodAttached(
                payment_method_id=pm.payment_method_id, customer_id=pm.customer_id,
                type=pm.type, brand=pm.brand, last4=pm.last4, is_default=pm.is_default,
                created_at=pm.created_at,
            ),
            tenant_id=pm.tenant_id, environment=pm.environment, aggregate_type="customer",
            aggregate_id=pm.customer_id, occurred_at=pm.created_at,
        )])
    return pm


async def _business_now(conn: asyncpg.Connection, customer: Customer) -> datetime:
    """The customer's test clock time if it has one (and we know it), else the wall clock."""
    if customer.test_clock_id:
        frozen = await repository.clock_time(conn, customer.test_clock_id)
        if frozen is not None:
            return frozen
    return datetime.now(UTC)


# ---------------------------------------------------------------------------------- projection


async def project_customer(conn: asyncpg.Connection, env: Envelope, *, customer_id: str,
                           test_clock_id: str | None, created_at: datetime) -> None:
    await repository.upsert_customer(conn, customer_id=customer_id, tenant_id=env.tenant_id,
                                     environment=env.environment, test_clock_id=test_clock_id,
                                     created_at=created_at)


async def project_clock(conn: asyncpg.Connection, env: Envelope, *, test_clock_id: str,
                        frozen_time: datetime) -> None:
    await repository.set_test_clock(conn, test_clock_id=test_clock_id, tenant_id=env.tenant_id,
                                    environment=env.environment, frozen_time=frozen_time)


# ---------------------------------------------------------------------------------- queries


async def find_customer(pool: asyncpg.Pool, tenant_id: str, environment: str,
                        customer_id: str) -> Customer | None:
    return await repository.get_customer(pool, tenant_id, environment, customer_id)


async def list_methods(pool: asyncpg.Pool, customer: Customer, *, starting_after: str | None,
                       limit: int) -> list[PaymentMethod]:
    return await repository.list_methods(pool, customer.tenant_id, customer.environment,
                                         customer.customer_id, starting_after=starting_after,
                                         limit=limit)


async def get_payment(pool: asyncpg.Pool, tenant_id: str, environment: str,
                      payment_id: str) -> Payment | None:
    return await repository.get_payment(pool, tenant_id, environment, payment_id)


async def list_payments(pool: asyncpg.Pool, tenant_id: str, environment: str, **filters
                        ) -> list[Payment]:
    return await repository.list_payments(pool, tenant_id, environment, **filters)
