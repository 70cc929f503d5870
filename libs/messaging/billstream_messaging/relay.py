"""The outbox relay: publishes a service's event log to Kafka after commit, at least once.

- Low latency: appends `NOTIFY` a channel the relay `LISTEN`s on; a slow poll is only the
  fallback.
- One active relay per service: it holds a Postgres advisory lock; other replicas stand by.
- Position: `relay_state.published_seq`, advanced only after the broker acknowledged every
  record up to it (acks=all). A crash republishes the tail; consumers dedupe.
- A broker that lost its data (the local broker keeps everything in memory) is detected two
  ways: a produced record gets an offset lower than one already acknowledged on the same
  partition, or the relay's heartbeat record (on `billstream._heartbeat`, every couple of
  seconds) gets an offset not above the last one. Then the relay recreates the topics and
  republishes its whole log from seq 1; consumers' inboxes make the replay a no-op for what they
  had already applied, and they converge to the same state.
"""

from __future__ import annotations

import asyncio
import zlib
from datetime import datetime

import asyncpg
import orjson
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from billstream_contracts.topics import HEARTBEAT
from billstream_messaging.store import EventStore, published_envelope
from billstream_messaging.topics import ensure_topics
from billstream_runtime.metrics import Metrics
from billstream_runtime.settings import ServiceSettings


class BrokerReset(Exception):
    """The broker has less data than it acknowledged before."""


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def encode_row(source: str, row) -> bytes:
    """The envelope JSON of one event_log row (without a pydantic round trip)."""
    return orjson.dumps(
        {
            "id": row["id"],
            "type": row["type"],
            "version": row["version"],
            "tenant_id": row["tenant_id"],
            "environment": row["environment"],
            "occurred_at": _iso(row["occurred_at"]),
            "recorded_at": _iso(row["recorded_at"]),
            "source": source,
            "sequence": row["seq"],
            "aggregate_type": row["aggregate_type"],
            "aggregate_id": row["aggregate_id"],
            "correlation_id": row["correlation_id"],
            "causation_id": row["causation_id"],
            "data": row["data"],
        }
    )


#: The next rows to publish, lean: the envelope bytes as stored and what the record needs.
#: At most $2 rows and about $3 stored bytes (a log of usage batches has rows of hundreds of
#: KiB: the relay's memory stays bounded; compressed, by the server or by zstd, they publish
#: several times their stored bytes: 4-5 for usage like production's), always at least one row.
#: (The LIMIT is applied before the running sum: a window function over the whole backlog —
#: the whole log while republishing — would read every row on every round.)
_SELECT_UNPUBLISHED = """
    SELECT seq, id, topic, key, type, version, trace_text, envelope, envelope_codec FROM (
        SELECT *, sum(size) OVER (ORDER BY seq) - size AS before FROM (
            SELECT seq, id, topic, tenant_id || ':' || aggregate_id AS key, type, version,
                   trace_context::text AS trace_text, envelope, envelope_codec,
                   coalesce(pg_column_size(envelope), 0) AS size
              FROM event_log WHERE seq > $1 ORDER BY seq LIMIT $2
        ) limited
    ) bounded WHERE before < $3 ORDER BY seq
"""
#: Rows appended before envelopes were stored: encoded by the relay (encode_row).
_SELECT_LEGACY = "SELECT * FROM event_log WHERE seq = ANY($1::bigint[])"

_TYPE_HEADERS: dict[tuple[str, int], list[tuple[str, bytes]]] = {}
#: Events appended by one request share one trace context: parse each text once.
_TRACE_HEADERS: dict[str, list[tuple[str, bytes]]] = {}


def record_headers(row, source: bytes) -> list[tuple[str, bytes]]:
    """Kafka headers of a row of the relay's query: the event's type and version, its place in
    the log (`event_id`, `event_source`, `event_sequence`: a consumer that cannot read the
    value still knows which event it dead-letters, so the source's progress has no hole;
    consumer.log_position) and its trace context (`traceparent`, …) when it has one."""
    key = (row["type"], row["version"])
    base = _TYPE_HEADERS.get(key)
    if base is None:
        base = _TYPE_HEADERS[key] = [("event_type", key[0].encode()),
                                     ("event_version", str(key[1]).encode())]
    headers = base + [("event_id", row["id"].encode()), ("event_source", source),
                      ("event_sequence", b"%d" % row["seq"])]
    text = row["trace_text"]
    if not text:
        return headers
    trace = _TRACE_HEADERS.get(text)
    if trace is None:
        if len(_TRACE_HEADERS) > 10_000:
            _TRACE_HEADERS.clear()
        trace = _TRACE_HEADERS[text] = [(k, v.encode()) for k, v in orjson.loads(text).items()]
    return headers + trace


