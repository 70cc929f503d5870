"""Transactional append: a state change and the events it produces commit together.

    async with pool.acquire() as conn, conn.transaction():
        ... change the read model / aggregate rows ...
        await store.append(conn, [NewEvent(...)])   # the last statement before commit

The relay publishes after commit; nothing is ever written to Kafka inside a transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import zstandard

from billstream_contracts import Envelope, EventData
from billstream_contracts.topics import service_topic
from billstream_runtime.ids import new_id
from billstream_runtime.telemetry import current_carrier

_COLUMNS = (
    "seq", "id", "topic", "type", "version", "tenant_id", "environment", "aggregate_type",
    "aggregate_id", "occurred_at", "recorded_at", "correlation_id", "causation_id",
    "trace_context", "data", "envelope", "envelope_codec",
)
_COPY_THRESHOLD = 64
#: The append of fewer than _COPY_THRESHOLD events: the head moves and the rows go in, in one
#: statement; returns the first sequence. The envelope is '{"sequence":<seq>,' + the tail
#: encoded in Python (exactly the bytes the COPY path writes), or the tail compressed
#: (`envelope_codec` 'zstd': published_envelope puts the head back).
_APPEND_ONE_STATEMENT = """
WITH head AS (
    UPDATE event_log_head SET last_seq = last_seq + $1 WHERE id = 1
    RETURNING last_seq - $1 AS base
), rows AS (
    SELECT * FROM unnest($4::text[], $5::text[], $6::text[], $7::int[], $8::text[],
                         $9::text[], $10::text[], $11::text[], $12::timestamptz[],
                         $13::text[], $14::text[], $15::text[], $16::bytea[], $17::text[])
           WITH ORDINALITY AS r(id, topic, type, version, tenant_id, environment,
                                aggregate_type, aggregate_id, occurred_at, correlation_id,
                                causation_id, data, tail, codec, n)
), inserted AS (
    INSERT INTO event_log (seq, id, topic, type, version, tenant_id, environment,
                           aggregate_type, aggregate_id, occurred_at, recorded_at,
                           correlation_id, causation_id, trace_context, data, envelope,
                           envelope_codec)
    SELECT head.base + rows.n, rows.id, rows.topic, rows.type, rows.version, rows.tenant_id,
           rows.environment, rows.aggregate_type, rows.aggregate_id, rows.occurred_at, $2,
           rows.correlation_id, rows.causation_id, $3::jsonb, rows.data::jsonb,
           CASE WHEN rows.codec IS NULL
                THEN convert_to('{"sequence":' || (head.base + rows.n) || ',', 'UTF8') || rows.tail
                ELSE rows.tail END,
           rows.codec
      FROM head, rows
)
SELECT base + 1 FROM head
"""


@dataclass(slots=True)
class NewEvent:
    """An event to append. `data` is a model, a dict, or (for a high-volume log that has
    encoded it already) an `orjson.Fragment` holding the data's JSON object."""

    data: EventData | dict[str, Any] | orjson.Fragment
    tenant_id: str
    environment: str
    aggregate_type: str
    aggregate_id: str
    occurred_at: datetime
    type: str | None = None  # taken from `data` when it is an EventData
    version: int | None = None
    topic: str | None = None  # defaults to the store's topic
    correlation_id: str | None = None
    causation_id: str | None = None
    id: str = field(default_factory=lambda: new_id("evt"))

    def resolved(self) -> tuple[str, int, dict[str, Any] | orjson.Fragment]:
        if isinstance(self.data, EventData):
            return (
                self.type or self.data.event_type,
                self.version or self.data.version,
                self.data.model_dump(mode="json"),
            )
        if not self.type:
            raise ValueError("a dict payload needs an explicit event type")
        return self.type, self.version or 1, self.data


@dataclass(frozen=True, slots=True)
class Cause:
    """The event a consumer is handling: events it appends are caused by it and share its
    correlation id."""

    event_id: str
    correlation_id: str | None


#: The codec of envelopes stored compressed (event_log.envelope_codec, migration 0009).
ZSTD = "zstd"
#: zstd's level 1: on usage batches about 0.3 µs per usage and 4.4 times smaller, where
#: PostgreSQL's pglz takes about 3 µs of the server's CPU for 3.3 times (bench/README.md).
_ZSTD_LEVEL = 1
_DECOMPRESSOR = zstandard.ZstdDecompressor()


def published_envelope(seq: int, envelope: bytes, codec: str | None) -> bytes:
    """The envelope JSON that is published for a log row, from its stored `envelope` and
    `envelope_codec` (None: stored as published; 'zstd': its tail compressed, after
    '{"sequence":<seq>,', which is put back)."""
    if codec is None:
        return envelope
    if codec != ZSTD:
        raise ValueError(f"event seq {seq}: unknown envelope codec {codec!r}")
    return b'{"sequence":%d,' % seq + _DECOMPRESSOR.decompress(envelope)


