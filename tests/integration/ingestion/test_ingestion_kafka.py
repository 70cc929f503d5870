"""The Kafka input (`billstream.usage.raw`) against a real broker and PostgreSQL: native and
CloudEvents records (structured and binary), every event's outcome (accepted onto the log,
rejected or duplicate onto billstream.usage.rejected with the reason), dedup shared with HTTP,
and offsets committed only after the events are durable."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from billstream_testing.waiting import eventually
from ingestion_harness import RAW_PARTITIONS, Ingestion

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC).replace(microsecond=0)
RECENT = (NOW - timedelta(hours=1)).isoformat().replace("+00:00", "Z")


def native(key, customer="acme-1", **extra):
    return orjson.dumps({"idempotency_key": key, "customer": customer, "meter": "api_calls",
                         "timestamp": RECENT, **extra})


async def accepted_keys(ingestion: Ingestion, n: int) -> dict[str, dict]:
    async def probe():
        events = [e for e in await ingestion.accepted_events()
                  if e["type"] == "usage.batch_accepted"]
        return {e["data"]["idempotency_key"]: e["data"] for e in events} \
            if len(events) >= n else None

    return await eventually(probe, timeout=30, message=f"{n} accepted events")


async def test_native_and_cloudevents_records_are_ingested(ingestion: Ingestion):
    await ingestion.create_meter("api_calls")
    auth = ("billstream-api-key", ingestion.key.encode())
    structured = orjson.dumps({
        "specversion": "1.0", "id": "e-1", "source": "//acme/api", "type": "api_calls",
        "subject": "acme-2", "time": RECENT, "data": {"quantity": "2.5", "region": "eu"}})
    binary_headers = [auth, ("ce_specversion", b"1.0"), ("ce_id", b"e-2"),
                      ("ce_source", b"//acme/api"), ("ce_type", b"api_calls"),
                      ("ce_subject", b"acme-3"), ("ce_time", RECENT.encode()),
                      ("content-type", b"application/json")]
    await ingestion.produce_raw(
        (b"acme-1", native("n-1", quantity=3, properties={"path": "/x"}), [auth]),
        (b"acme-2", structured, [auth, ("content-type", b"application/cloudevents+json")]),
        (b"acme-3", orjson.dumps({"quantity": 7, "zone": "b"}), binary_headers),
    )
    got = await accepted_keys(ingestion, 3)
    assert got["n-1"]["quantity"] == "3" and got["n-1"]["properties"] == {"path": "/x"}
    ce = got["//acme/api e-1"]
    assert (ce["customer"], ce["meter"], ce["quantity"], ce["properties"]) == (
        "acme-2", "api_calls", "2.5", {"region": "eu"})
    assert ce["timestamp"] == RECENT
    binary = got["//acme/api e-2"]
    assert (binary["customer"], binary["quantity"], binary["properties"]) == (
        "acme-3", "7", {"zone": "b"})


async def test_every_refused_record_is_reported_with_its_reason(ingestion: Ingestion):
    await ingestion.create_meter("api_calls")
    auth = ("billstream-api-key", ingestion.key.encode())
    old = (NOW - timedelta(days=40)).isoformat().replace("+00:00", "Z")
    future = (NOW + timedelta(minutes=30)).isoformat().replace("+00:00", "Z")
    await ingestion.produce_raw(
        (b"c", native("ok-1"), [auth]),
        (b"c", b"{not json", [auth, ("trace", b"t-1")]),
        (b"c", native("no-key"), []),
        (b"c", native("bad-key"), [("billstream-api-key", b"sk_test_nope")]),
        (b"c", native("meter-1", meter="nope"), [auth]),
        (b"c", native("old-1", timestamp=old), [auth]),
        (b"c", native("future-1", timestamp=future), [auth]),
        (b"c", native("ok-1", quantity=2), [auth]),  # same key, other payload
        (b"c", native("ok-1"), [auth]),  # the same event again
        (b"c", orjson.dumps({"specversion": "1.0", "id": "x", "source": "//s",
                             "type": "api_calls"}), [auth]),  # no subject
        (b"c", b"\xff\xfe", [auth]),
    )
    reports = await ingestion.rejections(10)
    by_offset = {r["source"]["offset"]: r for r in reports}
    assert sorted(by_offset) == list(range(1, 11))  # every record but the first, once
    expect = {
        1: ("rejected", "invalid_json"),
        2: ("rejected", "missing_api_key"),
        3: ("rejected", "invalid_api_key"),
        4: ("rejected", "unknown_meter"),
        5: ("rejected", "timestamp_out_of_window"),
        6: ("rejected", "timestamp_out_of_window"),
        7: ("rejected", "idempotency_key_conflict"),
        8: ("duplicate", "duplicate"),
        9: ("rejected", "invalid_event"),
        10: ("rejected", "invalid_json"),
    }
    assert {o: (r["status"], r["code"]) for o, r in by_offset.items()} == expect
    assert by_offset[9]["param"] == "subject"  # named as the CloudEvents attribute
    assert by_offset[4]["param"] == "meter" and "nope" in by_offset[4]["message"]
    assert by_offset[8]["usage_id"] and by_offset[8]["idempotency_key"] == "ok-1"
    assert by_offset[1]["record"]["value"] == "{not json"
    assert by_offset[10]["record"]["value"] is None and by_offset[10]["record"]["value_base64"]
    # the tenant is named whenever the key is good, the value readable or not (a producer
    # reading the topic for its tenant sees every report of its own)
    assert {o: r["tenant_id"] for o, r in by_offset.items()} == {
        o: None if o in (2, 3) else ingestion.tenant_id for o in by_offset}
    assert by_offset[1]["environment"] == "test"
    # headers travel with the report, but never the API key
    assert by_offset[1]["_headers"]["trace"] == b"t-1"
    assert all("billstream-api-key" not in r["_headers"] for r in reports)
    assert all(r["_headers"]["billstream-outcome"] == r["status"].encode() for r in reports)
    got = await accepted_keys(ingestion, 1)
    assert list(got) == ["ok-1"]
    # and counted by outcome (the accepted ones are not listed by the write: they are the
    # records left when the others are counted)
    registry = ingestion.host.metrics.registry

    async def counted():
        counts = {outcome: registry.get_sample_value(
            "billstream_usage_events_total", {"channel": "kafka", "outcome": outcome})
            for outcome in ("accepted", "duplicate", "rejected")}
        return counts if counts["rejected"] == 9 else None

    assert await eventually(counted, timeout=10, message="the counts") == {
        "accepted": 1, "duplicate": 1, "rejected": 9}


async def test_dedup_is_shared_with_http(ingestion: Ingestion):
    await ingestion.create_meter("api_calls")
    async with ingestion.client() as c:
        r = await c.post("/v1/usage/events", json={
            "idempotency_key": "shared-1", "customer": "acme-1", "meter": "api_calls",
            "timestamp": RECENT})
    assert r.json()["accepted"] == 1
    await ingestion.produce_raw(
        (b"acme-1", native("shared-1"), [("billstream-api-key", ingestion.key.encode())]))
    [report] = await ingestion.rejections(1)
    assert (report["status"], report["idempotency_key"]) == ("duplicate", "shared-1")
    assert report["usage_id"] == r.json()["results"][0]["usage_id"]
    assert len(await accepted_keys(ingestion, 1)) == 1


async def test_offsets_are_committed_after_the_events_are_durable(ingestion: Ingestion):
    await ingestion.create_meter("api_calls")
    auth = ("billstream-api-key", ingestion.key.encode())
    await ingestion.produce_raw(*[(b"c", native(f"c-{i}"), [auth]) for i in range(50)])
    await accepted_keys(ingestion, 50)
    await _offsets_reach(ingestion, 50)
    async with ingestion.host.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM usage_keys") == 50


async def test_a_failed_write_rewinds_its_poll_and_the_one_prepared_behind_it(
        ingestion: Ingestion):
    """The input prepares poll N+1 while poll N is written. When N's write fails, both are
    fetched again: every event ends up stored once and the offsets reach the end."""
    await ingestion.create_meter("api_calls")
    auth = ("billstream-api-key", ingestion.key.encode())
    runner = ingestion.host.app.state.raw_input
    runner.settings = runner.settings.model_copy(update={"raw_max_records": 10})
    real_write, real_stage = runner._write, runner.stage
    failures = []
    staged_behind = asyncio.Event()

    async def stage(records):
        staged = await real_stage(records)
        if failures:
            staged_behind.set()
        return staged

    async def failing_once(prepared):
        if not failures:
            failures.append(sum(len(p.valid) for p in prepared))
            # fail only once the next poll has been prepared behind this one
            await asyncio.wait_for(staged_behind.wait(), timeout=30)
            raise RuntimeError("injected write failure")
        return await real_write(prepared)

    runner._write, runner.stage = failing_once, stage
    # 15 records on each of 8 partitions: polls of 10 span partitions, so the poll prepared
    # behind the failed one holds partitions the failed one did not
    partitioner, by_partition, all_ = DefaultPartitioner(), {}, list(range(RAW_PARTITIONS))
    for n in range(1000):
        by_partition.setdefault(partitioner(f"c{n}".encode(), all_, all_), f"c{n}".encode())
    assert len(by_partition) == RAW_PARTITIONS
    await ingestion.produce_raw(*[(by_partition[i % RAW_PARTITIONS], native(f"f-{i}"), [auth])
                                  for i in range(120)])
    keys = await accepted_keys(ingestion, 120)
    assert failures and staged_behind.is_set()
    assert sorted(keys) == sorted(f"f-{i}" for i in range(120))
    await _offsets_reach(ingestion, 120)
    async with ingestion.host.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM usage_keys") == 120
    assert len(await ingestion.accepted_events()) == 120  # logged once each


async def test_a_write_that_fails_at_once_loses_nothing_fetched_meanwhile(
        ingestion: Ingestion):
    """A write that fails before the next poll is staged: while it backs off, the loop
    fetches again, and that fetch may hold records of the failed poll's partitions (records
    produced meanwhile, or the failed poll's own). Both polls are read again: nothing is
    skipped, and no offset is committed past a record that was not handled."""
    await ingestion.create_meter("api_calls")
    auth = ("billstream-api-key", ingestion.key.encode())
    runner = ingestion.host.app.state.raw_input
    real_write = runner._write
    failures = []

    async def failing_once(prepared):
        if not failures:
            failures.append(sum(len(p.valid) for p in prepared))
            # records on the same partition arrive while the failed write backs off
            await ingestion.produce_raw(*[(b"acme-1", native(f"b-{i}"), [auth])
                                          for i in range(5)])
            raise RuntimeError("injected write failure")
        return await real_write(prepared)

    runner._write = failing_once
    await ingestion.produce_raw(*[(b"acme-1", native(f"a-{i}"), [auth]) for i in range(20)])
    await eventually(lambda: _eq(lambda: _count(failures), 1), timeout=30)
    await ingestion.produce_raw((b"acme-1", native("c-0"), [auth]))
    keys = await accepted_keys(ingestion, 26)
    assert sorted(keys) == sorted([f"a-{i}" for i in range(20)]
                                  + [f"b-{i}" for i in range(5)] + ["c-0"])
    await _offsets_reach(ingestion, 26)
    assert await ingestion.host.pool.fetchval("SELECT count(*) FROM usage_keys") == 26


async def test_a_record_too_large_to_echo_is_reported_without_its_value(
        ingestion: Ingestion):
    """An 800 KB value that is not UTF-8 is `event_too_large`; echoed as base64 its report
    would pass the producer's 1 MiB limit, fail, and hold its poll back forever. The report
    leaves the value out (the source offset names it) and everything around it goes on."""
    await ingestion.create_meter("api_calls")
    auth = ("billstream-api-key", ingestion.key.encode())
    await ingestion.produce_raw(
        (b"acme-1", native("before"), [auth]),
        (b"acme-1", b"\xff" * 800_000, [auth, ("trace", b"t-9")]),
        (b"acme-1", native("after"), [auth]))
    [report] = await ingestion.rejections(1)
    assert (report["code"], report["source"]["offset"]) == ("event_too_large", 1)
    assert report["record"] == {"key": "acme-1", "value": None, "value_omitted": True,
                                "value_bytes": 800_000}
    assert report["_headers"]["trace"] == b"t-9"
    assert sorted(await accepted_keys(ingestion, 2)) == ["after", "before"]
    await _offsets_reach(ingestion, 3)


async def test_records_with_a_header_name_that_is_not_utf8_are_read(ingestion: Ingestion,
                                                                     monkeypatch):
    """librdkafka sends header names as any bytes; aiokafka alone raises on such a record
    every time it is fetched, stopping every partition of the input. The records are read
    (billstream_messaging.records); the name travels in reports with \\x escapes."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.producer import message_accumulator
    from aiokafka.producer import producer as producer_module
    from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

    class Raw(str):  # a header name that the (pure-Python) builder writes as these bytes
        def encode(self, *args, **kwargs):
            return b"x-\xff"

    await ingestion.create_meter("api_calls")
    auth = ("billstream-api-key", ingestion.key.encode())
    for module in (message_accumulator, producer_module):
        monkeypatch.setattr(module, "DefaultRecordBatchBuilder", _DefaultRecordBatchBuilderPy)
    producer = AIOKafkaProducer(bootstrap_servers=ingestion.bootstrap, acks="all",
                                enable_idempotence=False, linger_ms=50)
    await producer.start()
    try:  # one batch: good records before and after the bad ones
        sent = [await producer.send(ingestion.raw_topic, key=b"acme-1", value=value,
                                    headers=headers) for value, headers in [
            (native("h-0"), [auth]),
            (native("h-1"), [auth, (Raw("x"), b"v")]),
            (native("h-2", meter="nope"), [auth, (Raw("x"), b"w")]),
            (native("h-3"), [auth]),
        ]]
        offsets = [(await f).offset for f in sent]
    finally:
        await producer.stop()
    monkeypatch.undo()
    assert offsets == [0, 1, 2, 3]
    await ingestion.produce_raw((b"other-9", native("h-4", customer="other-9"), [auth]))
    assert sorted(await accepted_keys(ingestion, 4)) == ["h-0", "h-1", "h-3", "h-4"]
    [report] = await ingestion.rejections(1)
    assert (report["code"], report["idempotency_key"]) == ("unknown_meter", "h-2")
    assert report["_headers"]["x-\\xff"] == b"w"
    await _offsets_reach(ingestion, 5)