class OutboxRelay:
    def __init__(
        self,
        *,
        store: EventStore,
        pool: asyncpg.Pool,
        settings: ServiceSettings,
        metrics: Metrics,
    ) -> None:
        self._store = store
        self._pool = pool
        self._settings = settings
        self._metrics = metrics
        self._log = structlog.get_logger("billstream.relay").bind(source=store.source)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._max_offsets: dict[tuple[str, int], int] = {}
        self._partitions: dict[str, list[int]] = {}
        self._partitioner = DefaultPartitioner()
        self._partition_of: dict[tuple[str, bytes], int] = {}
        self._reset_requested = False
        self.leading = False
        self.published_seq = 0

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"relay-{self._store.source}")

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._task:
            try:
                await asyncio.wait_for(self._task, timeout=10)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._task.cancel()

    def ready(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- loop --------------------------------------------------------------------------------
    async def _run(self) -> None:
        backoff = 0.2
        while not self._stopping.is_set():
            try:
                await self._lead()
                backoff = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the relay must survive broker/db outages
                self.leading = False
                self._log.warning("relay_error", error=repr(exc), retry_in_s=backoff)
                await self._sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _lead(self) -> None:
        lock_key = zlib.crc32(f"relay:{self._store.source}".encode())
        conn = await asyncpg.connect(self._settings.database_url)
        producer: AIOKafkaProducer | None = None
        heartbeat: asyncio.Task | None = None
        try:
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_key):
                if await self._sleep(self._settings.relay_poll_interval_s):
                    return
            await conn.add_listener(self._store.channel, lambda *_: self._wake.set())
            producer = AIOKafkaProducer(
                bootstrap_servers=self._settings.kafka_bootstrap,
                acks="all",
                linger_ms=2,
                max_batch_size=512 * 1024,
                max_request_size=8 * 1024 * 1024,
                enable_idempotence=False,  # the local broker rejects InitProducerId
            )
            await producer.start()
            await ensure_topics(self._settings.kafka_bootstrap)
            # partitions are learnt afresh by every leadership (a failed publish ends it): a
            # topic recreated with another partition count is picked up
            self._partitions.clear()
            self._partition_of.clear()
            state = await self._pool.fetchrow("SELECT * FROM relay_state WHERE id = 1")
            self.published_seq = state["published_seq"]
            self.leading = True
            self._log.info("relay_leading", published_seq=self.published_seq)
            heartbeat = asyncio.create_task(
                self._heartbeat(producer, state["heartbeat_offset"]), name="relay-heartbeat"
            )
            while not self._stopping.is_set():
                if heartbeat.done():
                    heartbeat.result()  # re-raise its failure
                if conn.is_closed():  # the advisory lock went with it: another relay may lead
                    raise ConnectionError("relay lost its lock connection")
                if self._reset_requested:
                    await self._republish_all()
                self._wake.clear()
                rows = await self._pool.fetch(_SELECT_UNPUBLISHED, self.published_seq,
                                              self._settings.relay_batch_size,
                                              self._settings.relay_batch_bytes)
                if not rows:
                    await self._update_lag()
                    await self._wait_for_work()
                    continue
                try:
                    await self._publish(producer, rows)
                except BrokerReset:
                    self._reset_requested = True
                    continue
                self.published_seq = rows[-1]["seq"]
                await self._pool.execute(
                    "UPDATE relay_state SET published_seq = $1, updated_at = now() WHERE id = 1",
                    self.published_seq,
                )
        finally:
            self.leading = False
            self._metrics.relay_lag.set(0)  # the next leader reports it (workers: livemax)
            if heartbeat:
                heartbeat.cancel()
            if producer:
                try:
                    await producer.stop()
                except Exception:  # noqa: BLE001
                    pass
            await conn.close()

    async def _publish(self, producer: AIOKafkaProducer, rows) -> None:
        """Publish rows with the producer's batch API: one record batch per partition (several
        when one fills up), all in flight at once; aiokafka keeps one batch in flight per
        partition, so order per key is kept. Four times the per-message `send` rate (see
        bench/ceilings). Partitions follow Kafka's default partitioner (murmur2 of the key), so
        a key lands where any Kafka client would put it."""
        source = self._store.source
        source_header = source.encode()
        legacy = [row["seq"] for row in rows if row["envelope"] is None]
        encoded: dict[int, bytes] = {}
        if legacy:
            for full in await self._pool.fetch(_SELECT_LEGACY, legacy):
                encoded[full["seq"]] = encode_row(source, full)
        by_partition: dict[tuple[str, int], list] = {}
        for row in rows:
            topic = row["topic"]
            partitions = self._partitions.get(topic)
            if partitions is None:
                partitions = self._partitions[topic] = sorted(await producer.partitions_for(topic))
            key = row["key"].encode()
            partition = self._partition_of.get((topic, key))
            if partition is None:  # murmur2 is pure Python in aiokafka: remember the answer
                if len(self._partition_of) > 100_000:
                    self._partition_of.clear()
                partition = self._partition_of[(topic, key)] = self._partitioner(
                    key, partitions, partitions)
            by_partition.setdefault((topic, partition), []).append((key, row))
        sends = []  # (topic, partition, record count, future)
        for (topic, partition), items in by_partition.items():
            batch = producer.create_batch()
            count = 0
            for key, row in items:
                value = (published_envelope(row["seq"], row["envelope"], row["envelope_codec"])
                         if row["envelope"] is not None else encoded[row["seq"]])
                headers = record_headers(row, source_header)
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    batch.close()
                    sends.append((topic, partition, count,
                                  await producer.send_batch(batch, topic, partition=partition)))
                    batch = producer.create_batch()
                    count = 0
                    if batch.append(key=key, value=value, timestamp=None,
                                    headers=headers) is None:
                        raise ValueError(f"event seq {row['seq']} is larger than a batch")
                count += 1
            batch.close()
            sends.append((topic, partition, count,
                          await producer.send_batch(batch, topic, partition=partition)))
        results = await asyncio.gather(*(future for *_, future in sends))
        reset = False
        for (topic, partition, count, _), md in zip(sends, results, strict=True):
            tp = (topic, partition)
            if md.offset <= self._max_offsets.get(tp, -1):
                reset = True
            self._max_offsets[tp] = max(md.offset + count - 1, self._max_offsets.get(tp, -1))
        for (topic, _), items in by_partition.items():
            self._metrics.events_published.labels(topic).inc(len(items))
        if reset:
            raise BrokerReset()

    async def _republish_all(self) -> None:
        self._log.warning("relay_republishing_log", reason="broker lost its data")
        await ensure_topics(self._settings.kafka_bootstrap)
        self._max_offsets.clear()
        self._partitions.clear()
        self._partition_of.clear()
        self.published_seq = 0
        self._reset_requested = False
        await self._pool.execute(
            "UPDATE relay_state SET published_seq = 0, republish_count = republish_count + 1,"
            " republish_head = (SELECT last_seq FROM event_log_head WHERE id = 1),"
            " updated_at = now() WHERE id = 1"
        )
        self._metrics.relay_republishes.inc()

    async def _heartbeat(self, producer: AIOKafkaProducer, last_offset: int) -> None:
        while not self._stopping.is_set():
            md = await producer.send_and_wait(HEARTBEAT, value=b"", key=self._store.source.encode())
            if last_offset >= 0 and md.offset <= last_offset:
                self._reset_requested = True
                self._wake.set()
            last_offset = md.offset
            await self._pool.execute(
                "UPDATE relay_state SET heartbeat_offset = $1 WHERE id = 1", md.offset
            )
            if await self._sleep(self._settings.relay_heartbeat_interval_s):
                return

    async def _update_lag(self) -> None:
        head = await self._pool.fetchval("SELECT last_seq FROM event_log_head WHERE id = 1")
        self._metrics.relay_lag.set(max(0, head - self.published_seq))

    async def _wait_for_work(self) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=self._settings.relay_poll_interval_s)
        except asyncio.TimeoutError:
            pass

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; True when the relay is stopping."""
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
            return True
        except asyncio.TimeoutError:
            return False
