"""The timestamptz codec a service may set on its connections (`db.timestamptz_micros`):
against real PostgreSQL, every value is stored and read back exactly as asyncpg's own codec
stores and reads it, and ints of microseconds (`db.pg_micros`) are the same instants."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import asyncpg
import pytest

from billstream_runtime import db

pytestmark = pytest.mark.integration

VALUES = [
    datetime(2026, 11, 21, 19, 30, 1, 123456, tzinfo=UTC),
    datetime(2026, 11, 21, 21, 30, 1, 999999, tzinfo=timezone(timedelta(hours=2))),
    datetime(2026, 3, 29, 1, 59, 59, tzinfo=timezone(timedelta(hours=-9, minutes=-30))),
    datetime(2000, 1, 1, tzinfo=UTC),  # PostgreSQL's epoch: 0
    datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # just before: negative
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(1, 1, 2, tzinfo=UTC),
    datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2026, 6, 1, 12, 0, 0),  # naive: local time, as asyncpg takes it
    date(2026, 2, 28),  # a date: local midnight, as asyncpg takes it
    datetime.max,  # asyncpg's +infinity
    datetime.min,  # asyncpg's -infinity
]


async def _connect(dsn: str, codec: bool) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn)
    if codec:
        await db.timestamptz_micros(conn)
    return conn


async def test_stores_and_reads_every_value_as_asyncpg_does(fresh_database: str):
    native = await _connect(fresh_database, codec=False)
    ours = await _connect(fresh_database, codec=True)
    try:
        await native.execute("CREATE TABLE t (codec text, i int, v timestamptz, "
                             "PRIMARY KEY (codec, i))")
        for name, conn in (("native", native), ("ours", ours)):
            await conn.executemany("INSERT INTO t VALUES ($1, $2, $3)",
                                   [(name, i, v) for i, v in enumerate(VALUES)])
            await conn.copy_records_to_table(  # COPY is binary: the codec's other user
                "t", records=[(f"{name}-copy", i, v) for i, v in enumerate(VALUES)])
        # what PostgreSQL holds, as text in UTC: the same for each value, whichever codec
        await native.execute("SET TimeZone = 'UTC'")
        stored = await native.fetch(
            "SELECT codec, array_agg(v::text ORDER BY i) AS vs FROM t GROUP BY codec")
        by_codec = {r["codec"]: r["vs"] for r in stored}
        assert by_codec["ours"] == by_codec["native"] == by_codec["ours-copy"]
        assert "infinity" in by_codec["ours"] and "-infinity" in by_codec["ours"]
        # read back: equal values, of the same kind (aware UTC, the infinities naive)
        for name in ("native", "ours"):
            read_native = await native.fetch("SELECT v FROM t WHERE codec = $1 ORDER BY i", name)
            read_ours = await ours.fetch("SELECT v FROM t WHERE codec = $1 ORDER BY i", name)
            for a, b in zip(read_native, read_ours, strict=True):
                assert a["v"] == b["v"] and a["v"].tzinfo == b["v"].tzinfo
        assert (await ours.fetchval("SELECT v FROM t WHERE codec = 'ours' AND i = 0")
                == VALUES[0])
    finally:
        await native.close()
        await ours.close()


async def test_ints_of_microseconds_are_the_same_instants(fresh_database: str):
    conn = await _connect(fresh_database, codec=True)
    try:
        instants = [v for v in VALUES if isinstance(v, datetime) and v.tzinfo is not None]
        micros = [db.pg_micros(v) for v in instants]
        assert micros[3] == 0 and micros[4] == -1  # the epoch, and a microsecond before it
        # as a parameter, in an array (unnest), and in a COPY
        assert await conn.fetchval("SELECT $1::timestamptz = $2::timestamptz",
                                   micros[0], instants[0])
        assert await conn.fetchval("SELECT array_agg(t ORDER BY o) FROM unnest($1::timestamptz[])"
                                   " WITH ORDINALITY AS u(t, o)", micros) == instants
        await conn.execute("CREATE TABLE m (i int PRIMARY KEY, v timestamptz NOT NULL)")
        await conn.copy_records_to_table("m", records=list(enumerate(micros)))
        assert [r["v"] for r in await conn.fetch("SELECT v FROM m ORDER BY i")] == instants
    finally:
        await conn.close()


async def test_anything_else_is_refused_as_asyncpg_refuses_it(fresh_database: str):
    conn = await _connect(fresh_database, codec=True)
    try:
        for bad in ("2026-11-21T00:00:00Z", 1.5, True):
            with pytest.raises((TypeError, asyncpg.DataError)):
                await conn.fetchval("SELECT $1::timestamptz", bad)
    finally:
        await conn.close()
