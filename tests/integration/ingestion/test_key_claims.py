"""Claiming idempotency keys when they are already taken (a producer resending after
timeouts), against real PostgreSQL: the statement's plan, and the COPY that is not tried."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from billstream_ingestion import repository
from billstream_ingestion.repository import CLAIM_ON_CONFLICT, KeyClaim
from billstream_runtime.db import pg_micros
from ingestion_harness import Ingestion

pytestmark = pytest.mark.integration

AT = datetime(2026, 11, 1, tzinfo=UTC)


def claims(prefix: str, n: int, start: int = 0) -> list[KeyClaim]:
    return [KeyClaim(f"{prefix}-{i:06d}", f"{i:064x}", f"use_{prefix}_{i}", f"evt_{prefix}",
                     f"cust-{i % 100}", pg_micros(AT)) for i in range(start, start + n)]


@pytest.fixture
def copies(monkeypatch) -> list[int]:
    """The number of rows of every COPY made while the test runs."""
    made: list[int] = []
    real_copy = asyncpg.Connection.copy_records_to_table

    async def counting_copy(self, table, **kwargs):
        made.append(len(kwargs["records"]))
        return await real_copy(self, table, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "copy_records_to_table", counting_copy)
    return made


def rows_read_from_usage_keys(plan: dict) -> int:
    """Rows the plan read from usage_keys (scans of every kind, all loops; not the INSERT)."""
    read = 0
    if plan.get("Relation Name") == "usage_keys" and plan["Node Type"] != "ModifyTable":
        read += plan["Actual Rows"] * plan["Actual Loops"]
        read += plan.get("Rows Removed by Filter", 0) + plan.get("Rows Removed by Index "
                                                                 "Recheck", 0)
    for child in plan.get("Plans", []):
        read += rows_read_from_usage_keys(child)
    return read


async def test_resent_keys_are_probed_one_by_one_even_before_statistics(ingestion: Ingestion):
    """A table just filled, never analyzed (as after a burst of ingest): the resent batch
    reads its own keys' rows only, not the tenant's every key (it used to merge-join all of
    them: a resend of a million events then took 40 times longer)."""
    pool = ingestion.host.pool
    tenant = ingestion.tenant_id
    async with pool.acquire() as conn:
        await conn.execute("ALTER TABLE usage_keys SET (autovacuum_enabled = false)")
        stored = claims("old", 30_000)
        async with conn.transaction():
            await repository.claim_keys(conn, tenant, "test", stored)
        assert await conn.fetchval(
            "SELECT last_analyze IS NULL AND last_autoanalyze IS NULL"
            " FROM pg_stat_user_tables WHERE relname = 'usage_keys'")
        resent = stored[10_000:10_200]
        for plan_cache_mode in ("force_custom_plan", "force_generic_plan"):
            await conn.execute(f"SET plan_cache_mode = {plan_cache_mode}")
            explained = await conn.fetchval(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + CLAIM_ON_CONFLICT, tenant, "test",
                [c.idempotency_key for c in resent], [c.payload_hash for c in resent],
                [c.usage_id for c in resent], [c.event_id for c in resent],
                [c.customer for c in resent], [c.event_time for c in resent])
            if isinstance(explained, str):  # (the pool may decode json itself)
                explained = json.loads(explained)
            plan = explained[0]["Plan"]
            assert rows_read_from_usage_keys(plan) <= len(resent), (plan_cache_mode, explained)
        await conn.execute("RESET plan_cache_mode")
        # and the statement still answers as before: every key taken, by its first payload
        claimed = await repository.claim_keys_on_conflict(conn, tenant, "test", resent)
        assert claimed == {c.idempotency_key: (c.payload_hash, c.usage_id, False)
                           for c in resent}


async def test_a_resend_does_not_copy_batches_that_would_fail(ingestion: Ingestion,
                                                              copies: list[int]):
    """After a batch met a taken key, the scope's batches skip the COPY (which would write the
    whole batch, fail and roll back) until one inserts every key; outcomes are the same."""
    pool = ingestion.host.pool
    tenant = ingestion.tenant_id

    async def claim(batch: list[KeyClaim]) -> dict | None:
        async with pool.acquire() as conn, conn.transaction():
            return await repository.claim_keys(conn, tenant, "test", batch)

    first = claims("a", 100)
    assert await claim(first) is None  # new keys: COPY, every key claimed as it came
    assert copies == [100]

    again = await claim(first)  # the COPY is tried once, fails, the statement sorts it out
    assert again == {c.idempotency_key: (c.payload_hash, c.usage_id, False) for c in first}
    assert copies == [100, 100]

    mixed = first[:50] + claims("a", 50, start=100)
    result = await claim(mixed)  # the scope is resending: no COPY at all
    assert copies == [100, 100]
    assert [result[c.idempotency_key][2] for c in mixed] == [False] * 50 + [True] * 50

    fresh = claims("b", 100)
    assert all(inserted for _, _, inserted in (await claim(fresh)).values())
    assert copies == [100, 100]  # still by the statement; it inserted every key ...

    assert await claim(claims("c", 100)) is None
    assert copies == [100, 100, 100]  # ... so the next batch is COPYed again

    other_env = claims("d", 100)  # another scope was never resending
    async with pool.acquire() as conn, conn.transaction():
        await repository.claim_keys(conn, tenant, "live", other_env)
    assert copies == [100, 100, 100, 100]
    total = await pool.fetchval("SELECT count(*) FROM usage_keys WHERE tenant_id = $1", tenant)
    assert total == 100 + 50 + 100 + 100 + 100


async def test_the_dedup_key_leads_with_the_idempotency_key_and_upgrades_keep_every_key(
        fresh_database: str, tmp_path):
    """Migration 0006 puts the idempotency key first in usage_keys' primary key (15-21%
    less PostgreSQL CPU per key inserted: bench ceilings, key_copy_tenant_first_*): the keys
    stored before it stay, and the constraint still means one key per tenant and
    environment, shared neither across tenants nor environments."""
    from billstream_ingestion.bootstrap import MIGRATIONS
    from billstream_messaging.host import MESSAGING_MIGRATIONS, RUNTIME_MIGRATIONS
    from billstream_runtime import db
    from billstream_testing.fixtures import migrations_before

    before = migrations_before(MIGRATIONS, "0006", tmp_path)
    pool = await db.create_pool(fresh_database, min_size=1, max_size=2,
                                setup=db.timestamptz_micros)  # as the service's (KeyClaim)
    try:
        await db.migrate(pool, RUNTIME_MIGRATIONS, MESSAGING_MIGRATIONS, before)
        async with pool.acquire() as conn, conn.transaction():
            await repository.claim_keys(conn, "ten_a", "live", claims("k", 40))
            await repository.claim_keys(conn, "ten_b", "live", claims("k", 3))
        applied = await db.migrate(pool, RUNTIME_MIGRATIONS, MESSAGING_MIGRATIONS, MIGRATIONS)
        assert applied == ["billstream_ingestion/0006_usage_keys_key_first.sql"]
        columns = await pool.fetchval(
            "SELECT array_agg(a.attname ORDER BY k.n) FROM pg_index i"
            " CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
            " WHERE i.indrelid = 'usage_keys'::regclass AND i.indisprimary")
        assert columns == ["idempotency_key", "tenant_id", "environment"]
        assert await pool.fetchval("SELECT count(*) FROM usage_keys") == 43
        async with pool.acquire() as conn, conn.transaction():
            again = await repository.claim_keys(conn, "ten_a", "live", claims("k", 45))
            other_env = await repository.claim_keys(conn, "ten_a", "test", claims("k", 2))
        assert [inserted for _, _, inserted in again.values()] == [False] * 40 + [True] * 5
        assert all(inserted for _, _, inserted in other_env.values())
        with pytest.raises(asyncpg.UniqueViolationError):
            await pool.execute(
                "INSERT INTO usage_keys (tenant_id, environment, idempotency_key, payload_hash,"
                " usage_id, event_id, customer, event_time)"
                " VALUES ('ten_b', 'live', 'k-000001', 'h', 'u', 'e', 'c', now())")
    finally:
        await pool.close()


async def test_write_answers_the_same_on_every_path_listing_accepted_events_or_not(
        ingestion: Ingestion, copies: list[int]):
    """service.write claims a batch of new keys by COPY and takes every event as accepted
    without a per-key answer; a batch with a key twice, or a resend, is sorted out key by
    key. Either way the outcomes are the same, and with list_accepted=False (the Kafka input)
    exactly the events not accepted are listed: every event left out was accepted, and is in
    the log and in usage_keys."""
    from billstream_ingestion import service

    await ingestion.create_meter("api_calls")
    host = ingestion.host
    scope = service.Scope(ingestion.tenant_id, "test")
    recent = (datetime.now(UTC) - timedelta(hours=1)).isoformat().replace("+00:00", "Z")

    def raw(key: str, quantity: str = "1") -> dict:
        return {"idempotency_key": key, "customer": "acme-1", "meter": "api_calls",
                "quantity": quantity, "timestamp": recent}

    async def write(raws: list[dict], list_accepted: bool) -> list:
        prepared = await service.prepare(host.pool, host.settings, scope, raws)
        async with host.pool.acquire() as conn, conn.transaction():
            return await service.write(conn, host.store, [prepared],
                                       list_accepted=list_accepted)

    def answer(outcomes) -> list[tuple]:
        return sorted((o.index, o.idempotency_key, o.status, o.code) for o in outcomes)

    # all new, by COPY: nothing to list, or every event accepted with its own usage id
    assert await write([raw(f"w-{i}") for i in range(40)], list_accepted=False) == []
    listed = await write([raw(f"x-{i}") for i in range(40)], list_accepted=True)
    assert answer(listed) == [(i, f"x-{i}", "accepted", None) for i in range(40)]
    assert copies == [40, 40]
    # a key twice in a batch of new keys (COPYed): the repeat is a duplicate, or a conflict
    repeats = [raw(f"y-{i}") for i in range(40)] + [raw("y-3"), raw("y-5", quantity="2")]
    expected = [(40, "y-3", "duplicate", None), (41, "y-5", "rejected",
                                                 "idempotency_key_conflict")]
    assert answer(await write(repeats, list_accepted=False)) == expected
    assert copies == [40, 40, 40]  # (the first occurrences)
    both = answer(await write([raw(f"z-{i}") for i in range(40)] + [raw("z-3")],
                              list_accepted=True))
    assert both == [(i, f"z-{i}", "accepted", None) for i in range(40)] + [
        (40, "z-3", "duplicate", None)]
    assert copies == [40, 40, 40, 40]
    # a resend (the COPY fails, key by key), new keys among it: only the resent are listed
    resend = [raw(f"w-{i}") for i in range(35)] + [raw("w-new-1"), raw("w-new-2")]
    assert answer(await write(resend, list_accepted=False)) == [
        (i, f"w-{i}", "duplicate", None) for i in range(35)]
    assert copies == [40, 40, 40, 40, 37]  # tried, refused
    stored = {r["idempotency_key"]: r["usage_id"] for r in await host.pool.fetch(
        "SELECT idempotency_key, usage_id FROM usage_keys WHERE tenant_id = $1",
        scope.tenant_id)}
    logged = {u["idempotency_key"]: u["usage_id"] for r in await ingestion.log_rows()
              if r["type"] == "usage.batch_accepted" for u in r["data"]["usages"]}
    assert len(stored) == 40 + 40 + 40 + 40 + 2
    assert logged == stored  # every accepted event once, under the usage id of its key
    assert {o.usage_id for o in listed} == {stored[f"x-{i}"] for i in range(40)}
