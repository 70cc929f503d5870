"""Consumer `ingestion.catalog` (billstream.subscription.events): the API keys, customers,
meters and test clocks ingestion needs to validate usage on its own, and the period ends it
orders behind the usage it accepted (`usage.period_closed`)."""

from __future__ import annotations

from billstream_contracts.events import UsagePeriodClosed
from billstream_ingestion import repository
from billstream_messaging import API_KEY_HANDLERS, EventContext, NewEvent


async def on_customer_created(ctx: EventContext) -> None:
    d = ctx.data
    await repository.upsert_customer(ctx.conn, ctx.envelope.tenant_id, ctx.envelope.environment,
                                     d.customer_id, d.external_id, d.test_clock_id)
    await repository.bump_catalog_version(ctx.conn, ctx.envelope.tenant_id,
                                          ctx.envelope.environment)


async def on_meter_created(ctx: EventContext) -> None:
    d = ctx.data
    await repository.upsert_meter(ctx.conn, ctx.envelope.tenant_id, ctx.envelope.environment,
                                  d.code, d.meter_id)
    await repository.bump_catalog_version(ctx.conn, ctx.envelope.tenant_id,
                                          ctx.envelope.environment)


async def on_test_clock(ctx: EventContext) -> None:
    d = ctx.data
    await repository.set_clock_time(ctx.conn, ctx.envelope.tenant_id, ctx.envelope.environment,
                                    d.test_clock_id, d.frozen_time)
    await repository.bump_catalog_version(ctx.conn, ctx.envelope.tenant_id,
                                          ctx.envelope.environment)


async def on_period_ended(ctx: EventContext) -> None:
    """Append `usage.period_closed` to the accepted-usage log. Usage acknowledged before this
    commit has a lower sequence in the log, so metering can wait for all of it before it
    summarizes the period (see UsagePeriodClosed)."""
    d = ctx.data
    if await repository.close_recorded(ctx.conn, ctx.envelope.tenant_id,
                                       ctx.envelope.environment,
                                       d.subscription.subscription_id, d.period_end):
        return  # a replay (rebuild of this consumer): the close is in the log already
    closed = UsagePeriodClosed(
        subscription=d.subscription, period_start=d.period_start, period_end=d.period_end,
        renews=d.renews, next_period_start=d.next_period_start,
        next_period_end=d.next_period_end,
    )
    [written] = await ctx.store.append(ctx.conn, [NewEvent(
        data=closed, tenant_id=ctx.envelope.tenant_id, environment=ctx.envelope.environment,
        aggregate_type="customer", aggregate_id=d.subscription.customer_id,
        occurred_at=d.period_end,
    )], cause=ctx.cause)
    # remembered so that a correction can tell whether this close already billed an event
    await repository.record_close(
        ctx.conn, written.id, written.sequence, ctx.envelope.tenant_id,
        ctx.envelope.environment, d.subscription.subscription_id, d.subscription.customer_id,
        d.subscription.customer_external_id, d.period_end)


CATALOG_HANDLERS = {
    **API_KEY_HANDLERS,
    "customer.created": on_customer_created,
    "meter.created": on_meter_created,
    "test_clock.created": on_test_clock,
    "test_clock.advanced": on_test_clock,
    "subscription.period_ended": on_period_ended,
}

#: Tables the catalog consumer writes: emptied by `rebuild catalog`, refilled by replay.
CATALOG_READ_MODEL = ["api_keys", "customers", "meters", "test_clocks", "catalog_versions"]
# period_closes is not emptied by a rebuild: it records what this service appended to its own
# log, so a replay of subscription.period_ended does not append the close again.
