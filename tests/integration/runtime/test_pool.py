"""The services' pools (`db.create_pool`) against real PostgreSQL: a connection goes back to
the pool without asyncpg's reset query (pooled connections hold no session state), a
transaction left open is still rolled back, and the one session lock taken on a pooled
connection (the migration lock) does not outlive `migrate`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from billstream_runtime import db
from billstream_testing.waiting import eventually

pytestmark = pytest.mark.integration


async def _last_query(dsn: str, pid: int) -> str:
    """What the backend `pid` ran last, as PostgreSQL reports it (waiting until it is idle)."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await eventually(lambda: conn.fetchrow(
            "SELECT query FROM pg_stat_activity WHERE pid = $1 AND state = 'idle'", pid),
            message=f"backend {pid} idle")
        return row["query"]
    finally:
        await conn.close()


async def test_a_connection_goes_back_to_the_pool_without_a_reset_query(fresh_database: str):
    pool = await db.create_pool(fresh_database, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid() /* the last query */")
        # asyncpg's default reset would have run "SELECT pg_advisory_unlock_all(); CLOSE
        # ALL; UNLISTEN *; RESET ALL;" on release
        assert await _last_query(fresh_database, pid) == (
            "SELECT pg_backend_pid() /* the last query */")
        assert await pool.fetchval("SELECT 1") == 1  # and the connection serves again
    finally:
        await pool.close()


async def test_a_transaction_left_open_is_rolled_back_when_the_connection_goes_back(
        fresh_database: str):
    pool = await db.create_pool(fresh_database, min_size=1, max_size=1)
    try:
        await pool.execute("CREATE TABLE t (i int)")
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda *_: None)  # asyncpg reports the open transaction
        try:
            async with pool.acquire() as conn:
                await conn.execute("BEGIN")
                await conn.execute("INSERT INTO t VALUES (1)")
        finally:
            loop.set_exception_handler(None)
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT count(*) FROM t") == 0
    finally:
        await pool.close()


async def _lock_is_free(dsn: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        free = await conn.fetchval("SELECT pg_try_advisory_lock($1)", db._MIGRATION_LOCK)
        if free:
            await conn.execute("SELECT pg_advisory_unlock($1)", db._MIGRATION_LOCK)
        return free
    finally:
        await conn.close()


async def test_the_migration_lock_is_free_after_migrate_succeeds_or_fails(
        fresh_database: str, tmp_path: Path):
    migrations = tmp_path / "svc" / "migrations"
    migrations.mkdir(parents=True)
    (migrations / "0001_ok.sql").write_text("CREATE TABLE a (i int);")
    pool = await db.create_pool(fresh_database, min_size=1, max_size=1)
    try:
        assert await db.migrate(pool, migrations) == ["svc/0001_ok.sql"]
        assert await _lock_is_free(fresh_database)

        (migrations / "0002_broken.sql").write_text("CREATE TABLE b (i nosuchtype);")
        with pytest.raises(asyncpg.PostgresError):
            await db.migrate(pool, migrations)
        assert await _lock_is_free(fresh_database)
    finally:
        await pool.close()


async def test_the_connection_migrations_ran_on_is_not_given_back(fresh_database: str,
                                                                  tmp_path: Path):
    """It held the migration lock and may hold what a migration set for its session: it is
    closed, and the next user of the pool gets a fresh session."""
    migrations = tmp_path / "svc" / "migrations"
    migrations.mkdir(parents=True)
    (migrations / "0001_sets.sql").write_text(
        "SET statement_timeout = 1234; CREATE TABLE a (i int);")
    pool = await db.create_pool(fresh_database, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            before = await conn.fetchval("SELECT pg_backend_pid()")
        await db.migrate(pool, migrations)
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") != before
            assert await conn.fetchval("SHOW statement_timeout") == "0"
            assert not await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                " AND pid = pg_backend_pid()")
        assert await _lock_is_free(fresh_database)
    finally:
        await pool.close()


async def test_a_migration_cut_short_while_waiting_for_the_lock_leaves_it_free(
        fresh_database: str, tmp_path: Path):
    """Another replica migrates (holds the lock); this one's start is cancelled while it
    waits. Once the other is done, the lock is free: the waiting session went away."""
    migrations = tmp_path / "svc" / "migrations"
    migrations.mkdir(parents=True)
    (migrations / "0001_ok.sql").write_text("CREATE TABLE a (i int);")
    other = await asyncpg.connect(fresh_database)
    pool = await db.create_pool(fresh_database, min_size=1, max_size=1)
    try:
        await other.execute("SELECT pg_advisory_lock($1)", db._MIGRATION_LOCK)
        waiting = asyncio.create_task(db.migrate(pool, migrations))
        await eventually(lambda: other.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"),
            message="migrate waiting for the lock")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await other.execute("SELECT pg_advisory_unlock($1)", db._MIGRATION_LOCK)
        assert await _lock_is_free(fresh_database)
        assert await db.migrate(pool, migrations) == ["svc/0001_ok.sql"]
    finally:
        await other.close()
        await pool.close()
