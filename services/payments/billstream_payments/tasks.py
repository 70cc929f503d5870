"""The collector: charges pending payments outside any consumer transaction."""

from __future__ import annotations

import asyncio

import asyncpg

from billstream_messaging import ServiceHost
from billstream_payments import service
from billstream_payments.settings import PaymentsSettings


async def collect_payments(host: ServiceHost) -> None:
    """Lease pending payments (`FOR UPDATE SKIP LOCKED`, so replicas share the work), charge
    them, record each outcome with its event. Woken by NOTIFY from the `invoice.finalized`
    handler, with a short poll as a fallback (and to pick up expired leases)."""
    settings: PaymentsSettings = host.settings  # type: ignore[assignment]
    assert host.pool is not None
    gateway = host.app.state.gateway
    wake = asyncio.Event()
    listener = await asyncpg.connect(settings.database_url)
    try:
        await listener.add_listener(service.COLLECT_CHANNEL, lambda *_: wake.set())
        while True:
            wake.clear()
            leased = await service.collect_due(
                host.pool, host.store, gateway, batch_size=settings.collect_batch_size,
                lease_s=settings.collect_lease_s, retry_in_s=settings.collect_retry_s,
            )
            if leased:
                continue
            try:
                await asyncio.wait_for(wake.wait(), timeout=settings.collect_poll_interval_s)
            except TimeoutError:
                pass
    finally:
        await listener.close()
