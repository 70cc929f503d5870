"""Fault tests of ingestion itself: SIGKILL in the middle of batches, over HTTP and over the
Kafka input (`billstream.usage.raw`). Whatever was acknowledged (a 200 over HTTP; for Kafka,
an event taken from the topic) is counted, and nothing is counted twice: the idempotency key
is claimed in the same transaction as the event is appended, so a batch committed just before
the crash comes back as duplicates when it is sent (or redelivered) again."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from typing import Self

import asyncpg
import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from billstream_contracts.topics import TOPICS, USAGE_RAW, USAGE_REJECTED
from billstream_messaging import published_envelope
from billstream_testing.waiting import eventually
from billstream_testing.webhooks import WebhookReceiver
from conftest import start_stack
from flow import Api, send_usage, setup_customer, usage_events, usage_total

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

TOTAL = 20_000
CLIENTS = 4
BATCH = 500
#: ingestion is killed once at least this many HTTP batches (of TOTAL / BATCH) were
#: acknowledged
KILL_AFTER_BATCHES = 4
#: The Idempotency-Key lease of the stack under test (60 s by default): how long a batch whose
#: request died with the process waits before its retry may run it again.
LEASE_S = 3
CLOCK_TIME = datetime(2026, 1, 31, tzinfo=UTC)


async def _customer_on_advanced_clock(stack, api: Api, receiver_url: str, external_id: str,
                                      ) -> dict:
    """The README's customer, its test clock advanced to 2026-01-31 and known to ingestion as
    such (otherwise January usage would be judged against the wall clock)."""
    objs = await setup_customer(api, receiver_url, external_id=external_id)
    await api.post(f"/v1/test_clocks/{objs['clock']['id']}/advance",
                   {"frozen_time": "2026-01-31T00:00:00Z"})

    async def clock_known() -> bool:
        db = await asyncpg.connect(stack.database_url("ingestion"))
        try:
            frozen = await db.fetchval(
                "SELECT t.frozen_time FROM customers c JOIN test_clocks t"
                " ON t.test_clock_id = c.test_clock_id WHERE c.external_id = $1", external_id)
        finally:
            await db.close()
        return frozen is not None and frozen >= CLOCK_TIME

    await eventually(clock_known, timeout=60, interval=0.2,
                     message=f"ingestion to know {external_id}'s clock at {CLOCK_TIME}")
    return objs


async def _ingestion_counts(stack, tenant_id: str) -> tuple[dict[str, str], dict[str, int]]:
    """(idempotency key → usage id in usage_keys, idempotency key → number of usages in the
    log's usage.batch_accepted events) for the tenant, from ingestion's own database."""
    db = await asyncpg.connect(stack.database_url("ingestion"))
    try:
        keys = await db.fetch(
            "SELECT idempotency_key, usage_id FROM usage_keys WHERE tenant_id = $1", tenant_id)
        rows = await db.fetch(
            "SELECT seq, envelope, envelope_codec FROM event_log"
            " WHERE tenant_id = $1 AND type = 'usage.batch_accepted'", tenant_id)
    finally:
        await db.close()
    logged = Counter(  # stored compressed from a size on (EventStore zstd_min_bytes)
        u["idempotency_key"] for r in rows
        for u in orjson.loads(published_envelope(r["seq"], r["envelope"],
                                                 r["envelope_codec"]))["data"]["usages"])
    return {r["idempotency_key"]: r["usage_id"] for r in keys}, dict(logged)


async def _metering_rows(stack, tenant_id: str) -> int:
    db = await asyncpg.connect(stack.database_url("metering"))
    try:
        return await db.fetchval(
            "SELECT count(*) FROM usage_records WHERE tenant_id = $1", tenant_id)
    finally:
        await db.close()


def _assert_logged_once(expected: set[str], keys: dict[str, str], logged: dict[str, int]
                        ) -> None:
    """usage_keys and the accepted-usage log hold exactly the expected keys, each once."""
    missing_keys = expected - set(keys)
    extra_keys = set(keys) - expected
    assert not missing_keys and not extra_keys, (
        f"usage_keys has {len(keys)} rows for {len(expected)} distinct events sent: "
        f"{len(missing_keys)} missing (e.g. {sorted(missing_keys)[:5]}), "
        f"{len(extra_keys)} unexpected (e.g. {sorted(extra_keys)[:5]})")
    twice = {k: n for k, n in logged.items() if n != 1}
    missing_log = expected - set(logged)
    assert sum(logged.values()) == len(expected) and not twice and not missing_log, (
        f"event_log has {sum(logged.values())} accepted usages for {len(expected)} "
        f"distinct events: {len(missing_log)} never logged (e.g. {sorted(missing_log)[:5]}), "
        f"{len(twice)} logged more than once (e.g. {sorted(twice.items())[:5]})")


async def _wait_total(api: Api, external_id: str, expected: int, timeout: float) -> None:
    """Wait until metering's total for the customer reads `expected`; on a timeout, say what
    it read last (fewer: events lost; more: counted twice)."""
    async def probe() -> bool:
        total = await usage_total(api, external_id)
        if total > expected:
            return True  # it will not come down again: fail at once, below
        assert total == expected, f"metering's total is {total} of {expected} events"
        return True

    await eventually(probe, timeout=timeout, interval=0.25,
                     message=f"metering's total for {external_id} to reach {expected}")
    total = await usage_total(api, external_id)
    assert total == Decimal(expected), (
        f"metering's total is {total} for {expected} distinct events: "
        f"{total - expected} counted twice")


async def _stays(api: Api, external_id: str, expected: int) -> None:
    """The total reached `expected`; a couple of seconds later (late redeliveries, relay
    republishing a tail) it still reads exactly that."""
    await asyncio.sleep(2.5)
    total = await usage_total(api, external_id)
    assert total == Decimal(expected), (
        f"metering's total moved from {expected} to {total} after it had converged: "
        f"{total - expected} counted twice (or lost)")


# ------------------------------------------------------------------------------------- HTTP


class _Producer:
    """A client that streams its batches and resends a batch until it is answered 200, as a
    real producer would: a connection error, a 5xx (502 from the gateway while ingestion is
    down) or a 503 (backpressure) is 'not acknowledged'. Every attempt of a batch carries the
    batch's one Idempotency-Key, as a careful client sends it: a request that died with the
    process holds its key until the lease (LEASE_S here) runs out, and the retry is told when
    to come back (409 + Retry-After), then runs the batch again. The events keep their own
    keys, which is what deduplicates them."""

    def __init__(self, http: httpx.AsyncClient, acked: dict[str, tuple[str, str]],
                 batches_acked: list[int], failures: Counter) -> None:
        self.http = http
        self.acked = acked  # idempotency key → (status in the first 200, usage id)
        self.batches_acked = batches_acked
        self.failures = failures

    async def stream(self, batches: list[list[dict]]) -> None:
        for batch in batches:
            body = await self._until_acknowledged(batch)
            results = body["results"]
            assert len(results) == len(batch), (len(results), len(batch))
            rejected = [r for r in results if r["status"] == "rejected"]
            assert not rejected, (f"{len(rejected)} of {len(batch)} events rejected, e.g. "
                                  f"{rejected[:3]}")
            for event, result in zip(batch, results, strict=True):
                assert result["idempotency_key"] == event["idempotency_key"], result
                assert result["status"] in ("accepted", "duplicate"), result
                self.acked.setdefault(event["idempotency_key"],
                                      (result["status"], result["usage_id"]))
            self.batches_acked[0] += 1

    async def _until_acknowledged(self, batch: list[dict]) -> dict:
        request_key = uuid.uuid4().hex
        while True:
            try:
                response = await self.http.post(
                    "/v1/usage/events", json={"events": batch},
                    headers={"Idempotency-Key": request_key})
            except httpx.TransportError as exc:
                self.failures[type(exc).__name__] += 1
                await asyncio.sleep(0.2)
                continue
            if response.status_code == 200:
                return response.json()
            if response.status_code >= 500:
                self.failures[f"http {response.status_code}"] += 1
                await asyncio.sleep(0.2)
                continue
            if (response.status_code == 409
                    and response.json()["error"]["code"] == "idempotency_key_in_use"):
                self.failures["http 409 (key of a dead request)"] += 1
                retry_after = int(response.headers["retry-after"])
                assert 1 <= retry_after <= 2, retry_after  # soon: the holder may be finishing
                await asyncio.sleep(retry_after)
                continue
            raise AssertionError(f"unexpected answer {response.status_code}: "
                                 f"{response.text[:500]}")


async def test_ingestion_killed_mid_http_batches_loses_nothing_acknowledged(tmp_path):
    stack, dev = start_stack(tmp_path, env={"BILLSTREAM_IDEMPOTENCY_LEASE_S": str(LEASE_S)})
    api = Api(stack.base_url, dev["test_secret_key"])
    tenant = dev["tenant_id"]
    try:
        async with WebhookReceiver() as receiver:
            await _customer_on_advanced_clock(stack, api, receiver.url, "http-kill-1")
            events = usage_events("http-kill-1", TOTAL, prefix="hk")
            sent = {e["idempotency_key"] for e in events}
            assert len(sent) == TOTAL
            per_client = TOTAL // CLIENTS
            slices = [events[i * per_client:(i + 1) * per_client] for i in range(CLIENTS)]
            acked: dict[str, tuple[str, str]] = {}
            batches_acked = [0]
            failures: Counter = Counter()
            producer = _Producer(api.http, acked, batches_acked, failures)
            killed: dict = {"after_batches": None, "in_window": False}

            async def killer() -> None:
                # Aim for the worst moment: a batch committed in ingestion's database whose
                # 200 has not reached its client yet (the answer is lost with the process).
                # If that moment is not caught by half the stream, kill anyway.
                db = await asyncpg.connect(stack.database_url("ingestion"))
                try:
                    async def moment() -> bool:
                        if batches_acked[0] < KILL_AFTER_BATCHES:
                            return False
                        stored = await db.fetchval(
                            "SELECT count(*) FROM usage_keys WHERE tenant_id = $1", tenant)
                        killed["in_window"] = stored > len(acked)
                        return killed["in_window"] or batches_acked[0] >= TOTAL // BATCH // 2

                    await eventually(moment, timeout=120, interval=0,
                                     message=f"{KILL_AFTER_BATCHES} batches acknowledged")
                    stack.kill_service("ingestion")  # SIGKILL, the clients mid-stream
                    killed["after_batches"] = batches_acked[0]
                    assert stack.exited().get("ingestion") is not None
                    await asyncio.sleep(1.0)  # the clients keep retrying a dead service
                    killed["keys"] = set(await db.fetchval(
                        "SELECT array_agg(idempotency_key) FROM usage_keys"
                        " WHERE tenant_id = $1", tenant) or ())
                finally:
                    await db.close()
                await asyncio.to_thread(stack.start_service, "ingestion")

            async with asyncio.timeout(300), asyncio.TaskGroup() as clients:
                clients.create_task(killer())
                for part in slices:
                    clients.create_task(producer.stream(
                        [part[i:i + BATCH] for i in range(0, len(part), BATCH)]))
            first_answers = Counter(status for status, _ in acked.values())
            print(f"killed after {killed['after_batches']} acknowledged batches "
                  f"(aimed window caught: {killed['in_window']}), "
                  f"{len(killed['keys'])} keys stored at the kill; failed attempts: "
                  f"{dict(failures)}; first answers: {dict(first_answers)}")
            assert killed["after_batches"] is not None
            assert killed["after_batches"] < TOTAL // BATCH, (
                "every batch was acknowledged before ingestion was killed: nothing tested")
            assert sum(failures.values()) > 0, "the kill interrupted no request"
            assert set(acked) == sent, f"{len(sent - set(acked))} events never acknowledged"
            # An event first answered `duplicate` was committed by a request whose answer the
            # crash swallowed: it must have been stored before the kill, not after.
            late = {k for k, (status, _) in acked.items() if status == "duplicate"} \
                - killed["keys"]
            assert not late, (f"{len(late)} events answered duplicate on their first 200 "
                              f"but not stored before the kill, e.g. {sorted(late)[:5]}")

            # Every acknowledged event is in ingestion's database, with the usage id it was
            # acknowledged with, and in its log exactly once.
            keys, logged = await _ingestion_counts(stack, tenant)
            _assert_logged_once(sent, keys, logged)
            other_id = {k: (usage_id, keys[k]) for k, (_, usage_id) in acked.items()
                        if keys[k] != usage_id}
            assert not other_id, (f"{len(other_id)} events acknowledged with a usage id that "
                                  f"is not the stored one, e.g. {list(other_id.items())[:5]}")

            # Metering counts each exactly once.
            await _wait_total(api, "http-kill-1", TOTAL, timeout=120)
            await _stays(api, "http-kill-1", TOTAL)
            rows = await _metering_rows(stack, tenant)
            assert rows == TOTAL, f"metering holds {rows} usage records for {TOTAL} events"

            # A producer resending everything (it cannot know what the crash swallowed):
            # all duplicates, the same usage ids, nothing more counted.
            again = await send_usage(api, events, batch=BATCH)
            assert again == {"accepted": 0, "duplicates": TOTAL, "rejected": 0}, again
            keys_after, logged_after = await _ingestion_counts(stack, tenant)
            assert keys_after == keys, "the resend changed usage_keys"
            _assert_logged_once(sent, keys_after, logged_after)
            await _stays(api, "http-kill-1", TOTAL)
            assert not stack.exited(), f"processes exited: {stack.exited()}"
    finally:
        await api.aclose()
        stack.stop()


# ------------------------------------------------------------------------------------ Kafka


class _Reports:
    """Everything on billstream.usage.rejected, read from the beginning in the background (no
    consumer group: every partition is assigned)."""

    def __init__(self, bootstrap: str) -> None:
        self.consumer = AIOKafkaConsumer(
            USAGE_REJECTED, bootstrap_servers=bootstrap, group_id=None,
            enable_auto_commit=False, auto_offset_reset="earliest")
        self.reports: list[dict] = []
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Self:
        await self.consumer.start()
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        await self.consumer.stop()

    async def _read(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=200)
            for records in batch.values():
                self.reports.extend(orjson.loads(r.value) for r in records)

    def of(self, tenant_id: str) -> list[dict]:
        """The reports of this tenant, and those of records that could not be attributed to
        any (a refused API key): on this stack they can only be ours."""
        return [r for r in self.reports if r.get("tenant_id") in (tenant_id, None)]


async def _produce(bootstrap: str, api_key: str, events: list[dict]) -> list[tuple[int, int]]:
    """Write one native event per record to billstream.usage.raw, keyed by customer, as an
    external producer; the (partition, offset) of each record, in order."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                enable_idempotence=False, linger_ms=5)
    await producer.start()
    try:
        headers = [("billstream-api-key", api_key.encode())]
        futures = [await producer.send(USAGE_RAW, value=orjson.dumps(e),
                                       key=e["customer"].encode(), headers=headers)
                   for e in events]
        metadata = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [(m.partition, m.offset) for m in metadata]


class _RawProgress:
    """How far ingestion got with billstream.usage.raw: keys stored in its database, and
    offsets committed by its consumer group (read with an admin client: nothing joins the
    group)."""

    GROUP = "billstream.ingestion.raw"

    def __init__(self, stack, tenant_id: str) -> None:
        self.stack = stack
        self.tenant_id = tenant_id
        count = next(t.partitions for t in TOPICS if t.name == USAGE_RAW)
        self.partitions = [TopicPartition(USAGE_RAW, p) for p in range(count)]

    async def __aenter__(self) -> Self:
        self.db = await asyncpg.connect(self.stack.database_url("ingestion"))
        self.admin = AIOKafkaAdminClient(bootstrap_servers=self.stack.kafka_bootstrap)
        await self.admin.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.admin.close()
        await self.db.close()

    async def offsets(self) -> dict[int, int]:
        committed = await self.admin.list_consumer_group_offsets(
            self.GROUP, partitions=self.partitions)
        return {tp.partition: meta.offset for tp, meta in committed.items()
                if tp.topic == USAGE_RAW and meta.offset >= 0}

    async def read(self) -> tuple[int, int]:
        """(keys stored, records whose offsets are committed); the topic is fresh, so the
        committed offsets add up to the records consumed for good."""
        stored = await self.db.fetchval(
            "SELECT count(*) FROM usage_keys WHERE tenant_id = $1", self.tenant_id)
        return stored, sum((await self.offsets()).values())

    async def keys(self) -> set[str]:
        rows = await self.db.fetch(
            "SELECT idempotency_key FROM usage_keys WHERE tenant_id = $1", self.tenant_id)
        return {r["idempotency_key"] for r in rows}

    async def settled(self) -> None:
        """After the kill: every session of the dead process has ended (so a COMMIT it had
        sent is resolved one way or the other), and the stored count and committed offsets
        read the same twice in a row (an OffsetCommit in flight has landed)."""
        await eventually(lambda: self._alone(), timeout=30,
                         message="the killed ingestion's database sessions to end")
        last: list[tuple[int, int]] = []

        async def steady() -> bool:
            last.append(await self.read())
            return len(last) > 1 and last[-1] == last[-2]

        await eventually(steady, timeout=30, interval=0.2,
                         message="stored keys and committed offsets to settle")

    async def _alone(self) -> bool:
        return await self.db.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND backend_type = 'client backend'"
            " AND pid <> pg_backend_pid()") == 0


