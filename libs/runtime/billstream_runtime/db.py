"""asyncpg pools and per-service SQL migrations.

Migrations are plain `.sql` files named `NNNN_name.sql`, applied in order once each, under an
advisory lock so that several replicas starting together migrate once. Shared mechanisms (the
event log, inbox, idempotency keys, API-key projection) ship their own migration folders in
`libs/`; a service applies those first, then its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
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


ConnectionSetup = Callable[[asyncpg.Connection], Awaitable[None]]


async def create_pool(dsn: str, min_size: int = 2, max_size: int = 10,
                      setup: ConnectionSetup | None = None) -> asyncpg.Pool:
    """A pool whose json/jsonb columns map to Python objects via orjson; `setup` runs on each
    new connection after that (a service's own codecs, such as `timestamptz_micros`).

    A connection goes back to the pool without a reset query (`_no_session_state`): pooled
    connections never hold session state (see there)."""
    init = _init_connection
    if setup is not None:
        async def init(conn: asyncpg.Connection) -> None:
            await _init_connection(conn)
            await setup(conn)

    return await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=init, command_timeout=60,
        reset=_no_session_state,
    )


async def _no_session_state(conn: asyncpg.Connection) -> None:
    """The pool's reset, run on release after asyncpg's own (which rolls back a transaction
    left open and drops the connection's Python-side listeners): nothing more.

    asyncpg's default sends `pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL` on
    every release: a round trip and work on both sides for each pooled query, some 0.2 ms of
    the client's CPU and as much of the server's (ingestion releases three or four
    connections per request). Billstream keeps session state off pooled connections, as
    behind PgBouncer in transaction mode: `SET` only as `SET LOCAL`, advisory locks only
    transaction-scoped (`pg_advisory_xact_lock`), and what must outlive a transaction (the
    relay's leader lock and LISTEN, the workers' LISTEN) on a connection of its own. The
    connection `migrate` takes its session lock on is closed afterwards, not given back."""


# ---------------------------------------------------------------- timestamptz as microseconds

#: PostgreSQL's epoch: a timestamptz travels (binary) as microseconds since it, UTC.
PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_PG_INFINITY = 2**63 - 1
_PG_NEGATIVE_INFINITY = -(2**63)
# what asyncpg maps PostgreSQL's infinities to and from (naive, like asyncpg's own)
_INFINITY = datetime(9999, 12, 31, 23, 59, 59, 999999)
_NEGATIVE_INFINITY = datetime(1, 1, 1)


def pg_micros(value: datetime) -> int:
    """An aware datetime as PostgreSQL's binary timestamptz: microseconds since PG_EPOCH. A
    connection set up with `timestamptz_micros` takes the int where it takes the datetime."""
    return (value - PG_EPOCH) // _MICROSECOND


def _encode_timestamptz(value: Any) -> tuple[int]:
    """asyncpg's own timestamptz encoding, in Python, plus ints (pg_micros) taken as they are.
    Naive datetimes and dates are local time, as asyncpg takes them."""
    if type(value) is int:
        return (value,)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            if value == _INFINITY:
                return (_PG_INFINITY,)
            if value == _NEGATIVE_INFINITY:
                return (_PG_NEGATIVE_INFINITY,)
            value = value.astimezone(UTC)
        return ((value - PG_EPOCH) // _MICROSECOND,)
    if isinstance(value, date):
        return _encode_timestamptz(datetime(value.year, value.month, value.day).astimezone())
    raise TypeError("expected a datetime.date or datetime.datetime instance (or pg_micros), "
                    f"got {type(value).__name__!r}")


def _decode_timestamptz(value: tuple[int]) -> datetime:
    micros = value[0]
    if micros == _PG_INFINITY:
        return _INFINITY
    if micros == _PG_NEGATIVE_INFINITY:
        return _NEGATIVE_INFINITY
    return PG_EPOCH + timedelta(microseconds=micros)


async def timestamptz_micros(conn: asyncpg.Connection) -> None:
    """timestamptz parameters may be ints of microseconds since PG_EPOCH (`pg_micros`), which
    cost asyncpg nothing to encode: its own encoder spends about 1.5 µs per datetime (two
    comparisons with its infinities, astimezone, a subtraction), which in a COPY of usage keys
    was half of the client's cost per row. Datetimes and dates work as before, and values
    decode exactly as asyncpg decodes them (aware UTC datetimes; the infinities as
    datetime.max/min, naive)."""
    await conn.set_type_codec(
        "timestamptz",
        encoder=_encode_timestamptz,
        decoder=_decode_timestamptz,
        schema="pg_catalog",
        format="tuple",
    )


async def ensure_database(dsn: str) -> None:
    """Create the database named in `dsn` if it does not exist (needs CREATEDB), with
    byte-order collation (`create_database`)."""
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
        await create_database(conn, name)
    finally:
        await conn.close()


# ---------------------------------------------------------------- collation
#
# Billstream's indexed text is identifiers — idempotency keys, ids, codes, external ids — which
# are equal when their bytes are, and are never sorted for a reader. Under a linguistic
# collation (en_US.UTF-8, the default of the postgres Docker image and of most distributions'
# clusters; even C.UTF-8; or any ICU locale) every comparison in a B-tree goes through strcoll
# (or ICU) instead of memcmp, and every accepted usage inserts into such B-trees (ingestion's
# key table, metering's usage records). Measured on the key table's shape (bench/ceilings.py,
# `postgres.key_copy_*`): a COPY of keys cost PostgreSQL 26-68% more CPU per row under
# C.UTF-8 than under C (1.26-1.68 times in eight runs of 150,000 keys; 1.42-1.49 measured
# apart from 200,000 to 500,000 keys). Equality is the same under every deterministic collation,
# so uniqueness (the dedup guarantee) does not depend on it: only the cost does. Databases
# Billstream creates are created with LC_COLLATE "C"; a database created by an operator is
# checked when a service starts (`collation_note`).

#: Collations under which PostgreSQL compares text with memcmp.
BYTE_ORDER_COLLATIONS = frozenset({"C", "POSIX"})


def create_database_sql(name: str, server_version_num: int) -> str:
    """CREATE DATABASE `name` with byte-order collation (template0 is the only template a
    collation may differ from; the character classification stays the server's). From
    PostgreSQL 15 on the provider is named, since a cluster may default to ICU."""
    provider = " LOCALE_PROVIDER libc" if server_version_num >= 150000 else ""
    return (f"CREATE DATABASE {_quoted(name)} TEMPLATE template0 ENCODING 'UTF8'{provider}"
            " LC_COLLATE 'C'")


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def create_database(conn: asyncpg.Connection, name: str) -> bool:
    """Create database `name` (on `conn`'s server) unless it exists: True when created.
    With byte-order collation (`create_database_sql`), unless template0 compares bytes
    already (a "C" cluster, PostgreSQL 17's builtin provider: its databases keep that
    provider's character classification). Should the server refuse the collation (a
    template0 whose character set is not UTF-8, ICU rules on template0), with its defaults,
    which `collation_note` reports when a service starts."""
    if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
        return False
    plain = f"CREATE DATABASE {_quoted(name)}"
    try:
        if _compares_bytes(await _locale_of(conn, "template0")):
            await conn.execute(plain)
        else:
            version = int(await conn.fetchval("SHOW server_version_num"))
            try:
                await conn.execute(create_database_sql(name, version))
            except (asyncpg.InvalidParameterValueError, asyncpg.FeatureNotSupportedError,
                    asyncpg.InvalidObjectDefinitionError):
                await conn.execute(plain)
    except asyncpg.DuplicateDatabaseError:  # created concurrently
        return False
    return True


async def _locale_of(conn: asyncpg.Connection | asyncpg.Pool, database: str | None = None):
    """(name, provider, collate, ICU/builtin locale) of `database` (default: the current
    one). Through jsonb: datlocprovider exists from PostgreSQL 15 on, and PostgreSQL 17
    renamed daticulocale to datlocale."""
    return await conn.fetchrow(
        "SELECT d.datname, coalesce(to_jsonb(d) ->> 'datlocprovider', 'c') AS provider,"
        " to_jsonb(d) ->> 'datcollate' AS collate,"
        " coalesce(to_jsonb(d) ->> 'datlocale', to_jsonb(d) ->> 'daticulocale') AS locale"
        " FROM pg_database d WHERE d.datname = coalesce($1, current_database())", database)


def _compares_bytes(locale) -> bool:
    """libc "C" or "POSIX", or the builtin provider (PostgreSQL 17+; its collations compare
    code points, which for UTF-8 is byte order, with memcmp)."""
    return locale["provider"] == "b" or (
        locale["provider"] == "c" and locale["collate"] in BYTE_ORDER_COLLATIONS)


async def collation_note(conn: asyncpg.Connection | asyncpg.Pool) -> str | None:
    """Why the current database's collation makes text indexes slower, or None when it
    compares bytes (`_compares_bytes`)."""
    locale = await _locale_of(conn)
    if _compares_bytes(locale):
        return None
    collation = (f"ICU locale {locale['locale']}" if locale["provider"] == "i"
                 else f"LC_COLLATE {locale['collate']}")
    return (f"database {locale['datname']} compares text under {collation}: every index "
            "insert on ids and idempotency keys costs PostgreSQL more CPU than under \"C\" "
            "(26-68% more per usage key under C.UTF-8, bench/README.md). Create Billstream's "
            "databases with TEMPLATE template0 LC_COLLATE 'C' (and LOCALE_PROVIDER libc from "
            "PostgreSQL 15 on; deploy/README.md)")


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
    """Apply the migrations not applied yet; return the names applied.

    The connection they run on is closed afterwards, never given back to the pool: it holds
    the migration lock (a session lock: even a lock wait cut short may have been granted),
    and a migration may leave session settings; both go with the session."""
    applied: list[str] = []
    async with pool.acquire() as conn:
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
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
        except BaseException:
            conn.terminate()
            raise
        await conn.close(timeout=10)
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
