"""All of ingestion's SQL: the idempotency keys and the read models it validates usage with."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from datetime import datetime, timedelta

import asyncpg

Conn = asyncpg.Connection | asyncpg.Pool


@dataclass(frozen=True, slots=True)
class KnownCustomer:
    customer_id: str
    external_id: str | None
    clock_time: datetime | None  # its test clock's frozen time, when it has one we know


@dataclass(slots=True)  # not frozen: built per event on the hot path
class KeyClaim:
    idempotency_key: str
    payload_hash: str
    usage_id: str
    event_id: str  # of the usage.batch_accepted event holding the usage when the claim wins
    customer: str  # as sent
    # the event's (defaulted) timestamp as db.pg_micros: the connection's timestamptz codec
    # (db.timestamptz_micros, set up by the service) takes it without the datetime's cost
    event_time: int


# ---------------------------------------------------------------- idempotency keys


_KEY_COLUMNS = ("tenant_id", "environment", "idempotency_key", "payload_hash", "usage_id",
                "event_id", "customer", "event_time")
_BY_KEY = attrgetter("idempotency_key")
#: Below this many keys the single INSERT … ON CONFLICT statement is as fast as COPY.
_COPY_MIN_KEYS = 32


#: Scopes (tenant, environment) whose last batch met a key already taken. Their next batch
#: skips the COPY: during a resend (a producer retrying after timeouts) every COPY would write
#: its whole batch into the heap and the WAL, fail on the first taken key, and roll back,
#: leaving dead rows for vacuum. A batch that then inserts every key puts the scope back on
#: the COPY path. Per process, bounded.
_RESENDING: set[tuple[str, str]] = set()
_RESENDING_MAX = 10_000


async def claim_keys(
    conn: asyncpg.Connection, tenant_id: str, environment: str, claims: Sequence[KeyClaim]
) -> dict[str, tuple[str, str, bool]] | None:
    """Claim every key. None when every key was new: each is now claimed by its claim, and
    nothing had to be asked key by key. Otherwise, for each key, what claim_keys_on_conflict
    answers.

    Fast path: a batch of new keys is COPYed in (about five times faster than the INSERT … ON
    CONFLICT statement, which is what holds ingest back). COPY is all or nothing: if any key
    is already taken (a resend, a concurrent identical batch) the unique constraint refuses
    the whole COPY, the savepoint rolls it back, and the batch takes the statement that sorts
    out each key; so do the scope's next batches until one of them inserts every key
    (`_RESENDING`). Small batches take the statement too. The constraint is the guarantee
    either way."""
    scope = (tenant_id, environment)
    if len(claims) >= _COPY_MIN_KEYS and scope not in _RESENDING:
        try:
            async with conn.transaction():  # a savepoint inside the caller's transaction
                await conn.copy_records_to_table(
                    "usage_keys", columns=_KEY_COLUMNS,
                    records=[(tenant_id, environment, c.idempotency_key, c.payload_hash,
                              c.usage_id, c.event_id, c.customer, c.event_time)
                             for c in sorted(claims, key=_BY_KEY)],
                )
        except asyncpg.UniqueViolationError:
            pass
        else:
            return None
    claimed = await claim_keys_on_conflict(conn, tenant_id, environment, claims)
    if all(inserted for _, _, inserted in claimed.values()):
        _RESENDING.discard(scope)
    elif len(claims) >= _COPY_MIN_KEYS:
        if len(_RESENDING) >= _RESENDING_MAX:
            _RESENDING.clear()
        _RESENDING.add(scope)
    return claimed


#: The statement of claim_keys_on_conflict ($1 tenant, $2 environment, $3.. the claims' columns).
CLAIM_ON_CONFLICT = """
        WITH input AS (
            SELECT * FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                                 $8::timestamptz[])
                   AS t(idempotency_key, payload_hash, usage_id, event_id, customer, event_time)
        ), inserted AS (
            INSERT INTO usage_keys (tenant_id, environment, idempotency_key, payload_hash,
                                    usage_id, event_id, customer, event_time)
            SELECT $1, $2, idempotency_key, payload_hash, usage_id, event_id, customer,
                   event_time FROM input
            ON CONFLICT (tenant_id, environment, idempotency_key) DO NOTHING
            RETURNING idempotency_key
        )
        SELECT i.idempotency_key, i.payload_hash AS new_hash, i.usage_id AS new_usage_id,
               ins.idempotency_key IS NOT NULL AS inserted,
               k.payload_hash AS old_hash, k.usage_id AS old_usage_id
          FROM input i
          LEFT JOIN inserted ins USING (idempotency_key)
          -- one primary-key probe per input key, whatever the statistics say: a plain join
          -- let a stale estimate (a table just filled by a million inserts) merge-join the
          -- tenant's every key for each batch, 40 times slower (LIMIT 1 keeps it lateral)
          LEFT JOIN LATERAL (
              SELECT payload_hash, usage_id FROM usage_keys k
               WHERE k.tenant_id = $1 AND k.environment = $2
                 AND k.idempotency_key = i.idempotency_key
               LIMIT 1) k ON true
