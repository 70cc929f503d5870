"""Event handlers of the `events` consumer: every public event goes into the public event log
and fans out into deliveries, in the consumer's transaction (no network here: the delivery
worker in tasks.py does the sending)."""

from __future__ import annotations

from billstream_messaging import EventContext, Handler
from billstream_webhook_dispatch import service
from billstream_webhook_dispatch.service import DispatchMetrics


def public_event_handlers(metrics: DispatchMetrics | None = None) -> dict[str, Handler]:
    """A handler per public event type. Types not listed (non-public, unknown) are counted and
    skipped by the consumer runtime; a public type in a version that is not public is counted
    and skipped by the handler."""

    async def on_public_event(ctx: EventContext) -> None:
        await service.record_public_event(ctx.conn, ctx.envelope, metrics)

    return {event_type: on_public_event for event_type in service.public_event_types()}
