"""Background work of ingestion: expiring idempotency keys past the dedup window."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import structlog

from billstream_ingestion import repository

if TYPE_CHECKING:
    from billstream_messaging import ServiceHost

log = structlog.get_logger("billstream.ingestion.tasks")

#: Kept a day beyond the window: clock skew between hosts never shortens the guarantee.
RETENTION_MARGIN = timedelta(days=1)


async def purge_once(host: ServiceHost, now: datetime | None = None) -> int:
    """Keys received and timestamped before now - window - margin go: any resend of their
    event is older than the window and is rejected as such, never counted again."""
    settings = host.settings
    keep_for = timedelta(days=settings.dedup_window_days) + RETENTION_MARGIN
    cutoff = (now or datetime.now(UTC)) - keep_for
    total = 0
    while True:
        deleted = await repository.purge_expired_keys(host.pool, cutoff, keep_for,
                                                      settings.key_purge_batch)
        total += deleted
        if deleted < settings.key_purge_batch:
            return total


async def purge_keys(host: ServiceHost) -> None:
    """Every `key_purge_interval_s`: delete the keys past the dedup window (and its margin)."""
    while True:
        deleted = await purge_once(host)
        if deleted:
            log.info("idempotency_keys_purged", deleted=deleted)
        await asyncio.sleep(host.settings.key_purge_interval_s)