"""


async def claim_keys_on_conflict(
    conn: asyncpg.Connection, tenant_id: str, environment: str, claims: Sequence[KeyClaim]
) -> dict[str, tuple[str, str, bool]]:
    """Insert the keys in one statement; for each key, (payload_hash, usage_id, inserted_now)
    of the row that owns it. Keys already taken keep their first payload.

    Claims are inserted in key order so that two concurrent batches lock keys in the same
    order (no deadlock); a concurrent insert of the same key waits for the other transaction
    and then sees its row (`ON CONFLICT DO NOTHING`), so a key is accepted once."""
    ordered = sorted(claims, key=_BY_KEY)
    rows = await conn.fetch(
        CLAIM_ON_CONFLICT,
        tenant_id, environment,
        [c.idempotency_key for c in ordered], [c.payload_hash for c in ordered],
        [c.usage_id for c in ordered], [c.event_id for c in ordered],
        [c.customer for c in ordered], [c.event_time for c in ordered],
    )
    result: dict[str, tuple[str, str, bool]] = {}
    unseen: list[str] = []
    for r in rows:
        if r["inserted"]:
            result[r["idempotency_key"]] = (r["new_hash"], r["new_usage_id"], True)
        elif r["old_hash"] is not None:
            result[r["idempotency_key"]] = (r["old_hash"], r["old_usage_id"], False)
        else:
            # Committed by a concurrent request after this statement's snapshot was taken.
            unseen.append(r["idempotency_key"])
    if unseen:
        for r in await conn.fetch(
            "SELECT idempotency_key, payload_hash, usage_id FROM usage_keys"
            " WHERE tenant_id = $1 AND environment = $2 AND idempotency_key = ANY($3::text[])",
            tenant_id, environment, unseen,
        ):
            result[r["idempotency_key"]] = (r["payload_hash"], r["usage_id"], False)
    return result


# ---------------------------------------------------------------- lookups


async def known_meters(conn: Conn, tenant_id: str, environment: str,
                       codes: Iterable[str]) -> set[str]:
    rows = await conn.fetch(
        "SELECT code FROM meters WHERE tenant_id = $1 AND environment = $2"
        " AND code = ANY($3::text[])",
        tenant_id, environment, list(codes),
    )
    return {r["code"] for r in rows}


async def known_customers(conn: Conn, tenant_id: str, environment: str,
                          refs: Iterable[str]) -> dict[str, KnownCustomer]:
    """Customers named by `refs` (cus_ ids or external ids), keyed by the ref that named
    them. A `cus_` id match wins over an external id that happens to look the same."""
    refs = list(refs)
    rows = await conn.fetch(
        """
        SELECT c.customer_id, c.external_id, t.frozen_time
          FROM customers c
          LEFT JOIN test_clocks t ON t.test_clock_id = c.test_clock_id
         WHERE c.tenant_id = $1 AND c.environment = $2
           AND (c.customer_id = ANY($3::text[]) OR c.external_id = ANY($3::text[]))
        """,
        tenant_id, environment, refs,
    )
    by_external: dict[str, KnownCustomer] = {}
    by_id: dict[str, KnownCustomer] = {}
    for r in rows:
        known = KnownCustomer(r["customer_id"], r["external_id"], r["frozen_time"])
        by_id[known.customer_id] = known
        if known.external_id is not None:
            by_external[known.external_id] = known
    return {ref: by_id.get(ref) or by_external[ref] for ref in refs
            if ref in by_id or ref in by_external}


# ---------------------------------------------------------------- projections


async def catalog_version(conn: Conn, tenant_id: str, environment: str) -> int | None:
    """The scope's catalog version (see catalog.py); None while it has none."""
    return await conn.fetchval(
        "SELECT version FROM catalog_versions WHERE tenant_id = $1 AND environment = $2",
        tenant_id, environment)


