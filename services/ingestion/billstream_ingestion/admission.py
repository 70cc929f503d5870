"""Backpressure: when the pipeline falls behind, ingestion says so instead of losing events or
buffering without bound.

Two signals:
- the relay's backlog: the bytes of the log rows appended but not yet published to
  `billstream.usage.accepted` (rows after `relay_state.published_seq`, not counting a
  republish of the whole log after a broker lost its data). Bytes, not rows: a row is a batch
  of up to a thousand usage events or a single event, and bytes are what the relay has to
  move. Read from the database so it holds whichever replica leads the relay; cached for a
  quarter second;
- this process's in-flight events: events of requests being validated and written right now.

HTTP answers 503 `ingestion_backlogged` / `ingestion_busy` with `Retry-After`, before doing any
work (the Idempotency-Key layer releases the key of a 503, so the retry is clean). The Kafka
input pauses its partitions while the backlog is over the limit and resumes below it; the
records wait in the topic, which is what a topic is for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import asynccontextmanager

import asyncpg

from billstream_ingestion.settings import IngestionSettings
from billstream_runtime.errors import ApiError

_LAG_TTL_S = 0.25


class Overloaded(ApiError):
    status = 503

    def __init__(self, code: str, message: str, retry_after_s: int) -> None:
        super().__init__(code, message, status=503,
                         headers={"Retry-After": str(retry_after_s)})


class Admission:
    """`pool` is a callable giving the service's pool (opened after the service is built)."""

    def __init__(self, settings: IngestionSettings, pool: Callable[[], asyncpg.Pool]) -> None:
        self._pool = pool
        self._settings = settings
        self._lag = 0
        self._lag_at = float("-inf")
        self.inflight = 0

    async def relay_lag(self) -> int:
        """Bytes of log rows waiting for the relay."""
        now = time.monotonic()
        if now - self._lag_at > _LAG_TTL_S:
            # new events only: a republish of the whole log (the broker lost its data) is
            # old events, and must not shut intake off until it is done
            # at most the first 250,000 waiting rows are summed: more than enough to tell
            # whether the backlog is over any sensible limit, and a bounded read
            self._lag = await self._pool().fetchval(
                "SELECT coalesce(sum(size), 0) FROM (SELECT coalesce(pg_column_size(envelope),"
                " pg_column_size(data), 0) AS size FROM event_log"
                " WHERE seq > (SELECT greatest(published_seq, republish_head) FROM relay_state"
                " WHERE id = 1) ORDER BY seq LIMIT 250000) waiting")
            self._lag_at = now
        return self._lag

    async def backlogged(self) -> bool:
        return await self.relay_lag() > self._settings.max_relay_lag_bytes

    @asynccontextmanager
    async def admit(self, events: int):
        """Admit a request of `events` events, or raise Overloaded (503 + Retry-After)."""
        settings = self._settings
        if await self.backlogged():
            raise Overloaded(
                "ingestion_backlogged",
                f"{self._lag} bytes of accepted events are waiting to be published (limit "
                f"{settings.max_relay_lag_bytes}); retry after {settings.retry_after_s} s",
                settings.retry_after_s)
        if self.inflight and self.inflight + events > settings.max_inflight_events:
            raise Overloaded(
                "ingestion_busy",
                f"{self.inflight} events are being ingested right now (limit "
                f"{settings.max_inflight_events}); retry after {settings.retry_after_s} s",
                settings.retry_after_s)
        self.inflight += events
        try:
            yield
        finally:
            self.inflight -= events