class EventStore:
    """Appends to the service's event log. Each row carries its published envelope, encoded
    once here; `keep_data=False` (a high-volume log) skips the queryable `data` copy, and
    `zstd_min_bytes` stores envelopes of that size and more compressed by zstd, in this
    process, before the log's head lock is taken (the server's own compression, pglz unless
    it was built with lz4, costs ten times the CPU and runs under the lock)."""

    def __init__(self, source: str, topic: str | None = None, *, keep_data: bool = True,
                 zstd_min_bytes: int | None = None) -> None:
        self.source = source
        self.topic = topic or service_topic(source)
        self.channel = f"billstream_outbox_{source}"
        self.keep_data = keep_data
        self.zstd_min_bytes = zstd_min_bytes or None
        self._compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)

    async def append(
        self, conn: asyncpg.Connection, events: Sequence[NewEvent], cause: Cause | None = None,
        *, returning: bool = True,
    ) -> list[Envelope]:
        """Append `events` in the caller's transaction and wake the relay on commit.
        Call it last in the transaction: it takes the log head lock until commit.
        Returns the envelopes as written (an empty list with `returning=False`, which the
        usage hot path uses to skip building them)."""
        if not events:
            return []
        if not conn.is_in_transaction():
            raise RuntimeError("EventStore.append must run inside a transaction")
        n = len(events)
        recorded_at = datetime.now(UTC)
        carrier = current_carrier() or None
        source = self.source
        keep_data = self.keep_data
        zstd_min = self.zstd_min_bytes
        # Everything but the sequence is encoded before the head lock is taken: appends
        # serialize on that lock until commit, so the less done under it, the better.
        prepared = []
        for ev in events:
            etype, version, data = ev.resolved()
            correlation = ev.correlation_id or (cause.correlation_id if cause else None) or ev.id
            causation = ev.causation_id or (cause.event_id if cause else None)
            tail = orjson.dumps({
                "id": ev.id, "type": etype, "version": version, "tenant_id": ev.tenant_id,
                "environment": ev.environment, "occurred_at": ev.occurred_at,
                "recorded_at": recorded_at, "source": source,
                "aggregate_type": ev.aggregate_type, "aggregate_id": ev.aggregate_id,
                "correlation_id": correlation, "causation_id": causation, "data": data,
            }, option=orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC)[1:]
            codec = None
            if zstd_min is not None and len(tail) >= zstd_min:
                tail, codec = self._compressor.compress(tail), ZSTD
            if type(data) is orjson.Fragment and (keep_data or returning):
                data = orjson.loads(data.contents)
            prepared.append((ev, etype, version, data, correlation, causation, tail, codec))
        # NOTIFY is delivered at commit wherever it is sent: sent now, it is one round trip
        # less under the head lock.
        await conn.execute("SELECT pg_notify($1, '')", self.channel)
        if n < _COPY_THRESHOLD:
            # One statement takes the head lock and inserts every row (sequence numbers and
            # envelopes made in SQL): the lock is held for it and the COMMIT only, not for
            # round trips the event loop may be slow to make while busy with other work.
            columns = list(zip(*[
                (ev.id, ev.topic or self.topic, etype, version, ev.tenant_id, ev.environment,
                 ev.aggregate_type, ev.aggregate_id, ev.occurred_at, correlation, causation,
                 data if keep_data else None, tail, codec)
                for ev, etype, version, data, correlation, causation, tail, codec in prepared
            ]))
            first = await conn.fetchval(
                _APPEND_ONE_STATEMENT, n, recorded_at, carrier, *columns[:11],
                [orjson.dumps(d).decode() if d is not None else None for d in columns[11]],
                columns[12], columns[13],
            )
        else:
            last = await conn.fetchval(
                "UPDATE event_log_head SET last_seq = last_seq + $1 WHERE id = 1"
                " RETURNING last_seq", n,
            )
            first = last - n + 1
            rows = [
                (first + offset, ev.id, ev.topic or self.topic, etype, version, ev.tenant_id,
                 ev.environment, ev.aggregate_type, ev.aggregate_id, ev.occurred_at,
                 recorded_at, correlation, causation, carrier, data if keep_data else None,
                 tail if codec else b'{"sequence":%d,' % (first + offset) + tail, codec)
                for offset, (ev, etype, version, data, correlation, causation, tail, codec)
                in enumerate(prepared)
            ]
            await conn.copy_records_to_table("event_log", records=rows, columns=_COLUMNS)
        envelopes = [
            Envelope(
                id=ev.id, type=etype, version=version, tenant_id=ev.tenant_id,
                environment=ev.environment, occurred_at=ev.occurred_at,
                recorded_at=recorded_at, source=source, sequence=first + offset,
                aggregate_type=ev.aggregate_type, aggregate_id=ev.aggregate_id,
                correlation_id=correlation, causation_id=causation, data=data,
            )
            for offset, (ev, etype, version, data, correlation, causation, _tail, _codec)
            in enumerate(prepared)
        ] if returning else []
        return envelopes

