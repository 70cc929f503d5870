"""Consumers of metering.

- `metering.usage` (billstream.usage.accepted): one usage row per accepted event.
- `metering.catalog` (billstream.subscription.events): API keys, customers, meters, and
  `subscription.period_ended`, answered with `usage.period_summarized`.
"""

from __future__ import annotations

from billstream_messaging import API_KEY_HANDLERS, EventContext
from billstream_metering import service


def _scope(ctx: EventContext) -> service.Scope:
    return service.Scope(ctx.envelope.tenant_id, ctx.envelope.environment)


async def on_usage_accepted(ctx: EventContext) -> None:
    await service.record_usage(ctx.conn, _scope(ctx), ctx.data)


async def on_customer_created(ctx: EventContext) -> None:
    await service.learn_customer(ctx.conn, _scope(ctx), ctx.data)


async def on_meter_created(ctx: EventContext) -> None:
    await service.learn_meter(ctx.conn, _scope(ctx), ctx.data)


async def on_period_ended(ctx: EventContext) -> None:
    await service.summarize_period(ctx.conn, ctx.store, _scope(ctx), ctx.data, ctx.cause)


USAGE_HANDLERS = {"usage.accepted": on_usage_accepted}
CATALOG_HANDLERS = {
    **API_KEY_HANDLERS,
    "customer.created": on_customer_created,
    "meter.created": on_meter_created,
    "subscription.period_ended": on_period_ended,
}

#: Tables each consumer writes: emptied by `rebuild <consumer>`, refilled by replay. The
#: period summaries and which usage they billed are metering's own state, never emptied.
USAGE_READ_MODEL = ["usage_records"]
CATALOG_READ_MODEL = ["api_keys", "customers", "meters"]
