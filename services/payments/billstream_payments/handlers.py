"""Event handlers of payments' consumers: thin, each runs in the batch transaction."""

from __future__ import annotations

from billstream_contracts.events import (
    CustomerCreated,
    InvoiceFinalized,
    TestClockAdvanced,
    TestClockCreated,
)
from billstream_messaging import API_KEY_HANDLERS, EventContext
from billstream_payments import service


async def on_customer_created(ctx: EventContext) -> None:
    assert isinstance(ctx.data, CustomerCreated)
    await service.project_customer(ctx.conn, ctx.envelope, customer_id=ctx.data.customer_id,
                                   test_clock_id=ctx.data.test_clock_id,
                                   created_at=ctx.data.created_at)


async def on_test_clock(ctx: EventContext) -> None:
    assert isinstance(ctx.data, TestClockCreated | TestClockAdvanced)
    await service.project_clock(ctx.conn, ctx.envelope, test_clock_id=ctx.data.test_clock_id,
                                frozen_time=ctx.data.frozen_time)


async def on_invoice_finalized(ctx: EventContext) -> None:
    assert isinstance(ctx.data, InvoiceFinalized)
    await service.record_invoice(ctx.conn, ctx.envelope, ctx.data)


#: `directory`: what payments projects from the subscription service (keys, customers, clocks).
DIRECTORY_HANDLERS = {
    **API_KEY_HANDLERS,
    "customer.created": on_customer_created,
    "test_clock.created": on_test_clock,
    "test_clock.advanced": on_test_clock,
}
#: `invoices`: finalized invoices to collect.
INVOICE_HANDLERS = {"invoice.finalized": on_invoice_finalized}
