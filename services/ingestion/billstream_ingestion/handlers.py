"""Consumer `ingestion.catalog` (billstream.subscription.events): the API keys, customers,
meters and test clocks ingestion needs to validate usage on its own."""

from __future__ import annotations

from billstream_ingestion import repository
from billstream_messaging import API_KEY_HANDLERS, EventContext


async def on_customer_created(ctx: EventContext) -> None:
    d = ctx.data
    await repository.upsert_customer(ctx.conn, ctx.envelope.tenant_id, ctx.envelope.environment,
                                     d.customer_id, d.external_id, d.test_clock_id)


async def on_meter_created(ctx: EventContext) -> None:
    d = ctx.data
    await repository.upsert_meter(ctx.conn, ctx.envelope.tenant_id, ctx.envelope.environment,
                                  d.code, d.meter_id)


async def on_test_clock(ctx: EventContext) -> None:
    d = ctx.data
    await repository.set_clock_time(ctx.conn, ctx.envelope.tenant_id, ctx.envelope.environment,
                                    d.test_clock_id, d.frozen_time)


CATALOG_HANDLERS = {
    **API_KEY_HANDLERS,
    "customer.created": on_customer_created,
    "meter.created": on_meter_created,
    "test_clock.created": on_test_clock,
    "test_clock.advanced": on_test_clock,
}

#: Tables the catalog consumer writes: emptied by `rebuild catalog`, refilled by replay.
CATALOG_READ_MODEL = ["api_keys", "customers", "meters", "test_clocks"]
