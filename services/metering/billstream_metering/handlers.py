"""Consumers of metering.

- `metering.usage` (billstream.usage.accepted, ingestion's log): one usage row per accepted
  event (ingestion logs them in `usage.batch_accepted` batches), corrected by `usage.voided` / `usage.amended` (see service.correct_usage), and
  `usage.period_closed` recorded as a pending close; `tasks.close_periods` answers it
  with `usage.period_summarized` once every usage event before it in the log is applied. This
  consumer must handle every type ingestion writes to that log: the per-source watermark counts
  the events it applied (see repository.advance_watermark).
- `metering.catalog` (billstream.subscription.events): API keys, customers, meters.
"""

from __future__ import annotations

from billstream_messaging import API_KEY_HANDLERS, EventContext
from billstream_metering import service


def _scope(ctx: EventContext) -> service.Scope:
    return service.Scope(ctx.envelope.tenant_id, ctx.envelope.environment)


async def on_usage_accepted(ctx: EventContext) -> None:
    await service.record_usage(ctx.conn, _scope(ctx), ctx.data, ctx.envelope.sequence)


async def on_usage_batch_accepted(ctx: EventContext) -> None:
    await service.record_usage_batch(ctx.conn, _scope(ctx), ctx.data, ctx.envelope.sequence)


async def on_usage_corrected(ctx: EventContext) -> None:
    await service.correct_usage(ctx.conn, ctx.envelope, ctx.data)


async def on_customer_created(ctx: EventContext) -> None:
    await service.learn_customer(ctx.conn, _scope(ctx), ctx.data)


async def on_meter_created(ctx: EventContext) -> None:
    await service.learn_meter(ctx.conn, _scope(ctx), ctx.data)


async def on_period_closed(ctx: EventContext) -> None:
    await service.record_close(ctx.conn, ctx.envelope)


USAGE_HANDLERS = {
    "usage.accepted": on_usage_accepted,  # logs written before batches
    "usage.batch_accepted": on_usage_batch_accepted,
    "usage.voided": on_usage_corrected,
    "usage.amended": on_usage_corrected,
    "usage.period_closed": on_period_closed,
}
CATALOG_HANDLERS = {
    **API_KEY_HANDLERS,
    "customer.created": on_customer_created,
    "meter.created": on_meter_created,
}

#: Tables each consumer writes: emptied by `rebuild <consumer>`, refilled by replay. The
#: period summaries and which usage they billed (with the last correction each billed row
#: carried) are metering's own state, never emptied.
USAGE_READ_MODEL = ["usage_records", "usage_corrections", "source_watermarks"]
CATALOG_READ_MODEL = ["api_keys", "customers", "meters"]
