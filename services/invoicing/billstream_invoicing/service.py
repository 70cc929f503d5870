"""Invoicing use cases. Each runs in the caller's transaction (a consumer handler's, or one it
opens), writes through the repository and appends its events last.

Business time: an invoice is issued at the business time of the event that caused it (its
envelope's `occurred_at`, a test clock's time in test mode), never the wall clock; `paid_at`
and the `occurred_at` of `invoice.paid` / `invoice.payment_failed` are the business time of
the payment event.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg
import structlog

from billstream_contracts import Envelope
from billstream_contracts.events import (
    InvoiceFinalized,
    InvoiceLine,
    InvoicePaid,
    InvoicePaymentFailed,
    InvoiceSnapshot,
    PaymentFailed,
    PaymentSucceeded,
    PlanSnapshot,
    SubscriptionCreated,
    SubscriptionSnapshot,
    UsagePeriodSummarized,
)
from billstream_invoicing import domain, repository
from billstream_invoicing.domain import Invoice, InvoiceDraft, Period
from billstream_messaging.store import Cause, EventStore, NewEvent
from billstream_runtime.money import parse_decimal

log = structlog.get_logger("billstream.invoicing")


# ---------------------------------------------------------------------------------- mapping


def plan_from_snapshot(plan: PlanSnapshot) -> domain.Plan:
    return domain.Plan(
        plan_id=plan.plan_id, name=plan.name, currency=plan.currency.upper(),
        charges=tuple(
            domain.PlanCharge(
                charge_id=c.charge_id, type=c.type, timing=c.timing,
                amount=parse_decimal(c.amount) if c.amount is not None else None,
                meter=c.meter,
                unit_price=parse_decimal(c.unit_price) if c.unit_price is not None else None,
            )
            for c in plan.charges
        ),
    )


def snapshot(invoice: Invoice) -> InvoiceSnapshot:
    return InvoiceSnapshot(
        invoice_id=invoice.invoice_id, number=invoice.number, customer_id=invoice.customer_id,
        subscription_id=invoice.subscription_id, currency=invoice.currency,
        status=invoice.status,
        lines=[
            InvoiceLine(
                line_id=ln.line_id, type=ln.type, description=ln.description,
                charge_id=ln.charge_id, quantity=domain.decimal_str(ln.quantity),
                unit_price=domain.decimal_str(ln.unit_price), amount=ln.amount,
                period_start=ln.period_start, period_end=ln.period_end,
            )
            for ln in invoice.lines
        ],
        subtotal=invoice.subtotal, total=invoice.total, amount_due=invoice.amount_due,
        amount_paid=invoice.amount_paid, period_start=invoice.period_start,
        period_end=invoice.period_end, issued_at=invoice.issued_at, paid_at=invoice.paid_at,
        test_clock_id=invoice.test_clock_id,
    )


def _event(invoice: Invoice, data, occurred_at: datetime) -> NewEvent:
    return NewEvent(
        data=data, tenant_id=invoice.tenant_id, environment=invoice.environment,
        aggregate_type="invoice", aggregate_id=invoice.invoice_id, occurred_at=occurred_at,
    )


# ---------------------------------------------------------------------------------- issuing


async def invoice_new_subscription(
    conn: asyncpg.Connection, store: EventStore, env: Envelope, data: SubscriptionCreated,
    cause: Cause | None = None,
) -> Invoice | None:
    """`subscription.created` → the first invoice (in-advance fixed charges), if any."""
    sub = data.subscription
    draft = domain.first_invoice(
        plan_from_snapshot(sub.plan), Period(sub.current_period_start, sub.current_period_end)
    )
    return await _issue(conn, store, env, sub, draft, cause)


async def invoice_period(
    conn: asyncpg.Connection, store: EventStore, env: Envelope, data: UsagePeriodSummarized,
    cause: Cause | None = None,
) -> Invoice | None:
    """`usage.period_summarized` → the invoice of the ended period."""
    sub = data.subscription
    plan = plan_from_snapshot(sub.plan)
    known = {c.charge_id for c in plan.charges if c.type == "usage"}
    for u in data.usage:
        if u.charge_id not in known:
            log.warning("usage_for_unknown_charge", subscription_id=sub.subscription_id,
                        charge_id=u.charge_id, quantity=u.quantity)
    next_period = None
    if data.renews:
        if data.next_period_start is None or data.next_period_end is None:
            raise domain.RatingError("a renewing period summary needs next_period_start/end")
        next_period = Period(data.next_period_start, data.next_period_end)
    draft = domain.period_invoice(
        plan, Period(data.period_start, data.period_end),
        domain.sum_usage([(u.charge_id, u.quantity) for u in data.usage]), next_period,
    )
    return await _issue(conn, store, env, sub, draft, cause)


async def _issue(
    conn: asyncpg.Connection, store: EventStore, env: Envelope, sub: SubscriptionSnapshot,
    draft: InvoiceDraft | None, cause: Cause | None,
) -> Invoice | None:
    if draft is None:
        log.info("nothing_to_invoice", subscription_id=sub.subscription_id)
        return None
    issued_at = env.occurred_at
    invoice = await repository.create_invoice(
        conn, draft, tenant_id=env.tenant_id, environment=env.environment,
        customer_id=sub.customer_id, subscription_id=sub.subscription_id, issued_at=issued_at,
        test_clock_id=sub.test_clock_id,
    )
    if invoice is None:
        log.info("already_invoiced", subscription_id=sub.subscription_id, kind=draft.kind,
                 period_start=draft.period.start.isoformat())
        return None
    events = [_event(invoice, InvoiceFinalized(invoice=snapshot(invoice)), issued_at)]
    if invoice.amount_due == 0:
        # Nothing to collect: paid at once, and payments never sees an amount to charge.
        invoice = invoice.mark_paid(0, issued_at)
        await repository.mark_paid(conn, invoice, domain.NO_PAYMENT)
        events.append(_event(
            invoice, InvoicePaid(invoice=snapshot(invoice), payment_id=domain.NO_PAYMENT),
            issued_at,
        ))
    await store.append(conn, events, cause=cause)
    return invoice


# ---------------------------------------------------------------------------------- payments


async def apply_payment_succeeded(
    conn: asyncpg.Connection, store: EventStore, env: Envelope, data: PaymentSucceeded,
    cause: Cause | None = None,
) -> Invoice | None:
    """`payment.succeeded` → the open invoice becomes paid; emits `invoice.paid`."""
    if not await repository.record_payment_outcome(
        conn, payment_id=data.payment_id, outcome="succeeded", invoice_id=data.invoice_id,
        amount=data.amount, failure_code=None, occurred_at=env.occurred_at,
    ):
        return None
    invoice = await repository.get(conn, env.tenant_id, env.environment, data.invoice_id,
                                   for_update=True)
    if invoice is None or invoice.status != "open":
        log.warning("payment_for_unpayable_invoice", invoice_id=data.invoice_id,
                    payment_id=data.payment_id, status=invoice.status if invoice else None)
        return None
    if data.currency.upper() != invoice.currency or data.amount < invoice.amount_due:
        # Payments charges the amount due, so this is a bug somewhere: the payment is recorded
        # above, but an invoice is never marked paid by money that does not cover it.
        log.error("payment_does_not_cover_invoice", invoice_id=invoice.invoice_id,
                  payment_id=data.payment_id, amount=data.amount, currency=data.currency,
                  amount_due=invoice.amount_due, invoice_currency=invoice.currency)
        return None
    paid = invoice.mark_paid(data.amount, env.occurred_at)
    await repository.mark_paid(conn, paid, data.payment_id)
    await store.append(conn, [_event(
        paid, InvoicePaid(invoice=snapshot(paid), payment_id=data.payment_id), env.occurred_at,
    )], cause=cause)
    return paid


async def apply_payment_failed(
    conn: asyncpg.Connection, store: EventStore, env: Envelope, data: PaymentFailed,
    cause: Cause | None = None,
) -> Invoice | None:
    """`payment.failed` → the invoice stays open; emits `invoice.payment_failed`."""
    if not await repository.record_payment_outcome(
        conn, payment_id=data.payment_id, outcome="failed", invoice_id=data.invoice_id,
        amount=data.amount, failure_code=data.failure_code, occurred_at=env.occurred_at,
    ):
        return None
    invoice = await repository.get(conn, env.tenant_id, env.environment, data.invoice_id,
                                   for_update=True)
    if invoice is None or invoice.status != "open":
        log.warning("payment_failure_for_unpayable_invoice", invoice_id=data.invoice_id,
                    payment_id=data.payment_id, status=invoice.status if invoice else None)
        return None
    await store.append(conn, [_event(
        invoice,
        InvoicePaymentFailed(invoice=snapshot(invoice), payment_id=data.payment_id,
                             failure_code=data.failure_code,
                             failure_message=data.failure_message),
        env.occurred_at,
    )], cause=cause)
    return invoice


# ---------------------------------------------------------------------------------- queries


async def get_invoice(pool: asyncpg.Pool, tenant_id: str, environment: str,
                      invoice_id: str) -> Invoice | None:
    async with pool.acquire() as conn:
        return await repository.get(conn, tenant_id, environment, invoice_id)


async def list_invoices(pool: asyncpg.Pool, tenant_id: str, environment: str, **filters
                        ) -> list[Invoice]:
    async with pool.acquire() as conn:
        return await repository.list_invoices(conn, tenant_id, environment, **filters)
