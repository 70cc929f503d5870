"""Event handlers of the `billing` consumer (invoicing's events): payment outcomes move a
subscription between active and past due. Each runs in the consumer's transaction
(`ctx.conn`); the runtime gives exactly-once effect."""

from __future__ import annotations

import structlog

from billstream_contracts.events import InvoicePaid, InvoicePaymentFailed
from billstream_messaging.consumer import EventContext
from billstream_subscription import service

log = structlog.get_logger("billstream.subscription.handlers")


async def on_invoice_payment_failed(ctx: EventContext) -> None:
    data = ctx.data
    if not isinstance(data, InvoicePaymentFailed) or data.invoice.subscription_id is None:
        return
    await service.mark_past_due(
        ctx.conn, ctx.store, tenant_id=ctx.envelope.tenant_id,
        environment=ctx.envelope.environment, subscription_id=data.invoice.subscription_id,
        invoice_id=data.invoice.invoice_id, occurred_at=ctx.envelope.occurred_at,
        cause=ctx.cause,
    )


async def on_invoice_paid(ctx: EventContext) -> None:
    data = ctx.data
    if not isinstance(data, InvoicePaid) or data.invoice.subscription_id is None:
        return
    await service.reactivate(
        ctx.conn, ctx.store, tenant_id=ctx.envelope.tenant_id,
        environment=ctx.envelope.environment, subscription_id=data.invoice.subscription_id,
        invoice_id=data.invoice.invoice_id, occurred_at=ctx.envelope.occurred_at,
        cause=ctx.cause,
    )


HANDLERS = {
    "invoice.payment_failed": on_invoice_payment_failed,
    "invoice.paid": on_invoice_paid,
}
