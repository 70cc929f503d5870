"""Background task of metering: close billing periods once their usage is all applied."""

from __future__ import annotations

import asyncio

from billstream_messaging import ServiceHost
from billstream_metering import service


async def close_periods(host: ServiceHost) -> None:
    """Summarize pending period closes as soon as the usage before them is applied."""
    consumer = f"{host.name}.usage"
    while True:
        closed = await service.close_due_periods(host.pool, host.store, consumer)
        if not closed:
            await asyncio.sleep(host.settings.close_poll_interval_s)
