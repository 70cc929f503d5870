"""The consumer runtime: applies events with exactly-once effect.

For each consumed batch, in one Postgres transaction:
  1. insert an inbox row per event (`ON CONFLICT DO NOTHING RETURNING`): the events that come
     back are new, the rest are duplicates (a counted no-op);
  2. run the handler of each new event inside a savepoint, with the connection, so its
     read-model changes and any events it appends commit with the inbox rows;
  3. commit, and only then commit the Kafka offsets (manual ack).

Failures:
- A handler that raises rolls the whole batch back; the batch is retried after a backoff taken
  outside any transaction. After `consumer_max_attempts` failures of the same event, the batch
  is applied once more with that event sent to `billstream.dlq` (reason in the headers, a row
  in `dead_letters`, the inbox marking it dead-lettered), so the partition moves on.
- Database, network and broker failures are not the message's fault (`TRANSIENT_ERRORS`): the
  batch is retried until they pass, never dead-lettered, and nothing is acknowledged meanwhile.
- Anything else that escapes seeks the consumer back to the batch's first records (nack) before
  re-raising, so a later acknowledgement can never commit past an unapplied record.
Event types the consumer has no handler for are counted and skipped (recorded as `skipped` in
the inbox, so per-source progress has no holes; a later version that handles the type applies
them when they come again).

A record whose value is not an envelope is dead-lettered too. The relay names the event in
the record's headers (`event_id`, `event_source`, `event_sequence`: `log_position`), so such a
record still takes its inbox row (`dead_lettered`; `skipped` if its `event_type` is one this
consumer does not handle, as when readable): the source's progress has no hole that nothing
explains, a redelivery is a duplicate, and `redrive` retries it. A record without them (not
written by a relay), or whose headers do not fit, is dead-lettered with no inbox row; so is a
readable envelope whose id, source or sequence no inbox row could hold (`misfit`), rather
than stop its partition.

A dead-lettered event is not applied: per-source progress stops at it (metering holds the
period closes after it). Once the cause is fixed, `redrive` applies the consumer's
dead-lettered events again through the same path (the service's `redrive CONSUMER` command).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

import asyncpg
import structlog
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from aiokafka.structs import ConsumerRecord
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from billstream_contracts import Envelope, EventData, parse_data
from billstream_contracts.topics import DEAD_LETTER
from billstream_messaging.store import Cause, EventStore
from billstream_runtime.metrics import Metrics
from billstream_runtime.settings import ServiceSettings
from billstream_runtime.telemetry import context_from_carrier

#: Failures of the infrastructure, not of the message: retried until they pass.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    KafkaError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.OperatorInterventionError,  # query cancelled, admin shutdown, crash shutdown
    asyncpg.InsufficientResourcesError,  # disk full, out of memory, too many connections
    asyncpg.ReadOnlySQLTransactionError,  # a failover left us on a replica
    asyncpg.LockNotAvailableError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
)


@dataclass(frozen=True, slots=True)
class LogPosition:
    """Which event a record carries, from the headers the relay writes (record_headers)."""

    event_id: str
    event_type: str | None
    source: str
    sequence: int

    def headers(self) -> list[tuple[str, bytes]]:
        return [("event_id", self.event_id.encode()), ("event_source", self.source.encode()),
                ("event_sequence", str(self.sequence).encode()),
                *([("event_type", self.event_type.encode())] if self.event_type else [])]


_POSITION_HEADERS = frozenset(("event_id", "event_source", "event_sequence", "event_type"))


def log_position(rec: ConsumerRecord) -> LogPosition | None:
    """The event a record carries according to its headers; None without them (a record not
    written by a relay), when they do not make sense, or for a record with no value (a
    tombstone: nothing a dead letter could keep, hold for or redrive). Never raises: it reads
    records that could not be read otherwise."""
    if rec.value is None:
        return None
    headers: dict[str, str | None] = {}
    for name, value in rec.headers or ():
        if name in _POSITION_HEADERS:
            headers[name] = _fitting_text(value)
    event_id, source, sequence = (headers.get("event_id"), headers.get("event_source"),
                                  headers.get("event_sequence"))
    if not event_id or not source or not sequence:
        return None
    if not (sequence.isascii() and sequence.isdigit() and len(sequence) <= 19):
        return None
    if not 1 <= int(sequence) < 2**63:  # a bigint
        return None
    # (the type only picks dead-lettered or skipped: an odd one costs the event nothing)
    return LogPosition(event_id, headers.get("event_type"), source, int(sequence))


def _fitting_text(value: object) -> str | None:
    """A header value as text that fits an inbox column, else None."""
    if type(value) is not bytes:
        return None
    try:
        text = value.decode()
    except UnicodeDecodeError:
        return None
    return text if text and len(text) <= 255 and "\x00" not in text else None


def misfit(env: Envelope) -> str | None:
    """Why a readable envelope cannot be recorded (the inbox and `dead_letters` hold its id,
    source, sequence and type: text without NUL, a bigint), or None. Only a producer other
    than a relay could write one; it is dead-lettered as malformed rather than stop its
    partition."""
    if env.sequence >= 2**63:
        return f"sequence {env.sequence} is past a bigint"
    for field in ("id", "source", "type"):
        if "\x00" in getattr(env, field):
            return f"{field} holds a NUL character"
    return None


async def unapplied_dead_letters(conn: asyncpg.Connection | asyncpg.Pool, consumer: str,
                                 source: str | None = None) -> list[asyncpg.Record]:
    """The events `consumer` dead-lettered and has not applied since (their inbox row still
    `dead_lettered`; of `source` only, if given), in the order they were consumed: the
    latest dead letter of each (`id`, `event_id`, `event_type`, `topic`, `partition`,
    `offset`) with the event's `source` and `sequence`. Few, if any: read from
    `dead_letters`, each inbox row by its primary key."""
    return await conn.fetch(
        """
        SELECT * FROM (
            SELECT DISTINCT ON (d.event_id) d.id, d.event_id, d.event_type, d.topic,
                   d.partition, d."offset", i.source, i.sequence
              FROM dead_letters d
              JOIN LATERAL (SELECT status, source, sequence FROM inbox
                             WHERE consumer = d.consumer AND event_id = d.event_id) i ON true
             WHERE d.consumer = $1 AND d.payload IS NOT NULL AND i.status = 'dead_lettered'
               AND ($2::text IS NULL OR i.source = $2)
             ORDER BY d.event_id, d.id DESC) latest
         ORDER BY topic, partition, "offset"
        """,
        consumer, source,
    )


async def dead_letter_payloads(conn: asyncpg.Connection | asyncpg.Pool,
                               ids: list[int]) -> dict[int, bytes]:
    """The records' values kept with these dead letters, by dead letter id."""
    return {r["id"]: r["payload"] for r in await conn.fetch(
        "SELECT id, payload FROM dead_letters WHERE id = ANY($1::bigint[])", ids)}


