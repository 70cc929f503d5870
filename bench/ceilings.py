"""The ceilings of this machine that later figures are compared to: raw broker produce and
consume rates with the same client library the services use (aiokafka: per-message `send` and
its batch API), and PostgreSQL bulk insert rates (COPY and batched INSERT) for usage-sized rows.
The consumer reads both produced sets (2 × BENCH_CEILING_MESSAGES).

Also what the dedup key insert costs: COPY of rows shaped like ingestion's `usage_keys`
(primary key on idempotency key, tenant and environment, in that order), into a table whose key
columns compare as bytes (COLLATE "C", what Billstream creates its databases with), into one
under a linguistic collation (en_US.utf8 where the server has it, else C.UTF-8; most clusters
default to one of these), and into one whose primary key leads with tenant and environment
(ingestion's before migration 0006), BENCH_CEILING_KEY_ROWS twice each (C, tenant first,
other, other, tenant first, C), PostgreSQL's CPU per row where the server runs on this
machine."""

from __future__ import annotations

import asyncio
import os
import random
import time
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

N_MESSAGES = int(os.environ.get("BENCH_CEILING_MESSAGES", "200000"))
N_ROWS = int(os.environ.get("BENCH_CEILING_ROWS", "200000"))
N_KEY_ROWS = int(os.environ.get("BENCH_CEILING_KEY_ROWS", "150000"))
# A usage.accepted envelope is ~600 bytes of JSON.
PAYLOAD = b'{"id":"evt_01JD000000000000000000000","type":"usage.accepted",' + b"x" * 540 + b"}"


async def broker_produce_consume(bootstrap: str) -> dict:
    topic = f"bench.ceiling.{int(time.time() * 1000)}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 8, 1)])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                max_batch_size=512 * 1024, enable_idempotence=False)
    await producer.start()
    started = time.perf_counter()
    pending = []
    for i in range(N_MESSAGES):
        pending.append(await producer.send(topic, PAYLOAD, key=b"cus_%d" % (i % 1000)))
        if len(pending) >= 20_000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    produce_s = time.perf_counter() - started

    # The same client's batch API: one record batch per partition per request.
    started = time.perf_counter()
    partitions = sorted(await producer.partitions_for(topic))
    sent = 0
    while sent < N_MESSAGES:
        futures = []
        for partition in partitions:
            batch = producer.create_batch()
            while sent < N_MESSAGES and batch.append(
                    key=None, value=PAYLOAD, timestamp=None) is not None:
                sent += 1
            batch.close()
            futures.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*futures)
    batch_produce_s = time.perf_counter() - started
    await producer.stop()

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"{topic}.g",
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                max_partition_fetch_bytes=4 * 1024 * 1024)
    await consumer.start()
    seen = 0
    started = time.perf_counter()
    while seen < 2 * N_MESSAGES:
        batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
        seen += sum(len(v) for v in batch.values())
        if batch:
            await consumer.commit()
    consume_s = time.perf_counter() - started
    await consumer.stop()
    return {
        "messages": N_MESSAGES,
        "message_bytes": len(PAYLOAD),
        "produce_msgs_per_s": round(N_MESSAGES / produce_s),
        "produce_mb_per_s": round(N_MESSAGES * len(PAYLOAD) / produce_s / 1e6, 1),
        "produce_batch_api_msgs_per_s": round(N_MESSAGES / batch_produce_s),
        "produce_batch_api_mb_per_s": round(N_MESSAGES * len(PAYLOAD) / batch_produce_s / 1e6, 1),
        "consume_msgs_per_s": round(2 * N_MESSAGES / consume_s),
        "consume_mb_per_s": round(2 * N_MESSAGES * len(PAYLOAD) / consume_s / 1e6, 1),
    }


async def postgres_bulk_insert(dsn: str) -> dict:
    conn = await asyncpg.connect(dsn)
    await conn.execute(
        "DROP TABLE IF EXISTS bench_usage; CREATE TABLE bench_usage ("
        " usage_id text PRIMARY KEY, tenant_id text, environment text, customer text,"
        " meter text, quantity numeric, ts timestamptz, properties jsonb)"
    )
    now = datetime.now(UTC)
    rows = [
        (f"use_{i:020d}", "ten_bench", "test", f"cus_{i % 1000}", "api_calls", Decimal(1), now,
         '{"region": "eu"}')
        for i in range(N_ROWS)
    ]
    started = time.perf_counter()
    for i in range(0, N_ROWS, 10_000):
        await conn.copy_records_to_table("bench_usage", records=rows[i:i + 10_000])
    copy_s = time.perf_counter() - started
    await conn.execute("TRUNCATE bench_usage")
    started = time.perf_counter()
    for i in range(0, N_ROWS, 1000):
        chunk = rows[i:i + 1000]
        await conn.execute(
            "INSERT INTO bench_usage SELECT * FROM unnest($1::text[], $2::text[], $3::text[],"
            " $4::text[], $5::text[], $6::numeric[], $7::timestamptz[], $8::jsonb[])"
            " ON CONFLICT DO NOTHING",
            *[list(col) for col in zip(*chunk, strict=True)],
        )
    insert_s = time.perf_counter() - started
    await conn.execute("DROP TABLE bench_usage")
    await conn.close()
    return {
        "rows": N_ROWS,
        "copy_rows_per_s": round(N_ROWS / copy_s),
        "unnest_insert_on_conflict_rows_per_s": round(N_ROWS / insert_s),
    }