async def bump_catalog_version(conn: asyncpg.Connection, tenant_id: str,
                               environment: str) -> None:
    """Move the scope's catalog version: in the transaction that changes its customers, meters
    or test clocks, so that no worker keeps what it read before."""
    await conn.execute(
        "INSERT INTO catalog_versions (tenant_id, environment, version)"
        " VALUES ($1, $2, nextval('catalog_version_seq'))"
        " ON CONFLICT (tenant_id, environment) DO UPDATE SET version = EXCLUDED.version",
        tenant_id, environment)


async def upsert_customer(conn: asyncpg.Connection, tenant_id: str, environment: str,
                          customer_id: str, external_id: str | None,
                          test_clock_id: str | None) -> None:
    await conn.execute(
        "INSERT INTO customers (tenant_id, environment, customer_id, external_id, test_clock_id)"
        " VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (tenant_id, environment, customer_id) DO UPDATE"
        " SET external_id = EXCLUDED.external_id, test_clock_id = EXCLUDED.test_clock_id",
        tenant_id, environment, customer_id, external_id, test_clock_id,
    )


async def upsert_meter(conn: asyncpg.Connection, tenant_id: str, environment: str,
                       code: str, meter_id: str) -> None:
    await conn.execute(
        "INSERT INTO meters (tenant_id, environment, code, meter_id) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (tenant_id, environment, code) DO UPDATE SET meter_id = EXCLUDED.meter_id",
        tenant_id, environment, code, meter_id,
    )


async def set_clock_time(conn: asyncpg.Connection, tenant_id: str, environment: str,
                         test_clock_id: str, frozen_time: datetime) -> None:
    """Create or move a test clock; a clock only moves forward."""
    await conn.execute(
        "INSERT INTO test_clocks (test_clock_id, tenant_id, environment, frozen_time)"
        " VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (test_clock_id) DO UPDATE"
        " SET frozen_time = GREATEST(test_clocks.frozen_time, EXCLUDED.frozen_time)",
        test_clock_id, tenant_id, environment, frozen_time,
    )


# ---------------------------------------------------------------- period closes


async def close_recorded(conn: Conn, tenant_id: str, environment: str, subscription_id: str,
                         period_end: datetime) -> bool:
    return bool(await conn.fetchval(
        "SELECT 1 FROM period_closes WHERE tenant_id = $1 AND environment = $2"
        " AND subscription_id = $3 AND period_end = $4",
        tenant_id, environment, subscription_id, period_end))


async def record_close(conn: asyncpg.Connection, event_id: str, seq: int, tenant_id: str,
                       environment: str, subscription_id: str, customer_id: str,
                       external_id: str | None, period_end: datetime) -> None:
    await conn.execute(
        "INSERT INTO period_closes (event_id, seq, tenant_id, environment, subscription_id,"
        " customer_id, external_id, period_end) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)"
        " ON CONFLICT DO NOTHING",
        event_id, seq, tenant_id, environment, subscription_id, customer_id, external_id,
        period_end)


