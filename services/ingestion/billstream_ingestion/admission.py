"""Backpressure: when the pipeline falls behind, ingestion says so instead of losing events or
buffering without bound.

Two signals:
- the relay's backlog: accepted events appended to the log but not yet published to
  `billstream.usage.accepted` (`event_log_head.last_seq - relay_state.published_seq`, not
  counting a republish of the whole log after a broker lost its data; read from
  the database so it holds whichever replica leads the relay; cached for a quarter second);
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
        now = time.monotonic()
        if now - self._lag_at > _LAG_TTL_S:
            # new events only: a republish of the whole log (the broker lost its data) is
            # old events, and must not shut intake off until it is done
            self._lag = await self._pool().fetchval(
                "SELECT (SELECT last_seq FROM event_log_head WHERE id = 1)"
                " - (SELECT greatest(published_seq, republish_head) FROM relay_state"
                " WHERE id = 1)")
            self._lag_at = now
        return self._lag

    async def backlogged(self) -> bool:
        return await self.relay_lag() > self._settings.max_relay_lag_events

    @asynccontextmanager
    async def admit(self, events: int):
        """Admit a request of `events` events, or raise Overloaded (503 + Retry-After)."""
        settings = self._settings
        if await self.backlogged():
            raise Overloaded(
                "ingestion_backlogged",
                f"{self._lag} accepted events are waiting to be published (limit "
                f"{settings.max_relay_lag_events}); retry after {settings.retry_after_s} s",
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