async def test_a_nul_character_is_reported_and_does_not_hold_the_input(ingestion: Ingestion):
    """PostgreSQL refuses NUL in text: such an event used to fail its poll's write again and
    again, holding every record behind it."""
    await ingestion.create_meter("api_calls")
    auth = ("billstream-api-key", ingestion.key.encode())
    await ingestion.produce_raw((b"acme-1", native("k\x00"), [auth]),
                                (b"acme-1", native("after-nul"), [auth]))
    [report] = await ingestion.rejections(1)
    assert (report["code"], report["param"]) == ("invalid_event", "idempotency_key")
    assert list(await accepted_keys(ingestion, 1)) == ["after-nul"]
    await _offsets_reach(ingestion, 2)


async def _count(items) -> int:
    return len(items)


async def test_a_poll_is_encoded_while_staged_and_written_as_encoded(ingestion: Ingestion):
    """The CPU half of a write (usage ids, usage JSON, batch events, key claims) is done when
    the poll is staged, overlapping the write of the poll before; the write then claims and
    appends exactly what was staged."""
    await ingestion.create_meter("api_calls")
    auth = ("billstream-api-key", ingestion.key.encode())
    runner = ingestion.host.app.state.raw_input
    real_stage = runner.stage
    staged_ids: dict[str, str] = {}
    unencoded = []

    async def stage(records):
        staged = await real_stage(records)
        for prepared in staged.prepared:
            if prepared.valid and prepared.encoded is None:
                unencoded.append(prepared)
            elif prepared.valid:
                staged_ids.update((c.idempotency_key, c.usage_id)
                                  for c in prepared.encoded.claims)
        return staged

    runner.stage = stage
    await ingestion.produce_raw(*[(b"c", native(f"enc-{i}"), [auth]) for i in range(30)])
    keys = await accepted_keys(ingestion, 30)
    assert not unencoded
    assert {k: v["usage_id"] for k, v in keys.items()} == staged_ids