async def billed_by_close(conn: Conn, tenant_id: str, environment: str, refs: Sequence[str],
                          after_seq: int, timestamp: datetime) -> str | None:
    """The first period close after `after_seq` in the log, of a customer named by `refs`,
    whose period ends after `timestamp`: the close that billed (or is billing) that event."""
    return await conn.fetchval(
        """
        SELECT event_id FROM period_closes
         WHERE tenant_id = $1 AND environment = $2
           AND (customer_id = ANY($3::text[]) OR external_id = ANY($3::text[]))
           AND seq > $4 AND period_end > $5
         ORDER BY seq LIMIT 1
        """,
        tenant_id, environment, list(refs), after_seq, timestamp)


# ---------------------------------------------------------------- corrections


async def lock_head(conn: asyncpg.Connection) -> None:
    """Take the log head lock now (EventStore.append takes it anyway, later): the checks that
    follow then see every period close that can precede this transaction's events."""
    await conn.execute("SELECT 1 FROM event_log_head WHERE id = 1 FOR UPDATE")


async def lock_key(conn: asyncpg.Connection, tenant_id: str, environment: str,
                   idempotency_key: str):
    return await conn.fetchrow(
        "SELECT * FROM usage_keys WHERE tenant_id = $1 AND environment = $2"
        " AND idempotency_key = $3 FOR UPDATE",
        tenant_id, environment, idempotency_key)


async def get_key(conn: Conn, tenant_id: str, environment: str, idempotency_key: str):
    return await conn.fetchrow(
        "SELECT * FROM usage_keys WHERE tenant_id = $1 AND environment = $2"
        " AND idempotency_key = $3",
        tenant_id, environment, idempotency_key)


async def logged_event(conn: Conn, event_id: str):
    """(seq, envelope, envelope_codec, data) of an event of this service's log (the
    published envelope: billstream_messaging.store.published_envelope)."""
    return await conn.fetchrow(
        "SELECT seq, envelope, envelope_codec, data FROM event_log WHERE id = $1", event_id)


async def corrections(conn: Conn, tenant_id: str, environment: str, idempotency_key: str):
    return await conn.fetch(
        "SELECT * FROM usage_corrections WHERE tenant_id = $1 AND environment = $2"
        " AND idempotency_key = $3 ORDER BY id",
        tenant_id, environment, idempotency_key)


async def insert_correction(conn: asyncpg.Connection, correction_id: str, tenant_id: str,
                            environment: str, idempotency_key: str, usage_id: str, action: str,
                            quantity: str | None, properties: dict | None,
                            reason: str | None):
    return await conn.fetchrow(
        "INSERT INTO usage_corrections (correction_id, tenant_id, environment, idempotency_key,"
        " usage_id, action, quantity, properties, reason) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)"
        " RETURNING *",
        correction_id, tenant_id, environment, idempotency_key, usage_id, action, quantity,
        properties, reason)


# ---------------------------------------------------------------- key retention


async def purge_expired_keys(conn: Conn, cutoff: datetime, keep_for: timedelta,
                             limit: int) -> int:
    """Delete up to `limit` keys no resend could hit any more: received and timestamped before
    `cutoff` (= now - keep_for, keep_for being the window and a margin), unless their customer
    is on a test clock whose time is not yet `keep_for` past the event (a frozen clock keeps
    "now" in the past)."""
    return int((await conn.execute(
        """
        DELETE FROM usage_keys WHERE ctid IN (
            SELECT k.ctid FROM usage_keys k
             WHERE k.created_at < $1 AND k.event_time < $1
               AND NOT EXISTS (
                   SELECT 1 FROM customers c JOIN test_clocks t USING (test_clock_id)
                    WHERE c.tenant_id = k.tenant_id AND c.environment = k.environment
                      AND (c.customer_id = k.customer OR c.external_id = k.customer)
                      AND k.event_time >= t.frozen_time - $3::interval)
             LIMIT $2)
        """,
        cutoff, limit, keep_for)).split()[-1])