def _not_duplicates(reports: list[dict]) -> list[dict]:
    return [r for r in reports if r.get("status") != "duplicate"]


async def test_ingestion_killed_while_consuming_the_kafka_input_counts_every_event_once(
        tmp_path):
    # polls of 500 records (5,000 by default): the input takes the topic in some forty
    # transactions, not four, so that the kill below lands part-way (at the default the
    # input had stored all 20,000 events before the kill could land)
    stack, dev = start_stack(tmp_path, env={"BILLSTREAM_INGESTION_RAW_MAX_RECORDS": "500"})
    api = Api(stack.base_url, dev["test_secret_key"])
    tenant = dev["tenant_id"]
    try:
        async with WebhookReceiver() as receiver, _Reports(stack.kafka_bootstrap) as reports:
            await _customer_on_advanced_clock(stack, api, receiver.url, "kafka-kill-1")
            events = usage_events("kafka-kill-1", TOTAL, prefix="kk")
            sent = {e["idempotency_key"] for e in events}

            first_offsets = await _produce(stack.kafka_bootstrap, dev["test_secret_key"],
                                           events)
            assert len(set(first_offsets)) == TOTAL

            # kill -9 ingestion while it is part-way through the topic, aiming for a moment
            # when what is stored in PostgreSQL and the committed offsets disagree: a poll
            # stored whose offsets are not committed yet (it is redelivered after the restart;
            # an input committing offsets before its poll is durable would show the opposite,
            # and lose the poll). If no such moment is caught by half the topic, any moment
            # part-way will do.
            async with _RawProgress(stack, tenant) as progress:
                async def moment() -> bool:
                    stored, committed = await progress.read()
                    if stored >= TOTAL:
                        return True  # too late: asserted below
                    return stored > 0 and (stored != committed or stored >= TOTAL // 2)

                await eventually(moment, timeout=120, interval=0,
                                 message="ingestion part-way through billstream.usage.raw")
                stack.kill_service("ingestion")
                assert stack.exited().get("ingestion") is not None
                await progress.settled()
                stored_at_kill, committed_at_kill = await progress.read()
                keys_at_kill = await progress.keys()
                offsets_at_kill = await progress.offsets()
            assert 0 < stored_at_kill < TOTAL, (
                f"ingestion had taken {stored_at_kill} of {TOTAL} events when it was killed: "
                "not part-way, nothing tested")
            # The records the restarted consumer gets again whose events were already stored:
            # they must come back as duplicates (reported), not be counted again.
            redelivered = {e["idempotency_key"] for e, (p, o) in zip(events, first_offsets,
                                                                     strict=True)
                           if o >= offsets_at_kill.get(p, 0)}
            must_report = redelivered & keys_at_kill
            stack.start_service("ingestion")

            # Once the restarted input has committed offsets past every record, every event
            # must be stored: a record whose offset was committed is never read again.
            async with _RawProgress(stack, tenant) as progress:
                async def all_consumed() -> bool:
                    stored, committed = await progress.read()
                    assert committed >= TOTAL, (
                        f"{committed} of {TOTAL} records consumed for good, {stored} stored")
                    return True

                await eventually(all_consumed, timeout=180, interval=0.2,
                                 message=f"the Kafka input to commit all {TOTAL} records")
                stored, _ = await progress.read()
            assert stored == TOTAL, (
                f"the Kafka input committed the offsets of all {TOTAL} records but only "
                f"{stored} events are stored: {TOTAL - stored} lost")
            await _wait_total(api, "kafka-kill-1", TOTAL, timeout=180)
            await _stays(api, "kafka-kill-1", TOTAL)
            keys, logged = await _ingestion_counts(stack, tenant)
            _assert_logged_once(sent, keys, logged)
            rows = await _metering_rows(stack, tenant)
            assert rows == TOTAL, f"metering holds {rows} usage records for {TOTAL} events"

            first = reports.of(tenant)
            bad = _not_duplicates(first)
            assert not bad, (f"{len(bad)} of {len(first)} reports on {USAGE_REJECTED} are not "
                             f"duplicates, e.g. {bad[:3]}")
            unknown = {r["idempotency_key"] for r in first} - sent
            assert not unknown, f"duplicates reported for keys never sent: {sorted(unknown)[:5]}"
            reported = {r["idempotency_key"] for r in first}
            print(f"killed with {stored_at_kill} of {TOTAL} keys stored and {committed_at_kill} "
                  f"offsets committed: {len(must_report)} stored events redelivered; "
                  f"{len(first)} duplicate reports ({len(reported)} keys) after the restart")
            unreported = must_report - reported
            assert not unreported, (
                f"{len(unreported)} of the {len(must_report)} events stored before the kill "
                f"and redelivered after it were not reported as duplicates, e.g. "
                f"{sorted(unreported)[:5]}")

            # The producer sends everything again: all duplicates, reported as such; nothing
            # more counted.
            second_offsets = set(await _produce(stack.kafka_bootstrap,
                                                dev["test_secret_key"], events))

            resent = {"bad": []}

            async def all_reported() -> bool:
                ours = [r for r in reports.of(tenant)
                        if (r["source"]["partition"], r["source"]["offset"]) in second_offsets]
                resent["bad"] = _not_duplicates(ours)
                seen = {(r["source"]["partition"], r["source"]["offset"]) for r in ours}
                if resent["bad"] or seen == second_offsets:
                    return True
                raise AssertionError(f"{len(seen)} of {TOTAL} resent records reported so far")

            await eventually(all_reported, timeout=120, interval=0.5,
                             message=f"{TOTAL} duplicate reports of the resent records")
            assert not resent["bad"], (
                f"{len(resent['bad'])} resent events reported other than as duplicates, "
                f"e.g. {resent['bad'][:3]}")
            bad = _not_duplicates(reports.of(tenant))
            assert not bad, (f"{len(bad)} reports on {USAGE_REJECTED} are not duplicates, "
                             f"e.g. {bad[:3]}")
            keys_after, logged_after = await _ingestion_counts(stack, tenant)
            assert keys_after == keys, "the resend changed usage_keys"
            _assert_logged_once(sent, keys_after, logged_after)
            await _stays(api, "kafka-kill-1", TOTAL)
            rows = await _metering_rows(stack, tenant)
            assert rows == TOTAL, f"metering holds {rows} usage records for {TOTAL} events"
            assert not stack.exited(), f"processes exited: {stack.exited()}"
    finally:
        await api.aclose()
        stack.stop()