async def _offsets_reach(ingestion: Ingestion, n: int) -> None:
    """Until the Kafka input's group has committed `n` offsets in all of its topic."""
    consumer = AIOKafkaConsumer(bootstrap_servers=ingestion.bootstrap,
                                group_id=ingestion.host.app.state.raw_input.group_id,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(ingestion.raw_topic) or set()

        async def committed() -> int:
            return sum([(await consumer.committed(TopicPartition(ingestion.raw_topic, p))) or 0
                        for p in partitions])

        assert await eventually(lambda: _eq(committed, n), timeout=30)
    finally:
        await consumer.stop()


async def _eq(probe, value) -> bool:
    return await probe() == value


async def test_a_librdkafka_producer_works_from_the_documentation(ingestion: Ingestion):
    """confluent-kafka (librdkafka), configured only as docs/ingestion.md says: default
    partitioner, acks=all, the API key header, one JSON event per record."""
    import asyncio

    from confluent_kafka import Producer

    await ingestion.create_meter("api_calls")
    producer = Producer({"bootstrap.servers": ingestion.bootstrap, "acks": "all",
                         "linger.ms": 5, "compression.type": "none"})
    delivered: list = []
    for i in range(200):
        producer.produce(
            ingestion.raw_topic, key=f"acme-{i % 7}",
            value=native(f"rdk-{i}", customer=f"acme-{i % 7}", quantity=i),
            headers=[("billstream-api-key", ingestion.key)],
            on_delivery=lambda err, msg: delivered.append(err))
    producer.produce(  # a CloudEvent in binary mode, headers as librdkafka sends them
        ingestion.raw_topic, key="acme-1", value=b'{"quantity": "3"}',
        headers=[("billstream-api-key", ingestion.key), ("ce_specversion", "1.0"),
                 ("ce_id", "rdk-ce"), ("ce_source", "//rdkafka"), ("ce_type", "api_calls"),
                 ("ce_subject", "acme-1"), ("content-type", "application/json")],
        on_delivery=lambda err, msg: delivered.append(err))
    remaining = await asyncio.to_thread(producer.flush, 30)
    assert remaining == 0 and delivered == [None] * 201
    got = await accepted_keys(ingestion, 201)
    assert got["rdk-199"]["quantity"] == "199"
    assert got["//rdkafka rdk-ce"]["quantity"] == "3"


async def test_the_kafka_input_pauses_while_the_relay_is_behind(ingestion: Ingestion):
    """Backpressure on the Kafka path: with the relay's backlog over the limit the input stops
    taking records (they wait in the topic) and resumes once it drains — nothing lost."""
    from billstream_ingestion.admission import Admission

    await ingestion.create_meter("api_calls")
    auth = ("billstream-api-key", ingestion.key.encode())
    host = ingestion.host
    runner = host.app.state.raw_input
    await host.relay.stop()  # nothing is published: the backlog only grows
    runner.admission = Admission(host.settings.model_copy(update={"max_relay_lag_bytes": 100}),
                                 pool=lambda: host.pool)
    await ingestion.produce_raw(*[(b"c", native(f"p-{i}"), [auth]) for i in range(30)])

    async def stored() -> int:
        return await host.pool.fetchval("SELECT count(*) FROM usage_keys")

    await eventually(lambda: _eq(lambda: _gt(stored, 10), True), timeout=30)
    await eventually(lambda: _eq(lambda: _is(runner, "paused"), True), timeout=30)
    paused_at = await stored()
    await ingestion.produce_raw(*[(b"c", native(f"q-{i}"), [auth]) for i in range(30)])
    # the loop goes round several times with the new records waiting in the topic
    rounds, backlogged = [], runner.admission.backlogged

    async def counted_backlogged() -> bool:
        rounds.append(1)
        return await backlogged()

    runner.admission.backlogged = counted_backlogged
    await eventually(lambda: _eq(lambda: _gt(lambda: _count(rounds), 4), True), timeout=30)
    assert await stored() == paused_at < 60
    # the backlog drains (the relay publishes again): the input resumes, nothing is lost
    from billstream_messaging.relay import OutboxRelay
    host.relay = OutboxRelay(store=host.store, pool=host.pool, settings=host.settings,
                             metrics=host.metrics)
    await host.relay.start()
    await eventually(lambda: _eq(stored, 60), timeout=30)
    await eventually(lambda: _eq(lambda: _is(runner, "paused"), False), timeout=30)


async def _gt(probe, value) -> bool:
    return await probe() > value


async def _is(obj, name) -> bool:
    return getattr(obj, name)


async def test_a_binary_cloudevent_without_data_counts_one(ingestion: Ingestion):
    await ingestion.create_meter("api_calls")
    headers = [("billstream-api-key", ingestion.key.encode()), ("ce_specversion", b"1.0"),
               ("ce_id", b"nodata"), ("ce_source", b"//acme"), ("ce_type", b"api_calls"),
               ("ce_subject", b"acme-1")]
    await ingestion.produce_raw((b"acme-1", b"", headers), (b"acme-1", None, [
        *headers[:2], ("ce_id", b"nodata-2"), *headers[3:]]))
    got = await accepted_keys(ingestion, 2)
    assert got["//acme nodata"]["quantity"] == "1" and got["//acme nodata"]["properties"] == {}
    assert got["//acme nodata-2"]["quantity"] == "1"
