"""Databases Billstream creates compare text as bytes, whatever the server's default; a
service started on a database that does not says so (db.collation_note).

The server here is initialised with the C.UTF-8 locale, as a distribution's or the postgres
image's cluster (en_US.UTF-8) would be: its databases default to a linguistic collation."""

from __future__ import annotations

import locale
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from billstream_localstack.postgres import EmbeddedPostgres, create_database
from billstream_messaging import ServiceHost
from billstream_runtime import db
from billstream_runtime.settings import load_settings
from billstream_testing.fixtures import service_env
from structlog.testing import capture_logs

pytestmark = pytest.mark.integration

MIGRATIONS = Path(__file__).parent / "collation_migrations"


def _has_c_utf8() -> bool:
    before = locale.setlocale(locale.LC_COLLATE)
    try:
        locale.setlocale(locale.LC_COLLATE, "C.UTF-8")
    except locale.Error:
        return False
    finally:
        locale.setlocale(locale.LC_COLLATE, before)
    return True


@pytest.fixture(scope="module")
def linguistic_server(tmp_path_factory: pytest.TempPathFactory):
    if not _has_c_utf8():  # glibc has had it built in since 2.35
        pytest.skip("this system has no C.UTF-8 locale to initialise a server with")
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg-c-utf8") / "pgdata", locale="C.UTF-8")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def admin(linguistic_server: EmbeddedPostgres) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(linguistic_server.dsn())
    try:
        yield conn
    finally:
        await conn.close()


async def _collation(conn: asyncpg.Connection, database: str) -> str:
    return await conn.fetchval("SELECT datcollate FROM pg_database WHERE datname = $1", database)


async def test_the_server_default_is_linguistic_and_is_reported(
        admin: asyncpg.Connection, linguistic_server: EmbeddedPostgres) -> None:
    assert (await _collation(admin, "postgres")).lower().replace("-", "") == "c.utf8"
    await admin.execute("CREATE DATABASE plain_default")  # as an operator might
    conn = await asyncpg.connect(linguistic_server.dsn("plain_default"))
    try:
        note = await db.collation_note(conn)
    finally:
        await conn.close()
    assert note is not None
    assert "plain_default" in note and "LC_COLLATE C.UTF-8" in note.replace("utf8", "UTF-8")


async def test_a_database_a_service_creates_compares_bytes(
        admin: asyncpg.Connection, linguistic_server: EmbeddedPostgres) -> None:
    dsn = linguistic_server.dsn("svc_created")
    await db.ensure_database(dsn)
    assert await _collation(admin, "svc_created") == "C"
    # the character classification stays the server's: upper() still knows é
    conn = await asyncpg.connect(dsn)
    try:
        assert await db.collation_note(conn) is None
        assert await conn.fetchval("SELECT upper('é')") == "É"
    finally:
        await conn.close()
    await db.ensure_database(dsn)  # there already: nothing to do


async def test_the_local_stack_creates_its_databases_the_same_way(
        admin: asyncpg.Connection, linguistic_server: EmbeddedPostgres) -> None:
    assert await create_database(linguistic_server.dsn(), "stack_created") is True
    assert await create_database(linguistic_server.dsn(), "stack_created") is False
    assert await _collation(admin, "stack_created") == "C"


async def test_a_service_says_so_when_it_starts_on_a_linguistic_database(
        admin: asyncpg.Connection, linguistic_server: EmbeddedPostgres,
        kafka_bootstrap: str) -> None:
    await admin.execute("CREATE DATABASE operator_made")
    host = _host(linguistic_server.dsn("operator_made"), kafka_bootstrap)
    with capture_logs() as logs:
        pool = await host.open_database()
    await pool.close()
    warnings = [e for e in logs if e["event"] == "database_collation_slow"]
    assert len(warnings) == 1 and "operator_made" in warnings[0]["note"]

    host = _host(linguistic_server.dsn("created_by_service"), kafka_bootstrap)
    await db.ensure_database(linguistic_server.dsn("created_by_service"))
    with capture_logs() as logs:
        pool = await host.open_database()
    await pool.close()
    assert not [e for e in logs if e["event"] == "database_collation_slow"]


def _host(dsn: str, kafka_bootstrap: str) -> ServiceHost:
    settings = load_settings("notes", environ=service_env("notes", dsn, kafka_bootstrap))
    return ServiceHost(settings=settings, title="notes", migrations=MIGRATIONS)