async def postgres_key_copy_by_collation(dsn: str) -> dict:
    conn = await asyncpg.connect(dsn)
    try:
        names = {r["collname"].lower(): r["collname"] for r in await conn.fetch(
            "SELECT collname FROM pg_collation WHERE collprovider = 'c'"
            " AND lower(collname) IN ('en_us.utf8', 'c.utf8') AND collencoding IN (-1,"
            " (SELECT encoding FROM pg_database WHERE datname = current_database()))")}
        linguistic = names.get("en_us.utf8") or names.get("c.utf8")
        if linguistic is None:
            return {"key_copy_skipped": "the server has neither en_US.utf8 nor C.UTF-8"}
        backend = await _local_backend(conn)
        now = datetime.now(UTC)
        rng = random.Random(7)
        keys = [f"req-{rng.getrandbits(64):016x}" for _ in range(N_KEY_ROWS)]
        batches = [  # ingestion's batches of 5,000, sorted as it sorts them
            [("ten_01JBENCH0000000000000000", "live", key, "0" * 64, f"use_{n:026d}",
              "evt_01JBENCH0000000000000000", "bench-cust-0001", now)
             for n, key in enumerate(sorted(keys[i:i + 5000]), start=i)]
            for i in range(0, N_KEY_ROWS, 5000)]
        key_first = "idempotency_key, tenant_id, environment"
        tenant_first = "tenant_id, environment, idempotency_key"
        variants = {"C": ("C", key_first), linguistic: (linguistic, key_first),
                    "tenant_first": ("C", tenant_first)}
        figures: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        # a warm-up or a slow turn of the machine weighs on every variant alike
        for name in ("C", "tenant_first", linguistic, linguistic, "tenant_first", "C"):
            collation, primary_key = variants[name]
            await conn.execute(
                "DROP TABLE IF EXISTS bench_keys; CREATE TABLE bench_keys ("
                f' tenant_id text COLLATE "{collation}", environment text COLLATE'
                f' "{collation}", idempotency_key text COLLATE "{collation}",'
                " payload_hash text, usage_id text, event_id text, customer text,"
                " event_time timestamptz, created_at timestamptz DEFAULT now(),"
                f" PRIMARY KEY ({primary_key}))")
            cpu0, started = _cpu(backend), time.perf_counter()
            for batch in batches:
                await conn.copy_records_to_table("bench_keys", columns=(
                    "tenant_id", "environment", "idempotency_key", "payload_hash",
                    "usage_id", "event_id", "customer", "event_time"), records=batch)
            figures[name].append((time.perf_counter() - started, _cpu(backend) - cpu0))
        await conn.execute("DROP TABLE bench_keys")
    finally:
        await conn.close()
    rows = 2 * N_KEY_ROWS
    wall = {c: sum(w for w, _ in f) for c, f in figures.items()}
    cpu = {c: sum(u for _, u in f) for c, f in figures.items()}
    out: dict = {
        "key_rows_per_collation": rows,
        "key_copy_linguistic_collation": linguistic,
        "key_copy_c_rows_per_s": round(rows / wall["C"]),
        "key_copy_linguistic_rows_per_s": round(rows / wall[linguistic]),
        "key_copy_tenant_first_rows_per_s": round(rows / wall["tenant_first"]),
    }
    if backend is not None and cpu["C"] > 0:  # a server on this machine: its backend's CPU
        out |= {
            "key_copy_c_postgres_us_per_row": round(cpu["C"] / rows * 1e6, 2),
            "key_copy_linguistic_postgres_us_per_row": round(cpu[linguistic] / rows * 1e6, 2),
            "key_copy_linguistic_vs_c_postgres_cpu": round(cpu[linguistic] / cpu["C"], 3),
            "key_copy_tenant_first_postgres_us_per_row": round(
                cpu["tenant_first"] / rows * 1e6, 2),
        }
    return out


async def _local_backend(conn: asyncpg.Connection) -> psutil.Process | None:
    """The process of the backend serving `conn` when the server runs on this machine (not
    a process that only has its pid, as a server in a container would)."""
    row = await conn.fetchrow(
        "SELECT pid, extract(epoch FROM backend_start)::float8 AS started"
        " FROM pg_stat_activity WHERE pid = pg_backend_pid()")
    try:
        process = psutil.Process(row["pid"])
        if "postgres" in process.name() and abs(process.create_time() - row["started"]) < 2:
            return process
    except (psutil.Error, OSError):
        pass
    return None


def _cpu(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    try:
        times = process.cpu_times()
    except (psutil.Error, OSError):
        return 0.0
    return times.user + times.system


async def run(ctx) -> dict:
    return {
        "broker": await broker_produce_consume(ctx.kafka_bootstrap),
        "postgres": {**await postgres_bulk_insert(ctx.database_url("bench")),
                     **await postgres_key_copy_by_collation(ctx.database_url("bench"))},
    }
