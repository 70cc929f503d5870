"""The backbone against a real PostgreSQL and a real Kafka-protocol broker: transactional
append, relay, exactly-once consumption, dead letters, idempotent POSTs, tracing, replay."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import asyncpg
import httpx
import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from fastapi import APIRouter, Request
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from billstream_contracts import Envelope
from billstream_messaging import EventConsumer, EventContext, NewEvent, ServiceHost
from billstream_messaging import consumer as consumer_module
from billstream_messaging.store import EventStore, published_envelope
from billstream_runtime.auth import AuthContext, hash_key
from billstream_runtime.http import SecretKey
from billstream_runtime.idempotency import hash_request
from billstream_runtime.ids import new_id
from billstream_runtime.settings import load_settings
from billstream_runtime.telemetry import configure_tracing
from billstream_testing.events import (
    AnyCaseEnvironmentEnvelope,
    publish_records,
    read_topic,
    relay_headers,
)
from billstream_testing.fixtures import service_env, unique
from billstream_testing.waiting import eventually

pytestmark = pytest.mark.integration
MIGRATIONS = Path(__file__).parent / "notes_migrations"
SPANS = InMemorySpanExporter()
configure_tracing("tests", extra_processor=SimpleSpanProcessor(SPANS))
KEY = "sk_test_notes_integration_key_0001"


def notes_router() -> APIRouter:
    router = APIRouter()

    @router.post("/v1/notes")
    async def create_note(request: Request, ctx: AuthContext = SecretKey):
        body = await request.json()
        if body.get("explode"):
            EXPLODED["n"] += 1
            raise RuntimeError("boom")
        note_id = new_id("note")
        pool, store = request.app.state.pool, request.app.state.store
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO notes VALUES ($1, $2, $3)", note_id, ctx.tenant_id,
                               body["text"])
            await store.append(conn, [NewEvent(
                {"note_id": note_id, "text": body["text"]}, type="note.created",
                tenant_id=ctx.tenant_id, environment=ctx.environment, aggregate_type="note",
                aggregate_id=note_id, occurred_at=datetime.now(UTC))])
        return {"id": note_id}

    return router


FLAKY: dict[str, int] = {}
ARCHIVED = {"n": 0}


async def count_note_archived(ctx: EventContext) -> None:
    ARCHIVED["n"] += 1
EXPLODED = {"n": 0}


async def flaky_note(ctx: EventContext) -> None:
    """Fails twice with a cancelled query (the database's fault, not the event's), then works."""
    note = ctx.envelope.data["note_id"]
    FLAKY[note] = FLAKY.get(note, 0) + 1
    if FLAKY[note] <= 2:
        raise asyncpg.QueryCanceledError("canceling statement due to statement timeout")
    await count_note(ctx)


async def count_note(ctx: EventContext) -> None:
    if ctx.envelope.data["text"] == "poison":
        raise ValueError("this note can never be applied")
    await ctx.conn.execute(
        "INSERT INTO note_counts VALUES ($1, 1) ON CONFLICT (tenant_id)"
        " DO UPDATE SET n = note_counts.n + 1", ctx.envelope.tenant_id)


def build_host(dsn: str, bootstrap: str, topic: str, group_prefix: str) -> ServiceHost:
    settings = load_settings("notes", environ=service_env(
        "notes", dsn, bootstrap, consumer_group_prefix=group_prefix, consumer_max_attempts=2))
    store = EventStore("notes", topic=topic)
    consumer = EventConsumer(name="counter", topics=[topic], handlers={"note.created": count_note, "note.flaky": flaky_note},
                             settings=settings, metrics=None, store=store)  # type: ignore[arg-type]
    host = ServiceHost(settings=settings, title="notes", migrations=MIGRATIONS,
                       routers=[notes_router()], consumers=[consumer], store=store,
                       read_models={"notes.counter": ["note_counts"]})
    consumer._metrics = host.metrics
    return host


@pytest.fixture
async def host(fresh_database, kafka_bootstrap):
    h = build_host(fresh_database, kafka_bootstrap, unique("notes"), unique("g"))
    await h.start(serve_http=False)
    await h.pool.execute(
        "INSERT INTO api_keys VALUES ('key_1', 'ten_1', 'test', 'secret', $1, 'sk_test_n', now())",
        hash_key(KEY))
    try:
        yield h
    finally:
        await h.stop()


def client(host: ServiceHost) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=host.app, raise_app_exceptions=False), base_url="http://t",
                             headers={"Authorization": f"Bearer {KEY}"})


async def counted(host: ServiceHost) -> int:
    return await host.pool.fetchval("SELECT coalesce(sum(n), 0) FROM note_counts")


async def test_append_relay_consume_exactly_once(host):
    async with client(host) as c:
        ids = [(await c.post("/v1/notes", json={"text": f"n{i}"})).json()["id"] for i in range(50)]
    assert len(set(ids)) == 50
    await eventually(lambda: _eq(counted(host), 50), message="50 notes counted")
    seqs = [r["seq"] for r in await host.pool.fetch("SELECT seq FROM event_log ORDER BY seq")]
    assert seqs == list(range(1, 51)), "the log's sequence is gapless"
    # Redeliver everything the broker holds: a counted no-op.
    consumer = host.consumers[0]
    records = await read_topic(host.settings.kafka_bootstrap, consumer.topics[0], 50)
    await consumer.apply(records)
    await consumer.apply(records + records)  # the same events twice within one batch
    assert await counted(host) == 50
    # A new event delivered twice in one batch (a redelivery racing the original) applies once.
    fresh = orjson.loads(records[0].value)
    fresh["id"], fresh["data"] = new_id("evt"), {"note_id": "twice", "text": "x"}
    twice = dataclasses.replace(records[0], value=orjson.dumps(fresh))
    await consumer.apply([twice, twice])
    assert await counted(host) == 51
    dup = host.metrics.events_consumed.labels(consumer.name, "duplicate")._value.get()
    assert dup >= 100


async def test_large_appends_use_copy_and_keep_json_exact(host):
    events = [NewEvent({"note_id": f"big{i}", "text": f"t{i}", "nested": {"a": [1, "x", None]}},
                       type="note.created", tenant_id="ten_1", environment="test",
                       aggregate_type="note", aggregate_id=f"big{i}",
                       occurred_at=datetime.now(UTC)) for i in range(500)]
    async with host.pool.acquire() as conn, conn.transaction():
        envelopes = await host.store.append(conn, events)
    assert [e.sequence for e in envelopes] == list(range(1, 501))
    row = await host.pool.fetchrow("SELECT data, trace_context FROM event_log WHERE seq = 500")
    assert row["data"] == {"note_id": "big499", "text": "t499", "nested": {"a": [1, "x", None]}}
    await eventually(lambda: _eq(counted(host), 500), message="500 notes counted")


async def test_small_and_large_appends_store_the_same_rows(host):
    """An append of a few events is one statement (sequence and envelope made in SQL); a large
    one is a COPY (made in Python). Both store the same columns and the same envelope bytes,
    which are the Envelope the append returns."""
    from billstream_contracts import Envelope

    def events(prefix: str, n: int) -> list[NewEvent]:
        at = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
        return [NewEvent({"note_id": f"{prefix}{i}", "text": "é \u2028 \"q\"", "n": [1, None]},
                         type="note.created", tenant_id="ten_1", environment="test",
                         aggregate_type="note", aggregate_id=f"{prefix}{i}", occurred_at=at,
                         correlation_id="cor_1" if i % 2 else None)
                for i in range(n)]

    async with host.pool.acquire() as conn, conn.transaction():
        small = await host.store.append(conn, events("s", 3))
    async with host.pool.acquire() as conn, conn.transaction():
        large = await host.store.append(conn, events("l", 70))
    assert [e.sequence for e in small + large] == list(range(1, 74))
    rows = await host.pool.fetch("SELECT * FROM event_log ORDER BY seq")
    for row, returned in zip(rows, small + large, strict=True):
        assert row["envelope"].startswith(b'{"sequence":%d,' % row["seq"])
        stored = Envelope.model_validate_json(row["envelope"])
        assert stored == returned
        assert (row["id"], row["type"], row["version"], row["aggregate_id"]) == (
            returned.id, "note.created", 1, returned.aggregate_id)
        assert row["data"] == returned.data and row["occurred_at"] == returned.occurred_at
        assert row["correlation_id"] == returned.correlation_id
    assert {r["recorded_at"] for r in rows[:3]} == {small[0].recorded_at}


async def test_envelopes_from_a_size_on_are_stored_compressed_and_published_whole(host):
    """A store with `zstd_min_bytes` keeps envelopes of that size and more as a zstd frame of
    their tail (`envelope_codec` 'zstd'), on both append paths, and smaller ones as they are.
    The relay publishes the very bytes an uncompressed store would have: the head with the
    sequence, then the tail."""
    host.store.zstd_min_bytes = 2048

    def events(prefix: str, n: int) -> list[NewEvent]:
        at = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
        return [NewEvent({"note_id": f"{prefix}{i}",
                          "text": ("é \u2028 \"q\" " * 300) if i % 2 else "short"},
                         type="note.created", tenant_id="ten_1", environment="test",
                         aggregate_type="note", aggregate_id=f"{prefix}{i}", occurred_at=at)
                for i in range(n)]

    async with host.pool.acquire() as conn, conn.transaction():
        small = await host.store.append(conn, events("s", 4))  # one statement
    async with host.pool.acquire() as conn, conn.transaction():
        large = await host.store.append(conn, events("l", 70))  # COPY
    rows = await host.pool.fetch(
        "SELECT seq, envelope, envelope_codec, octet_length(envelope) AS stored"
        " FROM event_log ORDER BY seq")
    published = {}
    for row, returned in zip(rows, small + large, strict=True):
        big = len(returned.data["text"]) > 100
        assert row["envelope_codec"] == ("zstd" if big else None)
        assert row["envelope"].startswith(b'{"sequence":%d,' % row["seq"]) is not big
        whole = published_envelope(row["seq"], row["envelope"], row["envelope_codec"])
        assert whole.startswith(b'{"sequence":%d,' % row["seq"])
        assert Envelope.model_validate_json(whole) == returned
        if big:
            assert row["stored"] * 10 < len(whole)
        published[row["seq"]] = whole
    records = await read_topic(host.settings.kafka_bootstrap, host.store.topic, len(rows))
    by_seq = {int(dict(r.headers)["event_sequence"]): r.value for r in records}
    assert by_seq == published
    with pytest.raises(ValueError, match="unknown envelope codec"):
        published_envelope(1, b"x", "brotli")


async def test_a_relay_round_reads_a_bounded_number_of_bytes(host):
    """The relay's query stops at `relay_batch_bytes` of stored envelopes (a usage batch row is
    hundreds of KiB), always returning at least one row, and never more than the row limit."""
    import os

    from billstream_messaging.relay import _SELECT_UNPUBLISHED

    await host.relay.stop()
    events = [NewEvent({"note_id": f"b{i}", "text": os.urandom(6000).hex()},
                       type="note.created", tenant_id="ten_1", environment="test",
                       aggregate_type="note", aggregate_id=f"b{i}",
                       occurred_at=datetime.now(UTC)) for i in range(10)]
    async with host.pool.acquire() as conn, conn.transaction():
        await host.store.append(conn, events)
    sizes = [r["size"] for r in await host.pool.fetch(
        "SELECT pg_column_size(envelope) AS size FROM event_log ORDER BY seq")]
    assert all(size > 5000 for size in sizes)
    limit = sizes[0] + sizes[1] + sizes[2] // 2  # the third row starts under it
    rows = await host.pool.fetch(_SELECT_UNPUBLISHED, 0, 1000, limit)
    assert [r["seq"] for r in rows] == [1, 2, 3]
    assert [r["seq"] for r in await host.pool.fetch(_SELECT_UNPUBLISHED, 0, 1000, 1)] == [1]
    assert len(await host.pool.fetch(_SELECT_UNPUBLISHED, 0, 4, 10**9)) == 4
    assert [r["seq"] for r in await host.pool.fetch(_SELECT_UNPUBLISHED, 8, 1000, 10**9)] == [
        9, 10]


async def test_unknown_types_are_counted_and_skipped_and_poison_goes_to_dlq(host):
    consumer = host.consumers[0]
    async with host.pool.acquire() as conn, conn.transaction():
        await host.store.append(conn, [
            NewEvent({"x": 1}, type="note.archived", tenant_id="ten_1", environment="test",
                     aggregate_type="note", aggregate_id="n1", occurred_at=datetime.now(UTC)),
            NewEvent({"note_id": "n2", "text": "poison"}, type="note.created", tenant_id="ten_1",
                     environment="test", aggregate_type="note", aggregate_id="n2",
                     occurred_at=datetime.now(UTC)),
            NewEvent({"note_id": "n3", "text": "fine"}, type="note.created", tenant_id="ten_1",
                     environment="test", aggregate_type="note", aggregate_id="n3",
                     occurred_at=datetime.now(UTC)),
        ])
    await eventually(lambda: _eq(counted(host), 1), message="the good note applied")
    await eventually(lambda: host.pool.fetchval("SELECT count(*) FROM dead_letters"))
    row = await host.pool.fetchrow("SELECT * FROM dead_letters")
    assert row["event_type"] == "note.created" and "never be applied" in row["reason"]
    status = await host.pool.fetchval(
        "SELECT status FROM inbox WHERE event_id = $1", row["event_id"])
    assert status == "dead_lettered"
    unknown = host.metrics.events_consumed.labels(consumer.name, "unknown_type")._value.get()
    assert unknown == 1
    archived = await host.pool.fetchrow(
        "SELECT i.status FROM inbox i JOIN event_log e ON e.id = i.event_id"
        " WHERE e.type = 'note.archived'")
    assert archived["status"] == "skipped"  # no hole in the source's sequence
    # A later version that handles the type applies it when it comes again (here: a replay).
    consumer.handlers["note.archived"] = count_note_archived
    records = await read_topic(host.settings.kafka_bootstrap, consumer.topics[0], 3)
    await consumer.apply(records)
    assert ARCHIVED["n"] == 1
    await consumer.apply(records)
    assert ARCHIVED["n"] == 1
    dlq = await read_topic(host.settings.kafka_bootstrap, "billstream.dlq", 1,
                            match=lambda r: orjson.loads(r.value)["id"] == row["event_id"])
    headers = dict(dlq[0].headers)
    assert b"never be applied" in headers["dlq_reason"]


async def test_redrive_applies_dead_lettered_events_again_once(host):
    """`redrive CONSUMER`: what still fails is dead-lettered again (a new row, a new DLQ
    record); once the handler is fixed it applies, once; a redelivery of it meanwhile stays a
    duplicate, not an application."""
    consumer = host.consumers[0]
    notes = [NewEvent({"note_id": f"rd{i}", "text": text}, type="note.created",
                      tenant_id="ten_rd", environment="test", aggregate_type="note",
                      aggregate_id=f"rd{i}", occurred_at=datetime.now(UTC))
             for i, text in enumerate(("poison", "fine", "poison"))]
    async with host.pool.acquire() as conn, conn.transaction():
        await host.store.append(conn, notes)

    async def tenant_count():
        return await host.pool.fetchval(
            "SELECT coalesce(sum(n), 0) FROM note_counts WHERE tenant_id = 'ten_rd'")

    async def dead(n):
        return await host.pool.fetchval(
            "SELECT count(*) FROM dead_letters d JOIN event_log e ON e.id = d.event_id"
            " WHERE e.tenant_id = 'ten_rd'") == n

    await eventually(lambda: dead(2), message="two poison notes dead-lettered")
    await eventually(lambda: _eq(tenant_count(), 1), message="the good note applied")
    records = await read_topic(host.settings.kafka_bootstrap, consumer.topics[0], 3)
    await consumer.apply(records)  # redelivered while dead-lettered: duplicates
    assert await tenant_count() == 1

    done = await host.redrive("counter")  # the handler still fails
    assert (done.applied, done.dead_lettered_again) == (0, 2)
    assert await dead(4)
    assert await tenant_count() == 1

    consumer.handlers["note.created"] = count_note_healed
    try:
        done = await host.redrive("notes.counter")
        assert (done.applied, done.dead_lettered_again) == (2, 0)
        assert await tenant_count() == 3
        statuses = await host.pool.fetch(
            "SELECT i.status FROM inbox i JOIN event_log e ON e.id = i.event_id"
            " WHERE e.tenant_id = 'ten_rd'")
        assert sorted(r["status"] for r in statuses) == ["applied"] * 3
        done = await host.redrive("counter")
        assert (done.applied, done.dead_lettered_again) == (0, 0)
        await consumer.apply(records)
        assert await tenant_count() == 3
    finally:
        consumer.handlers["note.created"] = count_note

    # A dead-lettered event of a type this version no longer handles is skipped, as such
    # events are when they come (no hole in the source's progress, no exit 1 forever).
    lone = NewEvent({"note_id": "rd9", "text": "poison"}, type="note.created",
                    tenant_id="ten_rd", environment="test", aggregate_type="note",
                    aggregate_id="rd9", occurred_at=datetime.now(UTC))
    async with host.pool.acquire() as conn, conn.transaction():
        await host.store.append(conn, [lone])
    await eventually(lambda: dead(5), message="the fourth poison note dead-lettered")
    del consumer.handlers["note.created"]
    try:
        done = await host.redrive("counter")
    finally:
        consumer.handlers["note.created"] = count_note
    assert (done.applied, done.dead_lettered_again) == (1, 0)
    assert await host.pool.fetchval(
        "SELECT i.status FROM inbox i JOIN event_log e ON e.id = i.event_id"
        " WHERE e.data ->> 'note_id' = 'rd9' OR convert_from(e.envelope, 'UTF8') LIKE '%rd9%'"
    ) == "skipped"
    with pytest.raises(SystemExit, match="unknown consumer"):
        await host.redrive("nope")


async def test_a_record_that_is_not_an_envelope_keeps_its_place_in_its_source(
        host, monkeypatch):
    """A record the consumer cannot read as an envelope is dead-lettered. The relay names its
    event in the headers, so the event takes its inbox row (`dead_lettered`) all the same:
    the source's progress has no unexplained hole, a redelivery is a duplicate, and redrive
    tries it again and applies it, once, when a fixed version can read it. A record without
    those headers (not from a relay) is dead-lettered with no inbox row, as before."""
    consumer = host.consumers[0]
    topic = consumer.topics[0]
    bootstrap = host.settings.kafka_bootstrap
    async with host.pool.acquire() as conn, conn.transaction():
        [env] = await host.store.append(conn, [NewEvent(
            {"note_id": "mf0", "text": "fine"}, type="note.created", tenant_id="ten_mf",
            environment="test", aggregate_type="note", aggregate_id="mf0",
            occurred_at=datetime.now(UTC))])
    [published] = await read_topic(bootstrap, topic, 1,
                                   match=lambda r: orjson.loads(r.value)["id"] == env.id)
    assert relay_headers(env) == list(published.headers)[:5]  # the test stand-in agrees

    # As a relay would write it, but this version cannot read it (an upper-case environment).
    bad = {**orjson.loads(published.value), "id": new_id("evt"), "sequence": 10_000,
           "environment": "TEST", "data": {"note_id": "mf1", "text": "fine"}}
    named = SimpleNamespace(**{k: bad[k] for k in ("id", "type", "version", "source",
                                                   "sequence")})
    record = (b"ten_mf:mf1", orjson.dumps(bad), relay_headers(named))
    await publish_records(bootstrap, topic, record, (None, b"not an envelope", []))

    async def dead_letter(where: str, *args):
        return await host.pool.fetch(f"SELECT * FROM dead_letters WHERE {where} ORDER BY id",
                                     *args)

    await eventually(lambda: dead_letter("event_id = $1", bad["id"]),
                     message="the unreadable event dead-lettered")
    await eventually(lambda: dead_letter("payload = 'not an envelope'::bytea"),
                     message="the record from elsewhere dead-lettered")
    [row] = await dead_letter("event_id = $1", bad["id"])
    assert row["event_type"] == "note.created" and "malformed envelope" in row["reason"]
    inbox = await host.pool.fetchrow("SELECT * FROM inbox WHERE consumer = $1 AND event_id = $2",
                                     consumer.name, bad["id"])
    assert (inbox["status"], inbox["source"], inbox["sequence"]) == (
        "dead_lettered", "notes", 10_000)
    [elsewhere] = await dead_letter("payload = 'not an envelope'::bytea")
    assert elsewhere["event_id"] is None

    [redelivered] = await read_topic(bootstrap, topic, 1,
                                     match=lambda r: r.value == record[1])
    await consumer.apply([redelivered])  # a duplicate: no second dead letter
    assert len(await dead_letter("event_id = $1", bad["id"])) == 1

    async def tenant_count():
        return await host.pool.fetchval(
            "SELECT coalesce(sum(n), 0) FROM note_counts WHERE tenant_id = 'ten_mf'")

    await eventually(lambda: _eq(tenant_count(), 1), message="the good note applied")
    done = await host.redrive("counter")  # this version still cannot read it
    assert (done.applied, done.dead_lettered_again) == (0, 1)
    assert len(await dead_letter("event_id = $1", bad["id"])) == 2

    monkeypatch.setattr(consumer_module, "Envelope", AnyCaseEnvironmentEnvelope)  # the fix, deployed
    done = await host.redrive("counter")
    assert (done.applied, done.dead_lettered_again) == (1, 0)
    assert await tenant_count() == 2
    assert await host.pool.fetchval(
        "SELECT status FROM inbox WHERE consumer = $1 AND event_id = $2",
        consumer.name, bad["id"]) == "applied"
    assert (await host.redrive("counter")).applied == 0
    await consumer.apply([redelivered])
    assert await tenant_count() == 2


async def test_records_whose_headers_cannot_be_trusted_never_stop_the_consumer(host):
    """Headers name an event only for what fits: a record whose headers do not fit the inbox
    is dead-lettered without a row (it used to stop its partition for good), and so is a
    readable envelope whose id, source or sequence cannot be recorded; a record whose headers
    name an event that a readable record of the same batch carries does not take that
    event's place; an unreadable record of a type this consumer skips is skipped, as its
    readable self would be; a header with a null value stops nothing."""
    consumer = host.consumers[0]
    note = envelope_of("tr1", "fine")
    good = consumer_record(note.model_dump_json().encode(), relay_headers(note), offset=1)
    bad_sequence = consumer_record(b"{", [*relay_headers(note)[:4],
                                          ("event_sequence", b"99999999999999999999")], offset=2)
    nul = consumer_record(b"{", [*relay_headers(note)[:2], ("event_id", b"evt\x00"),
                                 *relay_headers(note)[3:]], offset=3)
    liar = consumer_record(b"not this event", relay_headers(note), offset=0)  # names `note`
    skipped = envelope_of("tr2", "fine", type="note.archived")
    unreadable_skipped = consumer_record(b"{", relay_headers(skipped), offset=4)
    readable_skipped = envelope_of("tr3", "fine", type="note.archived")
    # readable, but its id, source or sequence cannot be recorded: malformed
    huge = envelope_of("tr4", "fine").model_copy(update={"sequence": 2**63})
    nul_id = envelope_of("tr5", "fine").model_copy(update={"id": "evt_\x00"})
    # a header with a null value (Kafka allows one), on an event that is fine
    null_header = envelope_of("tr6", "fine")
    odd_type = envelope_of("tr7", "fine")  # unreadable; its type header is not text
    counted = host.metrics.events_consumed.labels(consumer.name, "unknown_type")._value.get()

    await consumer.apply([
        liar, good, bad_sequence, nul, unreadable_skipped,
        consumer_record(readable_skipped.model_dump_json().encode(),
                        relay_headers(readable_skipped), offset=5),
        consumer_record(huge.model_dump_json().encode(), [], offset=6),
        consumer_record(nul_id.model_dump_json().encode(), [], offset=7),
        consumer_record(null_header.model_dump_json().encode(),
                        [*relay_headers(null_header), ("tracestate", None)], offset=8),
        consumer_record(b"{", [("event_type", b"\xff"), *relay_headers(odd_type)[1:]],
                        offset=9),
    ])

    async def status(event_id: str) -> str | None:
        return await host.pool.fetchval("SELECT status FROM inbox WHERE consumer = $1"
                                        " AND event_id = $2", consumer.name, event_id)

    assert await status(note.id) == "applied"
    assert await status(null_header.id) == "applied"
    assert await status(skipped.id) == await status(readable_skipped.id) == "skipped"
    assert host.metrics.events_consumed.labels(
        consumer.name, "unknown_type")._value.get() == counted + 2
    assert await status(odd_type.id) == "dead_lettered"  # its place kept, its type unknown
    dead = await host.pool.fetch(
        "SELECT event_id, reason FROM dead_letters WHERE consumer = $1 AND topic = 't'"
        " ORDER BY \"offset\"", consumer.name)
    # liar, bad sequence, nul header, huge sequence, nul id, odd type
    assert [r["event_id"] for r in dead] == [None, None, None, None, None, odd_type.id]
    assert "past a bigint" in dead[3]["reason"] and "NUL" in dead[4]["reason"]
    assert await host.pool.fetchval(
        "SELECT count(*) FROM inbox WHERE consumer = $1 AND sequence > 2^62", consumer.name) == 0


async def test_a_record_too_large_to_copy_to_the_dlq_is_dead_lettered_all_the_same(host):
    """A record the consumer dead-letters is copied to billstream.dlq with the reason in
    headers. One close to the producer's size limit no longer fits with them: it used to be
    retried as a broker error for good, holding its partition. Now the DLQ gets the headers
    and says the value was left out; `dead_letters` keeps the value, for redrive."""
    consumer = host.consumers[0]
    topic = unique("big")
    note = envelope_of("big1", "poison").model_copy(update={"data": {
        "note_id": "big1", "text": "poison", "padding": "x" * (1024 * 1024 - 600)}})
    value = note.model_dump_json().encode()
    record = ConsumerRecord(topic=topic, partition=0, offset=0, timestamp=-1, timestamp_type=0,
                            key=b"k" * 500, value=value, checksum=None, serialized_key_size=500,
                            serialized_value_size=len(value), headers=relay_headers(note))
    await asyncio.wait_for(consumer.apply([record]), timeout=60)
    row = await host.pool.fetchrow("SELECT * FROM dead_letters WHERE topic = $1", topic)
    assert row["event_id"] == note.id and row["payload"] == value
    [dlq] = await read_topic(host.settings.kafka_bootstrap, "billstream.dlq", 1,
                             match=lambda r: dict(r.headers).get("dlq_topic") == topic.encode())
    headers = dict(dlq.headers)
    assert headers["dlq_value_omitted"] == str(len(value)).encode() and dlq.value == b""
    assert b"never be applied" in headers["dlq_reason"]


def envelope_of(note_id: str, text: str, *, type: str = "note.created") -> Envelope:
    from billstream_testing.events import envelope

    return envelope({"note_id": note_id, "text": text}, type=type, tenant_id="ten_tr",
                    source="notes", aggregate_type="note", aggregate_id=note_id)


def consumer_record(value: bytes, headers, *, offset: int) -> ConsumerRecord:
    return ConsumerRecord(topic="t", partition=0, offset=offset, timestamp=-1, timestamp_type=0,
                          key=None, value=value, checksum=None, serialized_key_size=-1,
                          serialized_value_size=len(value), headers=headers)


async def count_note_healed(ctx: EventContext) -> None:
    """count_note once its bug is fixed: poison notes count too."""
    await ctx.conn.execute(
        "INSERT INTO note_counts VALUES ($1, 1) ON CONFLICT (tenant_id)"
        " DO UPDATE SET n = note_counts.n + 1", ctx.envelope.tenant_id)


async def test_a_transient_error_in_a_handler_is_retried_never_dead_lettered(host):
    consumer = host.consumers[0]
    async with host.pool.acquire() as conn, conn.transaction():
        await host.store.append(conn, [NewEvent(
            {"note_id": "flaky-1", "text": "x"}, type="note.flaky", tenant_id="ten_1",
            environment="test", aggregate_type="note", aggregate_id="flaky-1",
            occurred_at=datetime.now(UTC))])
    await eventually(lambda: _eq(counted(host), 1), message="applied after two failures")
    assert FLAKY["flaky-1"] == 3  # consumer_max_attempts is 2 here: transient never counts
    assert await host.pool.fetchval("SELECT count(*) FROM dead_letters") == 0
    assert consumer.handlers["note.flaky"] is flaky_note


async def test_an_unexpected_failure_never_skips_the_batch(host):
    """A failure outside any handler (here: the dead-letter path itself) rewinds the consumer,
    so the batch is applied later instead of being committed past."""
    consumer = host.consumers[0]
    real = consumer._dead_letter
    failures = {"left": 1}

    async def broken_once(*args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("dead-letter store unavailable")
        return await real(*args, **kwargs)

    consumer._dead_letter = broken_once
    async with host.pool.acquire() as conn, conn.transaction():
        await host.store.append(conn, [NewEvent(
            {"note_id": f"u{i}", "text": "poison" if i == 3 else "ok"}, type="note.created",
            tenant_id="ten_1", environment="test", aggregate_type="note", aggregate_id=f"u{i}",
            occurred_at=datetime.now(UTC)) for i in range(8)])
    await eventually(lambda: _eq(counted(host), 7), message="every good note applied once")
    await eventually(lambda: host.pool.fetchval("SELECT count(*) FROM dead_letters"))
    assert failures["left"] == 0
    assert await counted(host) == 7
    assert await host.pool.fetchval("SELECT count(*) FROM dead_letters") == 1


async def test_idempotency_key_replays_rejects_and_keeps_a_failed_answer(host):
    async with client(host) as c:
        h = {"Idempotency-Key": "k-1"}
        first = await c.post("/v1/notes", json={"text": "a"}, headers=h)
        again = await c.post("/v1/notes", json={"text": "a"}, headers=h)
        assert first.status_code == again.status_code == 200
        assert again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
        other = await c.post("/v1/notes", json={"text": "b"}, headers=h)
        assert other.status_code == 422
        assert other.json()["error"]["code"] == "idempotency_key_reused"
        assert other.json()["error"]["request_id"].startswith("req_")
        boom = await c.post("/v1/notes", json={"text": "c", "explode": True},
                            headers={"Idempotency-Key": "k-2"})
        assert boom.status_code == 500
        assert boom.json()["error"]["type"] == "api_error"
        # an unhandled error's answer carries its request id, as every answer does
        assert boom.json()["error"]["request_id"].startswith("req_")
        assert boom.headers["request-id"] == boom.json()["error"]["request_id"]
        # and its server span says it failed, with the exception
        [span] = [s for s in SPANS.get_finished_spans()
                  if s.attributes.get("billstream.request_id") == boom.headers["request-id"]]
        assert span.status.status_code.name == "ERROR"
        assert span.attributes["http.status_code"] == 500
        assert any(e.name == "exception" for e in span.events)
        # The endpoint ran (it may have committed before failing): its answer is kept, so a
        # retry with the same key replays it instead of running the endpoint again.
        again = await c.post("/v1/notes", json={"text": "c", "explode": True},
                             headers={"Idempotency-Key": "k-2"})
        assert again.status_code == 500 and again.headers["idempotent-replayed"] == "true"
        assert again.json()["error"]["code"] == "internal_error"
        # text PostgreSQL cannot store (a NUL) is the request's fault: 400, stored and
        # replayed as such, nothing applied
        nul = await c.post("/v1/notes", json={"text": "a\x00b"},
                           headers={"Idempotency-Key": "k-3"})
        assert nul.status_code == 400, nul.text
        assert nul.json()["error"]["code"] == "parameter_invalid"
        assert nul.headers["request-id"] == nul.json()["error"]["request_id"]
        nul_again = await c.post("/v1/notes", json={"text": "a\x00b"},
                                 headers={"Idempotency-Key": "k-3"})
        assert nul_again.status_code == 400
        assert nul_again.headers["idempotent-replayed"] == "true"
        no_key = await c.post("/v1/notes", json={"text": "\x00"})
        assert no_key.status_code == 400
    assert EXPLODED["n"] == 1
    assert await host.pool.fetchval("SELECT count(*) FROM notes") == 1
    assert await host.pool.fetchval(
        "SELECT status FROM idempotency_keys WHERE key = 'k-2'") == "done"


async def test_concurrent_duplicate_gets_409(host):
    body = orjson.dumps({"text": "a"})
    await host.pool.execute(
        "INSERT INTO idempotency_keys (tenant_id, environment, key, request_hash, status)"
        " VALUES ('ten_1', 'test', 'k-busy', $1, 'in_progress')",
        hash_request("POST", "/v1/notes", b"", body))
    async with client(host) as c:
        r = await c.post("/v1/notes", content=body, headers={"Idempotency-Key": "k-busy",
                                                             "content-type": "application/json"})
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "idempotency_key_in_use"
    assert await host.pool.fetchval("SELECT count(*) FROM notes") == 0


async def test_errors_have_one_shape(host):
    async with client(host) as c:
        r = await c.post("/v1/notes", json={"text": "a"},
                         headers={"Authorization": "Bearer sk_test_nope"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = await c.post("/v1/notes", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = await c.get("/v1/nowhere")
        assert r.status_code == 404 and r.json()["error"]["code"] == "route_not_found"
        assert r.headers["request-id"] == r.json()["error"]["request_id"]


async def test_one_trace_from_http_to_consumer(host):
    SPANS.clear()
    async with client(host) as c:
        await c.post("/v1/notes", json={"text": "traced"})
    await eventually(lambda: _eq(counted(host), 1))

    def traces():
        spans = SPANS.get_finished_spans()
        http = [s for s in spans if s.name == "POST /v1/notes"
                and "billstream.request_id" in (s.attributes or {})]
        consume = [s for s in spans if s.name == "consume note.created"]
        return bool(http and consume) and http[0].context.trace_id == consume[0].context.trace_id

    async def probe():
        return traces()

    await eventually(probe, message="HTTP and consumer spans share one trace")


async def test_rebuild_by_replay(fresh_database, kafka_bootstrap):
    topic, group = unique("notes"), unique("g")
    h = build_host(fresh_database, kafka_bootstrap, topic, group)
    await h.start(serve_http=False)
    try:
        async with h.pool.acquire() as conn, conn.transaction():
            await h.store.append(conn, [NewEvent(
                {"note_id": f"n{i}", "text": "x"}, type="note.created", tenant_id="ten_1",
                environment="test", aggregate_type="note", aggregate_id=f"n{i}",
                occurred_at=datetime.now(UTC)) for i in range(30)])
        await eventually(lambda: _eq(counted(h), 30))
    finally:
        await h.stop()
    generation = await build_host(fresh_database, kafka_bootstrap, topic, group).rebuild("counter")
    assert generation == 2
    h2 = build_host(fresh_database, kafka_bootstrap, topic, group)
    await h2.start(serve_http=False)
    try:
        assert h2.consumers[0].group_id.endswith(".g2")
        await eventually(lambda: _eq(counted(h2), 30), message="rebuilt by replay")
    finally:
        await h2.stop()


async def _eq(awaitable, expected):
    return (await awaitable) == expected


async def test_stop_ends_tasks_that_lost_a_cancellation(fresh_database, kafka_bootstrap):
    """A background task that swallows its cancellation once (as Python 3.11's wait_for can
    when a cancellation lands just as its inner await completes) must not hang the stop; nor
    may a task whose cancellation surfaced as an exception be restarted."""
    h = build_host(fresh_database, kafka_bootstrap, unique("notes"), unique("g"))
    restarts, converting_started = [], asyncio.Event()

    async def converts_its_cancellation(host):
        restarts.append(1)
        converting_started.set()
        try:
            await asyncio.Event().wait()  # until cancelled
        except asyncio.CancelledError:
            raise RuntimeError("cancelled, reported as a failure") from None

    h.tasks.append(converts_its_cancellation)
    await h.start(serve_http=False)

    stubborn_started = asyncio.Event()

    async def stubborn():
        stubborn_started.set()
        try:
            await asyncio.Event().wait()  # until cancelled
        except asyncio.CancelledError:
            pass  # lost once
        await asyncio.Event().wait()  # until cancelled

    h._running.append(asyncio.create_task(stubborn(), name="stubborn"))
    await asyncio.wait_for(stubborn_started.wait(), timeout=30)
    await asyncio.wait_for(converting_started.wait(), timeout=30)
    await asyncio.wait_for(h.stop(), timeout=60)
    assert all(t.done() for t in h._running)
    assert restarts == [1]


async def test_stored_envelopes_are_compressed_with_lz4_where_the_server_has_it(host):
    """pglz costs about 3 µs of PostgreSQL's CPU per ingested event; the migration switches
    the envelope to lz4 when the server is built with it and leaves the default otherwise
    (the embedded server has no lz4; the postgres image has)."""
    async with host.pool.acquire() as conn:
        try:
            async with conn.transaction():
                await conn.execute(
                    "CREATE TEMP TABLE lz4_probe (b bytea COMPRESSION lz4) ON COMMIT DROP")
            has_lz4 = True
        except (asyncpg.FeatureNotSupportedError, asyncpg.PostgresSyntaxError):
            has_lz4 = False  # (no lz4; before PostgreSQL 14, no COMPRESSION clause)
        method = await conn.fetchval(
            "SELECT attcompression::text FROM pg_attribute"
            " WHERE attrelid = 'event_log'::regclass AND attname = 'envelope'")
    assert method == ("l" if has_lz4 else "")