class _HandlerFailed(Exception):
    def __init__(self, event_id: str, event_type: str, error: BaseException) -> None:
        super().__init__(f"{event_type} {event_id}: {error!r}")
        self.event_id = event_id
        self.event_type = event_type
        self.error = error


@dataclass(slots=True)
class EventContext:
    """What a handler gets: the event, its parsed data model, and the open transaction."""

    conn: asyncpg.Connection
    envelope: Envelope
    data: EventData | None
    store: EventStore

    @property
    def cause(self) -> Cause:
        return Cause(self.envelope.id, self.envelope.correlation_id)


Handler = Callable[[EventContext], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Redriven:
    """What `EventConsumer.redrive` did."""

    applied: int  # or skipped: this version has no handler for its type any more
    dead_lettered_again: int


class EventConsumer:
    """One logical consumer (its own consumer group) over one or more topics."""

    def __init__(
        self,
        *,
        name: str,
        topics: Iterable[str],
        handlers: Mapping[str, Handler],
        settings: ServiceSettings,
        metrics: Metrics,
        store: EventStore,
    ) -> None:
        self.name = f"{settings.service_name}.{name}"
        self.topics = tuple(topics)
        self.handlers = dict(handlers)
        self._settings = settings
        self._metrics = metrics
        self._store = store
        self._pool: asyncpg.Pool | None = None
        self._broker: KafkaBroker | None = None
        self._log = structlog.get_logger("billstream.consumer").bind(consumer=self.name)
        self._tracer = trace.get_tracer("billstream.consumer")
        self.generation = 1
        self.batches = 0

    @property
    def group_id(self) -> str:
        return f"{self._settings.consumer_group_prefix}.{self.name}.g{self.generation}"

    async def attach(self, broker: KafkaBroker, pool: asyncpg.Pool) -> None:
        """Register the subscriber on `broker` (before the broker starts)."""
        self._pool = pool
        self._broker = broker
        await pool.execute(
            "INSERT INTO consumer_state (consumer) VALUES ($1) ON CONFLICT DO NOTHING", self.name
        )
        self.generation = await pool.fetchval(
            "SELECT generation FROM consumer_state WHERE consumer = $1", self.name
        )
        subscriber = broker.subscriber(
            *self.topics,
            group_id=self.group_id,
            batch=True,
            max_records=self._settings.consumer_max_records,
            batch_timeout_ms=100,
            ack_policy=AckPolicy.MANUAL,
            auto_offset_reset="earliest",
            max_poll_interval_ms=600_000,
            session_timeout_ms=self._settings.consumer_session_timeout_ms,
            heartbeat_interval_ms=self._settings.consumer_heartbeat_interval_ms,
        )
        subscriber(self._on_batch)

    async def _on_batch(self, _bodies: list[bytes], message: KafkaMessage) -> None:
        raw = message.raw_message
        records: tuple[ConsumerRecord, ...] = raw if isinstance(raw, tuple) else (raw,)
        try:
            await self.apply(records)
        except BaseException as exc:
            # Never leave the consumer's position past records that were not applied: a later
            # ack commits the current position.
            await message.nack()
            if not isinstance(exc, asyncio.CancelledError):
                self._log.error("batch_failed", error=repr(exc), records=len(records))
                await asyncio.sleep(1.0)
            raise
        await message.ack()
        self.batches += 1

    # -- applying ----------------------------------------------------------------------------
    async def apply(self, records: Iterable[ConsumerRecord], *,
                    retake: tuple[str, ...] = ("skipped",)) -> None:
        """Apply a batch with exactly-once effect; retries transient failures until they pass,
        dead-letters an event whose handler keeps failing. An event whose inbox row has a
        status in `retake` is applied as new (`skipped`: a type this version now handles;
        `redrive` adds `dead_lettered`); any other row makes it a duplicate."""
        parsed: list[tuple[ConsumerRecord, Envelope]] = []
        malformed: list[tuple[ConsumerRecord, LogPosition | None, str]] = []
        for rec in records:
            try:
                env = Envelope.model_validate_json(rec.value)
            except (ValidationError, ValueError, TypeError) as exc:
                malformed.append((rec, log_position(rec), f"malformed envelope: {exc}"))
                continue
            why = misfit(env)
            if why is None:
                parsed.append((rec, env))
            else:
                malformed.append((rec, log_position(rec), f"malformed envelope: {why}"))
        attempts: dict[str, int] = {}
        poison: dict[str, str] = {}
        backoff = self._settings.consumer_retry_backoff_s
        while True:
            try:
                with self._metrics.consumer_batch.labels(self.name).time():
                    await self._apply_once(parsed, malformed, poison, retake)
                return
            except _HandlerFailed as failed:
                n = attempts[failed.event_id] = attempts.get(failed.event_id, 0) + 1
                self._log.warning("handler_failed", event_id=failed.event_id,
                                  type=failed.event_type, attempt=n, error=repr(failed.error))
                if n >= self._settings.consumer_max_attempts:
                    poison[failed.event_id] = f"handler failed: {failed.error!r}"
                else:
                    await asyncio.sleep(self._settings.consumer_retry_backoff_s * n)
            except TRANSIENT_ERRORS as exc:
                self._log.warning("consumer_transient_error", error=repr(exc), retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _apply_once(self, parsed, malformed, poison: dict[str, str],
                          retake: tuple[str, ...]) -> None:
        assert self._pool is not None
        outcomes: dict[str, int] = {}
        async with self._pool.acquire() as conn, conn.transaction():
            readable = {env.id for _, env in parsed}
            # events of types this consumer has no handler for, readable or not: skipped
            skipped = {env.id: (env.source, env.sequence) for _, env in parsed
                       if env.type not in self.handlers}
            for rec, position, reason in malformed:
                if position is not None and position.event_id in readable:
                    position = None  # headers that name another record's event: not its own
                if (position is not None and position.event_type is not None
                        and position.event_type not in self.handlers):
                    skipped[position.event_id] = (position.source, position.sequence)
                    continue
                if position is not None and not await conn.fetchval(
                    """
                    INSERT INTO inbox (consumer, event_id, source, sequence, status)
                    VALUES ($1, $2, $3, $4, 'dead_lettered')
                    ON CONFLICT (consumer, event_id) DO UPDATE
                       SET status = 'dead_lettered', processed_at = now()
                     WHERE inbox.status = ANY($5::text[])
                    RETURNING true
                    """,
                    self.name, position.event_id, position.source, position.sequence,
                    list(retake),
                ):
                    outcomes["duplicate"] = outcomes.get("duplicate", 0) + 1
                    continue
                event_id, event_type = ((position.event_id, position.event_type) if position
                                        else (None, None))
                await self._dead_letter(conn, rec, event_id, event_type, reason)
                outcomes["dead_lettered"] = outcomes.get("dead_lettered", 0) + 1
            handled = [(rec, env) for rec, env in parsed if env.type in self.handlers]
            if skipped:
                outcomes["unknown_type"] = len(skipped)
                await conn.execute(
                    """
                    INSERT INTO inbox (consumer, event_id, source, sequence, status)
                    SELECT $1, e.id, e.source, e.seq, 'skipped'
                      FROM unnest($2::text[], $3::text[], $4::bigint[]) AS e(id, source, seq)
                    ON CONFLICT (consumer, event_id) DO UPDATE
                       SET status = 'skipped', processed_at = now()
                     WHERE inbox.status = ANY($5::text[]) AND inbox.status <> 'skipped'
                    """,
                    self.name, list(skipped), [src for src, _ in skipped.values()],
                    [seq for _, seq in skipped.values()], list(retake),
                )
            new_ids: set[str] = set()
            if handled:
                # one row per event: a batch may hold the same event twice (a redelivery)
                distinct = list({env.id: env for _, env in handled}.values())
                rows = await conn.fetch(
                    """
                    INSERT INTO inbox (consumer, event_id, source, sequence, status)
                    SELECT $1, e.id, e.source, e.seq, 'applied'
                      FROM unnest($2::text[], $3::text[], $4::bigint[]) AS e(id, source, seq)
                    ON CONFLICT (consumer, event_id) DO UPDATE
                       SET status = 'applied', processed_at = now()
                     WHERE inbox.status = ANY($5::text[])
                    RETURNING event_id
                    """,
                    self.name,
                    [e.id for e in distinct],
                    [e.source for e in distinct],
                    [e.sequence for e in distinct],
                    list(retake),
                )
                new_ids = {r["event_id"] for r in rows}
            for rec, env in handled:
                if env.id not in new_ids:
                    outcomes["duplicate"] = outcomes.get("duplicate", 0) + 1
                    continue
                new_ids.discard(env.id)  # the same event twice in one batch applies once
                if env.id in poison:
                    await self._dead_letter(conn, rec, env.id, env.type, poison[env.id])
                    await conn.execute(
                        "UPDATE inbox SET status = 'dead_lettered'"
                        " WHERE consumer = $1 AND event_id = $2", self.name, env.id,
                    )
                    outcomes["dead_lettered"] = outcomes.get("dead_lettered", 0) + 1
                    continue
                await self._apply_event(conn, rec, env)
                outcomes["applied"] = outcomes.get("applied", 0) + 1
        for outcome, n in outcomes.items():
            self._metrics.events_consumed.labels(self.name, outcome).inc(n)

    async def redrive(self, pool: asyncpg.Pool, broker: KafkaBroker) -> Redriven:
        """Apply again every event this consumer dead-lettered and has not applied since (its
        inbox row still `dead_lettered`), from the payload kept in `dead_letters`, in the order
        it was consumed, through `apply`: what applies now commits with its inbox row; what
        fails again is dead-lettered again (a new `dead_letters` row and DLQ record). Run it
        once the cause is fixed; running it again finds nothing left, or what still fails.
        A record that was not an envelope is tried again too when the relay named its event
        (log_position); one that was not from a relay cannot be redriven and is not counted.
        Safe beside the running consumer: it works on a copy bound to `pool` and `broker`."""
        bound = copy.copy(self)
        bound._pool, bound._broker = pool, broker
        return await bound._redrive(pool)

    async def _redrive(self, pool: asyncpg.Pool) -> Redriven:
        # which, then their payloads a page at a time: a usage batch's is up to 256 KiB
        rows = await unapplied_dead_letters(pool, self.name)
        step = max(1, min(self._settings.consumer_max_records, 100))
        for start in range(0, len(rows), step):
            page = rows[start:start + step]
            payloads = await dead_letter_payloads(pool, [r["id"] for r in page])
            await self.apply([ConsumerRecord(
                topic=r["topic"], partition=r["partition"], offset=r["offset"], timestamp=-1,
                timestamp_type=0, key=None, value=payloads[r["id"]], checksum=None,
                serialized_key_size=-1, serialized_value_size=len(payloads[r["id"]]),
                headers=LogPosition(r["event_id"], r["event_type"], r["source"],
                                    r["sequence"]).headers(),
            ) for r in page], retake=("skipped", "dead_lettered"))
        ids = [r["event_id"] for r in rows]
        again = await pool.fetchval(
            "SELECT count(*) FROM inbox WHERE consumer = $1 AND event_id = ANY($2::text[])"
            " AND status = 'dead_lettered'", self.name, ids)
        self._log.info("redriven", events=len(ids), dead_lettered_again=again)
        return Redriven(applied=len(ids) - again, dead_lettered_again=again)

    async def _apply_event(self, conn, rec: ConsumerRecord, env: Envelope) -> None:
        handler = self.handlers[env.type]
        carrier = {k: v.decode("latin-1") for k, v in (rec.headers or ())
                   if type(k) is str and type(v) is bytes}  # (a header's value may be null)
        with self._tracer.start_as_current_span(
            f"consume {env.type}", context=context_from_carrier(carrier), kind=SpanKind.CONSUMER,
            attributes={"messaging.destination": rec.topic, "billstream.event_id": env.id,
                        "billstream.consumer": self.name},
        ):
            try:
                data = parse_data(env.type, env.version, env.data)
                async with conn.transaction():
                    await handler(EventContext(conn, env, data, self._store))
            except TRANSIENT_ERRORS:
                raise
            except Exception as exc:  # noqa: BLE001 - the handler's failure: retry, then DLQ
                raise _HandlerFailed(env.id, env.type, exc) from exc

    async def _dead_letter(self, conn, rec: ConsumerRecord, event_id: str | None,
                           event_type: str | None, reason: str) -> None:
        assert self._broker is not None
        headers = {
            "dlq_reason": reason[:1000],
            "dlq_consumer": self.name,
            "dlq_topic": rec.topic,
            "dlq_partition": str(rec.partition),
            "dlq_offset": str(rec.offset),
        }
        try:
            await self._broker.publish(rec.value, DEAD_LETTER, key=rec.key, headers=headers)
        except MessageSizeTooLargeError:
            # the record with our headers is past the producer's limit (only a record close to
            # it gets here): its value stays in `dead_letters`, the DLQ says so. Retried as a
            # broker error, it would hold the partition for good.
            headers["dlq_value_omitted"] = str(len(rec.value or b""))
            await self._broker.publish(b"", DEAD_LETTER, key=None, headers=headers)
        await conn.execute(
            'INSERT INTO dead_letters (consumer, topic, partition, "offset", event_id, event_type,'
            " reason, payload) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
            self.name, rec.topic, rec.partition, rec.offset, event_id, event_type, reason,
            rec.value,
        )
        self._log.error("dead_lettered", topic=rec.topic, offset=rec.offset, reason=reason)

