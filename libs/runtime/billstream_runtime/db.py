"""asyncpg pools and per-service SQL migrations.

Migrations are plain `.sql` files named `NNNN_name.sql`, applied in order once each, under an
advisory lock so that several replicas starting together migrate once. Shared mechanisms (the
event log, inbox, idempotency keys, API-key projection) ship their own migration folders in
`libs/`; a service applies those first, then its own.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

_MIGRATION_LOCK = 7_311_001


_JSONB_VERSION = b"\x01"


async def _init_connection(conn: asyncpg.Connection) -> None:
    """json/jsonb columns map to Python objects via orjson, in the binary wire format so that
    they also work with COPY (`copy_records_to_table`), which is binary only. Binary jsonb is a
    version byte (1) followed by the JSON text; binary json is the text itself."""
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: _JSONB_VERSION + orjson.dumps(v),
        decoder=lambda b: orjson.loads(b[1:]),
        schema="pg_catalog",
        format="binary",
    )
    await conn.set_type_codec(
        "json",
        encoder=orjson.dumps,
        decoder=orjson.loads,
        schema="pg_catalog",
        format="binary",
    )


async def create_pool(dsn: str, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    """A pool whose json/jsonb columns map to Python objects via orjson."""
    return await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init_connection, command_timeout=60
    )


async def ensure_database(dsn: str) -> None:
    """Create the database named in `dsn` if it does not exist (needs CREATEDB)."""
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    admin = urlunsplit(parts._replace(path="/postgres"))
    try:
        conn = await asyncpg.connect(dsn)
        await conn.close()
        return
    except asyncpg.InvalidCatalogNameError:
        pass
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    except asyncpg.DuplicateDatabaseError:
        pass
    finally:
        await conn.close()


def migration_files(*dirs: Path) -> list[tuple[str, Path]]:
    """(name, path) of every migration in `dirs`, each folder in order, files sorted by name.
    The recorded name is `<folder-owner>/<file>` so two folders may both have `0001_*.sql`."""
    found: list[tuple[str, Path]] = []
    for d in dirs:
        owner = d.parent.name
        for f in sorted(d.glob("*.sql")):
            found.append((f"{owner}/{f.name}", f))
    return found


async def migrate(pool: asyncpg.Pool, *dirs: Path) -> list[str]:
    """Apply the migrations not applied yet; return the names applied."""
    applied: list[str] = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            for name, path in migration_files(*dirs):
                if name in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute("INSERT INTO schema_migrations(name) VALUES ($1)", name)
                applied.append(name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied


async def wait_for_database(dsn: str, timeout_s: float = 30.0) -> None:
    """Wait until the server accepts connections (used at service start)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await ensure_database(dsn)
            return
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)
